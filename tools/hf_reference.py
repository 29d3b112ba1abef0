"""Compare kquant's Hugging Face -> GGUF conversion with llama.cpp's own convert_hf_to_gguf.py.

    python tools/hf_reference.py [FOLDER ...] [--outtype f32 f16 bf16] [--record tests/data/hf_reference]

Without FOLDER it builds the test fixtures (tests/make_hf_fixtures.py) into a work folder and
uses those.  For every folder and outtype it runs

* llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist, with llama.cpp's own
  gguf-py) in a separate virtual environment that has torch, transformers, sentencepiece and
  safetensors (default /work/cache/convvenv; --convvenv), and
* kquant.files.hf.load_hf_model + kquant.files.gguf_write.write_gguf in this interpreter,

then compares the two files key by key (value, type, order) and tensor by tensor (name, shape,
type, bytes), and says whether the two files are byte-identical.  --record writes the reference
side of each fixture to DIR/<fixture>.json (what tests/test_hf.py checks kquant against).

The converter names a BPE pre-tokenizer from the sha256 of the token ids its HF tokenizer gives
for a fixed text; the small vocabularies trained for the fixtures are in none of its tables, so
for those it stops with "BPE pre-tokenizer was not recognized".  The run here patches that one
step: when the hash is unknown it falls back to the pre-tokenizer name the fixture was built to
have (FIXTURE_PRE below; --pre NAME for other folders), and says so.  Everything else is the
converter's own code.

--check-pre builds tokenizer.json files with the full vocabularies and merges of llama.cpp's
models/ggml-vocab-{llama-bpe,qwen2,gpt-2}.gguf (and the pre-tokenizer sections kquant knows) and
checks that the converter's hash-based naming and kquant's pre-tokenizer naming agree on them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import make_hf_fixtures as fixtures  # noqa: E402

LLAMA_CPP = Path(os.environ.get("KQUANT_LLAMA_CPP", "/work/cache/llama_cpp_python-0.3.36/vendor/llama.cpp"))
CONVVENV = Path(os.environ.get("KQUANT_CONVVENV", "/work/cache/convvenv"))

# what each fixture's BPE tokenizer was built as (see the module docstring)
FIXTURE_PRE = {"tiny-llama3-bpe": "llama-bpe", "tiny-qwen2": "qwen2", "tiny-qwen3": "qwen2", "tiny-qwen3moe": "qwen2", "tiny-qwen2moe": "qwen2", "tiny-smollm": "smollm", "tiny-phi4": "gpt-4o"}

_WRAPPER = r'''
import os, sys, runpy
llama_cpp = sys.argv[1]
sys.argv = [os.path.join(llama_cpp, "convert_hf_to_gguf.py")] + sys.argv[2:]
sys.path.insert(0, llama_cpp)
import conversion.base as base
_orig = base.TextModel.get_vocab_base_pre
def _pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        name = os.environ.get("KQUANT_PRE_FALLBACK")
        if not name:
            raise
        print(f"KQUANT: BPE pre-tokenizer hash unknown, using {name!r}", file=sys.stderr)
        return name
base.TextModel.get_vocab_base_pre = _pre
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def run_reference(folder: Path, outtype: str, out: Path, pre: str | None) -> tuple[bool, float]:
    """convert_hf_to_gguf.py FOLDER --outtype OUTTYPE --outfile OUT; returns (pre fallback used, seconds)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_WRAPPER)
        wrapper = f.name
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pre:
        env["KQUANT_PRE_FALLBACK"] = pre
    t0 = time.time()
    try:
        proc = subprocess.run([str(CONVVENV / "bin" / "python"), wrapper, str(LLAMA_CPP), str(folder),
                               "--outtype", outtype, "--outfile", str(out)],
                              capture_output=True, text=True, env=env, cwd=str(folder.parent))
    finally:
        os.unlink(wrapper)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {folder} ({outtype}):\n{proc.stderr[-4000:]}")
    return "KQUANT: BPE pre-tokenizer hash unknown" in proc.stderr, time.time() - t0


def run_kquant(folder: Path, outtype: str, out: Path) -> float:
    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model

    t0 = time.time()
    write_gguf(load_hf_model(folder, outtype), out, progress=False)
    return time.time() - t0


def compare(ref: dict, got: dict) -> list[str]:
    """Differences between two summaries (fixtures.summarize_gguf), as lines of text."""
    diffs = []
    rk = [m[0] for m in ref["metadata"]]
    gk = [m[0] for m in got["metadata"]]
    if rk != gk:
        missing = [k for k in rk if k not in gk]
        extra = [k for k in gk if k not in rk]
        if missing or extra:
            diffs.append(f"keys: missing {missing}, extra {extra}")
        else:
            diffs.append(f"key order differs: reference {rk}\n  kquant    {gk}")
    gmap = {m[0]: m for m in got["metadata"]}
    for key, typ, value in ref["metadata"]:
        if key in gmap:
            _, gtyp, gvalue = gmap[key]
            if typ != gtyp:
                diffs.append(f"{key}: type {gtyp}, reference {typ}")
            if value != gvalue:
                diffs.append(f"{key}: value {str(gvalue)[:200]}, reference {str(value)[:200]}")
    rn = [t[0] for t in ref["tensors"]]
    gn = [t[0] for t in got["tensors"]]
    if rn != gn:
        diffs.append(f"tensor names/order differ:\n  reference {rn}\n  kquant    {gn}")
    gt = {t[0]: t for t in got["tensors"]}
    for name, shape, typ, digest in ref["tensors"]:
        if name not in gt:
            continue
        _, gshape, gtyp, gdigest = gt[name]
        if shape != gshape or typ != gtyp:
            diffs.append(f"{name}: {gtyp} {gshape}, reference {typ} {shape}")
        elif digest != gdigest:
            diffs.append(f"{name}: bytes differ")
    return diffs


