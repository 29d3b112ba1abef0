"""How each architecture's random-weight fixture agrees with llama.cpp: logits and imatrix.

    python tools/arch_agreement.py [--work DIR] [NAME ...]

Builds the fixtures of tests/make_hf_fixtures.py into DIR (default a temporary folder; ones
already there are reused), then for each one prints

* the relative L2 error of kquant's F32 logits (200 random tokens, the HF folder read at
  float32) against llama-cpp-python's on the GGUF kquant-convert writes, as
  tests/test_runtime.py::test_architectures_match_llama_cpp measures it, and
* for every llama-imatrix reference of that fixture in tests/data/imatrix_ref: whether the
  entries and counts are equal, the largest in_sum2 difference as tests/test_imatrix.py
  measures it (each value against itself or 1% of its expert row's largest), and the last
  chunk's perplexity beside llama-imatrix's.

Needs llama-cpp-python (the `interop` extra) and ../shared's texts. The README's
"Architectures" table comes from this script.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

DEFAULT = ["tiny-phi3", "tiny-phi4", "tiny-gemma2", "tiny-gemma3", "tiny-gemma3-vl", "tiny-qwen3moe", "tiny-qwen2moe",
           "tiny-mixtral"]


def logits_error(folder: Path, work: Path) -> float:
    import llama_cpp
    from test_runtime import llama_logits, rel_error, tokens_for

    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model
    from kquant.runtime import Segment, load_model

    gguf_path = work / f"{folder.name}-f32.gguf"
    write_gguf(load_hf_model(folder, "f32"), gguf_path, progress=False)
    model = load_model(folder, progress=False)
    toks = tokens_for(model.config.n_vocab, 200)
    ours = model.forward([Segment(toks, model.new_cache(512))])
    return rel_error(ours, llama_logits(llama_cpp, gguf_path, toks))


def imatrix_agreement(folder: Path, work: Path, ref_name: str, text: str, args: list[str]) -> str:
    from test_imatrix import REF, TEXTS, chunk_ppls

    from kquant.calibration.imatrix_file import load_imatrix
    from kquant.cli.imatrix import main

    out = work / ref_name
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["-m", str(folder), "-f", str(TEXTS / text), "-o", str(out), "-t", "2", "--device", "cpu", *args])
    if rc != 0:
        return f"kquant-imatrix failed (exit {rc})"
    ours, ref = load_imatrix(out), load_imatrix(REF / ref_name)
    same = sorted(ours.entries) == sorted(ref.entries)
    worst = 0.0
    for name, e in ref.entries.items():
        mine = ours.entries.get(name)
        if mine is None:
            continue
        same &= np.array_equal(mine.counts, e.counts)
        zero = e.sums == 0
        rows = np.abs(e.sums.astype(np.float64)).reshape(max(1, e.counts.size), -1)
        scale = np.maximum(rows, 0.01 * rows.max(axis=1, keepdims=True)).ravel()
        rel = np.abs(mine.sums.astype(np.float64) - e.sums)[~zero] / scale[~zero]
        worst = max(worst, float(rel.max()) if rel.size else 0.0)
    ppl_ours = chunk_ppls(printed.getvalue())[-1]
    ppl_ref = chunk_ppls((REF / ref_name).with_suffix(".out").read_text())[-1]
    return (f"{len(ref.entries)} entries, names and counts {'equal' if same else 'DIFFER'}, "
            f"in_sum2 {worst:.1e}, last chunk PPL {ppl_ours:.4f} / {ppl_ref:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", default=DEFAULT)
    ap.add_argument("--work", type=Path, help="folder for the fixtures and outputs (kept)")
    args = ap.parse_args()

    import make_hf_fixtures as fixtures
    from test_imatrix import CASES

    from kquant.runtime import set_threads

    set_threads(2)
    work = args.work or Path(tempfile.mkdtemp(prefix="kquant-arch-"))
    work.mkdir(parents=True, exist_ok=True)
    missing = [n for n in args.names if not (work / n / "config.json").is_file()]
    if missing:
        fixtures.build(work, missing)
    for name in args.names:
        print(f"{name}: logits {logits_error(work / name, work):.1e}", flush=True)
        for ref_name, model, text, im_args in CASES:
            if model == name:
                print(f"  {ref_name}: {imatrix_agreement(work / name, work, ref_name, text, im_args)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