def check_pre(work: Path, extra: dict[str, Path] | None = None) -> int:
    """Real vocabularies from llama.cpp's ggml-vocab-*.gguf (and `extra`: pre-tokenizer name ->
    a GGUF of a model of that family): the converter's hash naming vs kquant's naming."""
    from gguf import GGUFReader
    from kquant.files.hf_vocab import bpe_pre_tokenizer_name

    pre_sections = {
        "llama-bpe": fixtures._split_pre(fixtures._LLAMA3_RE),
        "qwen2": fixtures._split_pre(fixtures._QWEN2_RE),
        "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "smollm": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    }
    sources = {n: LLAMA_CPP / "models" / f"ggml-vocab-{n}.gguf" for n in ("llama-bpe", "qwen2", "gpt-2")}
    sources.update(extra or {})
    script = r'''
import json, sys
from hashlib import sha256
from transformers import AutoTokenizer
sys.path.insert(0, sys.argv[1])
import conversion.base as base
tok = AutoTokenizer.from_pretrained(sys.argv[2])
print(json.dumps(base.TextModel.get_vocab_base_pre(None, tok)))
'''
    failures = 0
    for name, src in sources.items():
        pre = pre_sections[name]
        r = GGUFReader(str(src))
        tokens = r.fields["tokenizer.ggml.tokens"].contents()
        types = r.fields["tokenizer.ggml.token_type"].contents()
        merges = r.fields["tokenizer.ggml.merges"].contents()
        bos = r.fields["tokenizer.ggml.bos_token_id"].contents() if "tokenizer.ggml.bos_token_id" in r.fields else None
        vocab = {t: i for i, t in enumerate(tokens) if types[i] == 1}
        added = [fixtures._added(i, t, True) for i, t in enumerate(tokens) if types[i] != 1]
        post = None
        if name == "llama-bpe":
            bos_tok = tokens[bos]
            post = {"type": "Sequence", "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": bos_tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {bos_tok: {"id": bos_tok, "ids": [bos], "tokens": [bos_tok]}}}]}
        tj = fixtures._tokenizer_json(vocab, [tuple(m.split(" ")) for m in merges], added, pre, post,
                                      normalizer={"type": "NFC"} if name == "qwen2" else None,
                                      ignore_merges=name == "llama-bpe")
        d = work / f"vocab-{name}"
        d.mkdir(parents=True, exist_ok=True)
        fixtures._write_json(d / "tokenizer.json", tj)
        fixtures._write_json(d / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
        proc = subprocess.run([str(CONVVENV / "bin" / "python"), "-c", script, str(LLAMA_CPP), str(d)],
                              capture_output=True, text=True)
        ref = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else f"error: {proc.stderr[-300:]}"
        ours = bpe_pre_tokenizer_name(tj)
        ok = ref == ours == name
        failures += not ok
        print(f"{'OK ' if ok else 'BAD'} {src.name}: converter {ref!r}, kquant {ours!r}")
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", type=Path)
    ap.add_argument("--outtype", nargs="+", default=["f32", "f16", "bf16"], choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--record", type=Path, default=None, help="write the reference summaries to DIR/<fixture>.json")
    ap.add_argument("--pre", default=None, help="pre-tokenizer name to fall back on for FOLDERs with an unknown hash")
    ap.add_argument("--check-pre", action="store_true", help="check pre-tokenizer naming on llama.cpp's real vocabularies")
    ap.add_argument("--vocab", action="append", default=[], metavar="NAME=GGUF",
                    help="with --check-pre: also a real model's vocabulary, e.g. smollm=SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="kquant-hfref-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.check_pre:
        extra = dict((v.split("=", 1)[0], Path(v.split("=", 1)[1])) for v in args.vocab)
        return 1 if check_pre(work, extra) else 0

    if args.folders:
        folders = {f.name: f for f in args.folders}
    else:
        folders = fixtures.build(work / "fixtures")
    failures = 0
    for name, folder in folders.items():
        pre = args.pre or FIXTURE_PRE.get(name)
        record = {"fixture": name, "converter": "llama.cpp convert_hf_to_gguf.py (llama-cpp-python 0.3.36)"}
        for outtype in args.outtype:
            ref_path = work / f"ref-{name}-{outtype}.gguf"
            got_path = work / f"kq-{name}-{outtype}.gguf"
            fallback, t_ref = run_reference(folder, outtype, ref_path, pre)
            t_kq = run_kquant(folder, outtype, got_path)
            ref, got = fixtures.summarize_gguf(ref_path), fixtures.summarize_gguf(got_path)
            diffs = compare(ref, got)
            same_file = ref["file_sha256"] == got["file_sha256"]
            failures += bool(diffs) or not same_file
            note = f" (pre-tokenizer hash unknown: {pre!r} supplied)" if fallback else ""
            print(f"{'OK ' if not diffs else 'BAD'} {name} {outtype}: {len(ref['metadata'])} keys, "
                  f"{len(ref['tensors'])} tensors, files {'byte-identical' if same_file else 'DIFFER'}; "
                  f"converter {t_ref:.1f} s, kquant {t_kq:.2f} s{note}")
            for d in diffs:
                print("    " + d)
            record[outtype] = ref
            if fallback:
                record["pre_tokenizer_supplied"] = pre
        if args.record:
            args.record.mkdir(parents=True, exist_ok=True)
            (args.record / f"{name}.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
    print(f"{failures} difference(s)" if failures else "all identical")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
