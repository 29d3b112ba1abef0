"""kquant-quantize against llama.cpp's own llama_model_quantize, whole file byte for byte,
and its handling of bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kquant.quantization import mixes
from kquant.cli.quantize import main as quantize_main
from kquant.files.gguf_read import load_gguf
from kquant.calibration.imatrix_file import Imatrix, ImatrixEntry, save_imatrix_gguf, weights_for_quantize
from kquant.quantization.pipeline import QuantizeOptions, quantize_model

FTYPES = ["Q4_K_M", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q5_K_S", "Q5_K_M", "Q6_K",
          "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S",
          "IQ3_XS", "IQ3_M", "F16", "BF16"]


def reference(inp: Path, out: Path, ftype: str, **kw) -> bytes:
    from kquant.reference.libggml import llama_quantize

    llama_quantize(inp, out, mixes.parse_ftype(ftype), n_threads=2, **kw)
    return out.read_bytes()


def assert_same_file(a: Path, b: bytes) -> None:
    got = a.read_bytes()
    assert len(got) == len(b), f"sizes {len(got)} != {len(b)}"
    if got != b:
        first = next(i for i in range(len(b)) if got[i] != b[i])
        pytest.fail(f"files differ first at byte {first} of {len(b)}")


@pytest.mark.parametrize("ftype", FTYPES)
def test_same_file_as_llama_quantize(llama_cpp, smollm2_f16, tmp_path, ftype):
    want = reference(smollm2_f16, tmp_path / "ref.gguf", ftype)
    quantize_model(smollm2_f16, tmp_path / "kq.gguf", ftype, progress=False)
    assert_same_file(tmp_path / "kq.gguf", want)


def random_imatrix(model: Path, seed: int = 0) -> Imatrix:
    """An imatrix in llama-imatrix's layout for every 2-D weight (output excepted), with
    realistic heavy-tailed sums and a count of 512 tokens x 4 chunks."""
    rng = np.random.default_rng(seed)
    im = Imatrix(datasets=["calibration.txt"], chunk_count=4, chunk_size=512, has_metadata=True)
    for t in load_gguf(model).tensors:
        if len(t.shape) == 2 and t.name != "token_embd.weight":
            sums = (rng.exponential(1.0, t.shape[0]) ** 2 * 2048).astype(np.float32)
            im.entries[t.name[:-len(".weight")] + ".weight"] = ImatrixEntry(sums, np.array([2048]))
    return im


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q2_K", "Q3_K_S", "Q5_K_M", "Q6_K", "Q4_0", "IQ4_NL", "IQ4_XS",
                                   "IQ3_XXS", "IQ3_S", "IQ3_XS", "IQ3_M", "IQ2_XXS", "IQ2_XS", "IQ2_S",
                                   "IQ2_M", "IQ1_S", "IQ1_M"])
def test_same_file_with_imatrix(llama_cpp, smollm2_f16, tmp_path, ftype):
    im = random_imatrix(smollm2_f16)
    path = tmp_path / "imatrix.gguf"
    save_imatrix_gguf(im, path)
    weights = weights_for_quantize(im)
    # the metadata keys llama-quantize's main() adds for the imatrix, as overrides
    overrides = [("quantize.imatrix.file", "str", str(path)),
                 ("quantize.imatrix.dataset", "str", "calibration.txt"),
                 ("quantize.imatrix.entries_count", "int", len(weights)),
                 ("quantize.imatrix.chunks_count", "int", 4)]
    want = reference(smollm2_f16, tmp_path / "ref.gguf", ftype, imatrix=weights,
                     kv_overrides=overrides)
    rc = quantize_main(["--imatrix", str(path), str(smollm2_f16), str(tmp_path / "kq.gguf"),
                        ftype, "2"])
    assert rc == 0
    assert_same_file(tmp_path / "kq.gguf", want)


def test_iq3_xxs_refuses_without_imatrix_as_llama_quantize(llama_cpp, tiny_llama_f32, tmp_path):
    """IQ3_XXS puts the tiny model's attn_k / attn_q in IQ2_S, which needs an imatrix: both
    refuse, naming the same tensor and type (on SmolLM2 no tensor needs one: FTYPES)."""
    from kquant.errors import ModelError

    with pytest.raises(RuntimeError, match="llama_model_quantize failed"):
        reference(tiny_llama_f32, tmp_path / "ref.gguf", "IQ3_XXS")
    with pytest.raises(ModelError, match="blk.0.attn_k.weight: type IQ2_S needs an importance matrix"):
        quantize_model(tiny_llama_f32, tmp_path / "kq.gguf", "IQ3_XXS", progress=False)
    assert not (tmp_path / "kq.gguf").exists()


TINY_IQ = [("IQ3_S", False), ("IQ3_S", True), ("IQ3_XS", False), ("IQ3_XS", True), ("IQ3_M", False),
           ("IQ3_M", True), ("IQ3_XXS", True), ("IQ2_XXS", False), ("IQ2_XXS", True), ("IQ2_XS", True),
           ("IQ2_S", False), ("IQ2_S", True), ("IQ2_M", True)]
#: the first tensor whose type llama-quantize wants an imatrix for (tensor_type_requires_imatrix)
NEEDS_IMATRIX = {"IQ3_XS": "blk.0.attn_k.weight: type IQ3_XXS",
                 "IQ2_XXS": "blk.0.attn_k.weight: type IQ2_XXS",
                 "IQ2_S": "blk.0.attn_k.weight: type IQ2_XS"}


@pytest.mark.parametrize("ftype, with_imatrix", TINY_IQ,
                         ids=[f"{f}-{'imatrix' if i else 'no-imatrix'}" for f, i in TINY_IQ])
def test_tiny_model_iq_files(llama_cpp, tiny_llama_f32, tmp_path, ftype, with_imatrix):
    """The tiny model's rows are multiples of 256, so the IQ3 / IQ2 types reach every matrix
    (SmolLM2's 576-wide ones fall back to IQ4_NL): the same file as llama-quantize, or the same
    refusal (the types that need an imatrix: IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S)."""
    args, kw = [], {}
    if with_imatrix:
        im = random_imatrix(tiny_llama_f32)
        path = tmp_path / "imatrix.gguf"
        save_imatrix_gguf(im, path)
        weights = weights_for_quantize(im)
        kw = dict(imatrix=weights, kv_overrides=[
            ("quantize.imatrix.file", "str", str(path)),
            ("quantize.imatrix.dataset", "str", "calibration.txt"),
            ("quantize.imatrix.entries_count", "int", len(weights)),
            ("quantize.imatrix.chunks_count", "int", 4)])
        args = ["--imatrix", str(path)]
    argv = [*args, str(tiny_llama_f32), str(tmp_path / "kq.gguf"), ftype, "2"]
    if ftype in NEEDS_IMATRIX and not with_imatrix:
        with pytest.raises(RuntimeError, match="llama_model_quantize failed"):
            reference(tiny_llama_f32, tmp_path / "ref.gguf", ftype, **kw)
        assert_fails_cleanly(argv, tmp_path / "kq.gguf", f"{NEEDS_IMATRIX[ftype]} needs an importance matrix")
        return
    want = reference(tiny_llama_f32, tmp_path / "ref.gguf", ftype, **kw)
    assert quantize_main(argv) == 0
    assert_same_file(tmp_path / "kq.gguf", want)


def _imatrix_args(model: Path, tmp_path: Path) -> tuple[list[str], dict]:
    """kquant-quantize's --imatrix and llama_model_quantize's weights and metadata for one
    random imatrix of the model."""
    im = random_imatrix(model)
    path = tmp_path / "imatrix.gguf"
    save_imatrix_gguf(im, path)
    weights = weights_for_quantize(im)
    return ["--imatrix", str(path)], dict(imatrix=weights, kv_overrides=[
        ("quantize.imatrix.file", "str", str(path)),
        ("quantize.imatrix.dataset", "str", "calibration.txt"),
        ("quantize.imatrix.entries_count", "int", len(weights)),
        ("quantize.imatrix.chunks_count", "int", 4)])


@pytest.mark.parametrize("ftype", ["IQ1_S", "IQ1_M"])
def test_iq1_refuses_without_imatrix_as_llama_quantize(llama_cpp, smollm2_f16, tmp_path, ftype):
    """Both refuse before writing, naming SmolLM2's first IQ1 tensor (ffn_down: its 1536-value
    rows are the only ones that do not fall back to IQ4_NL)."""
    with pytest.raises(RuntimeError, match="llama_model_quantize failed"):
        reference(smollm2_f16, tmp_path / "ref.gguf", ftype)
    assert_fails_cleanly([str(smollm2_f16), str(tmp_path / "kq.gguf"), ftype], tmp_path / "kq.gguf",
                         f"blk.0.ffn_down.weight: type {ftype} needs an importance matrix")


def test_tiny_model_iq1_type_overrides(llama_cpp, tiny_llama_f32, tmp_path):
    """IQ1_S and IQ1_M in every matrix of the tiny model (rows of multiples of 256) through
    --tensor-type, --token-embedding-type and --output-tensor-type, with an imatrix: the same
    file as llama-quantize. token_embd and output have no imatrix entry, so IQ1_M quantizes
    them with x^2 weights (IQ1_S would abort ggml there: llama-quantize does not check)."""
    from gguf import GGMLQuantizationType as T

    args, kw = _imatrix_args(tiny_llama_f32, tmp_path)
    want = reference(tiny_llama_f32, tmp_path / "ref.gguf", "Q4_K_M",
                     token_embedding_type=int(T.IQ1_M), output_tensor_type=int(T.IQ1_M),
                     tensor_types=[("ffn_down", int(T.IQ1_S)), ("attn_[qk]", int(T.IQ1_S)),
                                   ("attn|ffn", int(T.IQ1_M))], **kw)
    argv = [*args, "--token-embedding-type", "iq1_m", "--output-tensor-type", "iq1_m",
            "--tensor-type", "ffn_down=iq1_s", "--tensor-type", "attn_[qk]=iq1_s",
            "--tensor-type", "attn|ffn=iq1_m", str(tiny_llama_f32), str(tmp_path / "kq.gguf"),
            "Q4_K_M", "2"]
    assert quantize_main(argv) == 0
    types = {t.name: t.type for t in load_gguf(tmp_path / "kq.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == T.IQ1_S and types["blk.0.attn_v.weight"] == T.IQ1_M
    assert types["token_embd.weight"] == T.IQ1_M
    assert_same_file(tmp_path / "kq.gguf", want)


def test_iq1_s_without_weights_is_refused(tiny_llama_f32, tmp_path):
    """token_embd in IQ1_S: llama-quantize skips the imatrix check for it, finds no entry and
    passes no weights, and ggml aborts (GGML_ASSERT in ggml_quantize_chunk); kquant refuses
    before writing."""
    args, _ = _imatrix_args(tiny_llama_f32, tmp_path)
    assert_fails_cleanly([*args, "--token-embedding-type", "iq1_s", str(tiny_llama_f32),
                          str(tmp_path / "kq.gguf"), "Q4_K_M"], tmp_path / "kq.gguf",
                         "token_embd.weight: type IQ1_S needs importance weights")


@pytest.mark.parametrize("ftype", ["IQ1_S", "IQ1_M"])
def test_tiny_model_iq1_files(llama_cpp, tiny_llama_f32, tmp_path, ftype):
    """The whole IQ1_S / IQ1_M mixes on the tiny model, with an imatrix: they also pick IQ2_XXS
    (attn_output) and Q2_K, so this waits for the IQ2 codecs."""
    pytest.importorskip("kquant.codecs.iq2")
    args, kw = _imatrix_args(tiny_llama_f32, tmp_path)
    want = reference(tiny_llama_f32, tmp_path / "ref.gguf", ftype, **kw)
    assert quantize_main([*args, str(tiny_llama_f32), str(tmp_path / "kq.gguf"), ftype, "2"]) == 0
    assert_same_file(tmp_path / "kq.gguf", want)


def test_options_match_llama_quantize(llama_cpp, smollm2_f16, tmp_path):
    from gguf import GGMLQuantizationType as T

    want = reference(smollm2_f16, tmp_path / "ref.gguf", "Q4_K_M", pure=True,
                     leave_output_tensor=True, token_embedding_type=int(T.Q5_1),
                     kv_overrides=[("general.name", "str", "renamed"),
                                   ("llama.context_length", "int", 4096)])
    rc = quantize_main(["--pure", "--leave-output-tensor", "--token-embedding-type", "q5_1",
                        "--override-kv", "general.name=str:renamed",
                        "--override-kv", "llama.context_length=int:4096",
                        str(smollm2_f16), str(tmp_path / "kq.gguf"), "Q4_K_M"])
    assert rc == 0
    assert_same_file(tmp_path / "kq.gguf", want)


def test_type_overrides_and_imatrix_filters(llama_cpp, smollm2_f16, tmp_path):
    """--tensor-type (file and option), --output-tensor-type, --exclude-weights, as
    llama-quantize passes them to the library."""
    from gguf import GGMLQuantizationType as T

    im = random_imatrix(smollm2_f16)
    save_imatrix_gguf(im, tmp_path / "im.gguf")
    weights = {k: v for k, v in weights_for_quantize(im).items() if "ffn_up" not in k}
    overrides = [("quantize.imatrix.file", "str", str(tmp_path / "im.gguf")),
                 ("quantize.imatrix.dataset", "str", "calibration.txt"),
                 ("quantize.imatrix.entries_count", "int", len(weights)),
                 ("quantize.imatrix.chunks_count", "int", 4)]
    want = reference(smollm2_f16, tmp_path / "ref.gguf", "Q4_K_M", imatrix=weights,
                     kv_overrides=overrides, output_tensor_type=int(T.Q8_0),
                     tensor_types=[("attn_v", int(T.Q8_0)), ("blk\\.1\\.ffn_down", int(T.Q5_K))])
    (tmp_path / "types.txt").write_text("blk\\.1\\.ffn_down=q5_K\n")
    rc = quantize_main(["--imatrix", str(tmp_path / "im.gguf"), "--exclude-weights", "ffn_up",
                        "--output-tensor-type", "q8_0", "--tensor-type", "attn_v=q8_0",
                        "--tensor-type-file", str(tmp_path / "types.txt"),
                        str(smollm2_f16), str(tmp_path / "kq.gguf"), "Q4_K_M"])
    assert rc == 0
    assert_same_file(tmp_path / "kq.gguf", want)


def test_llama_cpp_runs_the_output(llama_cpp, smollm2_f16, tmp_path):
    """llama.cpp loads kquant's file and its logits stay close to the F16 model's."""
    out = tmp_path / "q8.gguf"
    quantize_model(smollm2_f16, out, "Q8_0", progress=False)

    def logits(path: Path) -> np.ndarray:
        llm = llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=64, n_threads=2)
        tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog.")
        llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)])

    ref, got = logits(smollm2_f16), logits(out)
    assert np.isfinite(got).all()
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 0.05, f"Q8_0 logits differ from F16 by {rel:.3f} (relative)"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


def test_prune_layers_and_dry_run(smollm2_f16, tmp_path, capsys):
    rc = quantize_main(["--dry-run", str(smollm2_f16), "Q4_K_M"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "blk.1.ffn_down.weight" in printed and "dry run" in printed
    assert not list(tmp_path.iterdir())
    out = tmp_path / "pruned.gguf"
    assert quantize_main(["--prune-layers", "0", str(smollm2_f16), str(out), "Q8_0"]) == 0
    m = load_gguf(out)
    assert m.get("llama.block_count") == 1
    assert {t.name for t in m.tensors if t.name.startswith("blk.")} == \
        {t.name.replace("blk.1.", "blk.0.") for t in load_gguf(smollm2_f16).tensors
         if t.name.startswith("blk.1.")}


def write_split(model: Path, folder: Path) -> Path:
    """The model as two split files, as gguf-split writes them (split keys after the rest)."""
    from gguf import GGUFValueType as V

    from kquant.files.gguf_write import write_gguf
    from kquant.files.source import KV, ModelSource

    src = load_gguf(model)
    halves = [src.tensors[: len(src.tensors) // 2], src.tensors[len(src.tensors) // 2:]]
    for i, tensors in enumerate(halves):
        kv = list(src.kv) + [KV("split.no", i, V.UINT16), KV("split.count", 2, V.UINT16),
                             KV("split.tensors.count", len(src.tensors), V.INT32)]
        write_gguf(ModelSource(src.arch, kv, tensors), folder / f"m-{i + 1:05d}-of-00002.gguf",
                   progress=False)
    return folder / "m-00001-of-00002.gguf"


def test_split_input_and_keep_split(llama_cpp, smollm2_f16, tmp_path):
    first = write_split(smollm2_f16, tmp_path)
    # one output from a split input: the same file as from the unsplit model
    quantize_model(first, tmp_path / "one.gguf", "Q4_K_M", progress=False)
    quantize_model(smollm2_f16, tmp_path / "whole.gguf", "Q4_K_M", progress=False)
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    # --keep-split: split outputs, byte-identical to llama.cpp's
    from kquant.reference.libggml import llama_quantize

    # llama-quantize's main() strips ".gguf" before the library adds -0000i-of-0000n.gguf
    llama_quantize(first, tmp_path / "ref", mixes.parse_ftype("Q4_K_M"), keep_split=True)
    assert quantize_main(["--keep-split", str(first), str(tmp_path / "kq.gguf"), "Q4_K_M"]) == 0
    for i in (1, 2):
        name = f"-{i:05d}-of-00002.gguf"
        assert_same_file(tmp_path / f"kq{name}", (tmp_path / f"ref{name}").read_bytes())


# ---- bad input: one clear line on stderr, exit code 1, no output file -------------------

def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kquant.cli.quantize", *args],
                          capture_output=True, text=True, timeout=300)


def assert_fails_cleanly(args: list[str], out: Path, message: str) -> None:
    r = run_cli(args)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary file left


def test_truncated_gguf(smollm2_f16, tmp_path):
    bad = tmp_path / "truncated.gguf"
    data = smollm2_f16.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    assert_fails_cleanly([str(bad), str(tmp_path / "o.gguf"), "Q4_K_M"], tmp_path / "o.gguf",
                         "truncated")
    bad.write_bytes(data[:1000])
    assert_fails_cleanly([str(bad), str(tmp_path / "o.gguf"), "Q4_K_M"], tmp_path / "o.gguf",
                         "truncated or corrupt")


def test_output_equal_to_input(smollm2_f16, tmp_path):
    before = smollm2_f16.stat().st_mtime_ns
    r = run_cli([str(smollm2_f16), str(smollm2_f16), "Q4_K_M"])
    assert r.returncode == 1 and "is also an input" in r.stderr
    assert smollm2_f16.stat().st_mtime_ns == before


def test_unknown_type(smollm2_f16, tmp_path):
    assert_fails_cleanly([str(smollm2_f16), str(tmp_path / "o.gguf"), "Q9_Z"],
                         tmp_path / "o.gguf", "Q9_Z")


def test_rows_not_divisible_by_the_block(smollm2_f16, tmp_path):
    """An explicit type gets no fallback (as in llama.cpp): 576-wide rows cannot be Q6_K."""
    assert_fails_cleanly(["--token-embedding-type", "q6_K", str(smollm2_f16),
                          str(tmp_path / "o.gguf"), "Q8_0"], tmp_path / "o.gguf",
                         "token_embd.weight: rows of 576 values are not a multiple of Q6_K")


def test_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_fails_cleanly([str(tmp_path / "notes.txt"), str(tmp_path / "o.gguf"), "Q4_K_M"],
                         tmp_path / "o.gguf", "neither a GGUF file nor")


def test_imatrix_of_another_model(smollm2_f16, tmp_path):
    im = random_imatrix(smollm2_f16)
    im.entries["blk.7.attn_q.weight"] = ImatrixEntry(np.ones(576, np.float32), np.array([1]))
    save_imatrix_gguf(im, tmp_path / "other.gguf")
    assert_fails_cleanly(["--imatrix", str(tmp_path / "other.gguf"), str(smollm2_f16),
                          str(tmp_path / "o.gguf"), "Q4_K_M"], tmp_path / "o.gguf",
                         "blk.7.attn_q.weight")
    im = random_imatrix(smollm2_f16)
    im.entries["blk.0.ffn_down.weight"].sums = np.ones(100, np.float32)
    save_imatrix_gguf(im, tmp_path / "short.gguf")
    assert_fails_cleanly(["--imatrix", str(tmp_path / "short.gguf"), str(smollm2_f16),
                          str(tmp_path / "o.gguf"), "Q4_K_M"], tmp_path / "o.gguf",
                         "blk.0.ffn_down.weight has 100 values")
    im = random_imatrix(smollm2_f16)
    im.entries["blk.0.ffn_up.weight"].sums[3] = np.nan
    save_imatrix_gguf(im, tmp_path / "nan.gguf")
    assert_fails_cleanly(["--imatrix", str(tmp_path / "nan.gguf"), str(smollm2_f16),
                          str(tmp_path / "o.gguf"), "Q4_K_M"], tmp_path / "o.gguf",
                         "non-finite")


def test_nan_in_weights(smollm2_f16, tmp_path):
    """A NaN in the weights stops the job with the tensor named, and no output is left."""
    from gguf import GGMLQuantizationType as T

    from kquant.files.gguf_write import write_gguf
    from kquant.files.source import ModelSource, SourceTensor

    src = load_gguf(smollm2_f16)
    tensors = []
    for t in src.tensors:
        if t.name == "blk.1.ffn_up.weight":
            data = np.array(t.load()).view(np.float16).copy()
            data[5] = np.nan
            t = SourceTensor(t.name, t.shape, T.F16, lambda d=data: d)
        tensors.append(t)
    bad = tmp_path / "nan.gguf"
    write_gguf(ModelSource(src.arch, src.kv, tensors), bad, progress=False)
    assert_fails_cleanly([str(bad), str(tmp_path / "o.gguf"), "Q4_K_M"], tmp_path / "o.gguf",
                         "tensor 'blk.1.ffn_up.weight' has invalid data: non-finite")


def test_requantize_needs_the_flag(tmp_path, smollm2_f16):
    q = tmp_path / "q8.gguf"
    quantize_model(smollm2_f16, q, "Q8_0", progress=False)
    assert_fails_cleanly([str(q), str(tmp_path / "o.gguf"), "Q4_K_M"], tmp_path / "o.gguf",
                         "--allow-requantize")
    opts = QuantizeOptions(allow_requantize=True)
    quantize_model(q, tmp_path / "o.gguf", "Q4_K_M", opts, progress=False)
    assert (tmp_path / "o.gguf").stat().st_size > 0


# ---- Hugging Face folders in one step ---------------------------------------------------

@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    import make_hf_fixtures as fixtures

    if not fixtures.DEFAULT_TEXT.is_file():
        pytest.skip(f"training text {fixtures.DEFAULT_TEXT} (shared/) not available")
    return fixtures.build(tmp_path_factory.mktemp("hf"),
                          ONE_STEP)


# the HF fixtures quantized in one step (MoE ones: 3-D expert tensors quantized per expert)
ONE_STEP = ["tiny-llama-spm", "tiny-mistral-spm", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-gemma2",
            "tiny-phi4", "tiny-gemma3", "tiny-gemma3-vl", "tiny-qwen3moe", "tiny-qwen2moe", "tiny-mixtral"]


@pytest.mark.parametrize("name", ONE_STEP)
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q6_K"])
def test_hf_folder_in_one_step(llama_cpp, hf_folders, tmp_path, name, ftype):
    """kquant-quantize on a folder = convert_hf_to_gguf (f16, its default) + llama-quantize."""
    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model

    f16 = write_gguf(load_hf_model(hf_folders[name], "f16"), tmp_path / "f16.gguf", progress=False)
    want = reference(f16, tmp_path / "ref.gguf", ftype)
    assert quantize_main([str(hf_folders[name]), str(tmp_path / "kq.gguf"), ftype]) == 0
    assert_same_file(tmp_path / "kq.gguf", want)


# MoE fixtures and their llama-imatrix references (tests/data/imatrix_ref)
MOE_IMATRIX = [("tiny-qwen3moe", "tiny-qwen3moe.c128.gguf"), ("tiny-qwen2moe", "tiny-qwen2moe.c128.dat"),
               ("tiny-mixtral", "tiny-mixtral.c128.gguf"),
               ("tiny-mixtral", "tiny-mixtral.c64.gguf")]  # partial: unrouted experts weigh 1


@pytest.mark.parametrize("name, ref_imatrix", MOE_IMATRIX)
def test_moe_with_llama_imatrix(llama_cpp, hf_fixture_gguf, tmp_path, name, ref_imatrix):
    """Q4_K_M with llama-imatrix's own file for a MoE fixture: per-expert importance (in_sum2
    [n_embd, n_expert] over each expert's count) for each expert's slab, as llama-quantize."""
    from kquant.calibration.imatrix_file import load_imatrix

    f32 = hf_fixture_gguf(name)
    path = Path(__file__).parent / "data" / "imatrix_ref" / ref_imatrix
    im = load_imatrix(path)
    weights = weights_for_quantize(im)
    assert any("_exps." in n for n in im.entries)  # per-expert entries (GGUF: one count each)
    overrides = [("quantize.imatrix.file", "str", str(path)),
                 ("quantize.imatrix.dataset", "str", im.datasets[-1]),
                 ("quantize.imatrix.entries_count", "int", len(weights)),
                 ("quantize.imatrix.chunks_count", "int", im.chunk_count)]
    want = reference(f32, tmp_path / "ref.gguf", "Q4_K_M", imatrix=weights, kv_overrides=overrides)
    assert quantize_main(["--imatrix", str(path), str(f32), str(tmp_path / "kq.gguf"), "Q4_K_M"]) == 0
    assert_same_file(tmp_path / "kq.gguf", want)


def test_copy(llama_cpp, smollm2_f16, tmp_path):
    """COPY: every tensor as it is, general.file_type from the input, as llama-quantize."""
    from kquant.reference.libggml import llama_quantize

    llama_quantize(smollm2_f16, tmp_path / "ref.gguf", 0, only_copy=True)
    assert quantize_main([str(smollm2_f16), str(tmp_path / "kq.gguf"), "COPY"]) == 0
    assert_same_file(tmp_path / "kq.gguf", (tmp_path / "ref.gguf").read_bytes())


# ---- llama.cpp runs what kquant wrote from the project's own Hugging Face model ---------

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny-llama"
TEXT = b"It was a bright cold day in April, and the clocks were striking thirteen."
# relative RMS distance of the logits from the F32 model's: about 2.5x what each type gives
# on this model (measured: Q8_0 0.0056, Q6_K 0.013, Q5_K_M 0.017, Q4_K_M 0.029, Q3_K_M
# 0.049), so a broken tensor or a wrong type fails
LOGIT_TOLERANCE = {"Q8_0": 0.015, "Q6_K": 0.03, "Q5_K_M": 0.04, "Q4_K_M": 0.07, "Q3_K_M": 0.12}


@pytest.fixture(scope="module")
def tiny_f32_logits(llama_cpp, tmp_path_factory):
    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model

    f32 = write_gguf(load_hf_model(TINY, "f32"), tmp_path_factory.mktemp("tiny") / "f32.gguf",
                     progress=False)
    return logits_of(llama_cpp, f32)


def logits_of(lc, path: Path) -> np.ndarray:
    llm = lc.Llama(str(path), logits_all=True, verbose=False, n_ctx=64, n_threads=2)
    tokens = llm.tokenize(TEXT)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)])


@pytest.mark.parametrize("ftype", list(LOGIT_TOLERANCE))
def test_llama_cpp_runs_tiny_model_from_hf_folder(llama_cpp, tiny_f32_logits, tmp_path, ftype):
    out = tmp_path / f"tiny-{ftype}.gguf"
    assert quantize_main([str(TINY), str(out), ftype]) == 0
    got = logits_of(llama_cpp, out)
    rel = np.sqrt(((got - tiny_f32_logits) ** 2).mean() / (tiny_f32_logits ** 2).mean())
    assert rel < LOGIT_TOLERANCE[ftype], f"{ftype}: logits {rel:.3f} from F32"
    print(f"{ftype}: relative logit distance {rel:.4f}")


def test_truncated_safetensors(tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    assert_fails_cleanly([str(folder), str(tmp_path / "o.gguf"), "Q4_K_M"], tmp_path / "o.gguf",
                         "model.safetensors")


def test_unknown_architecture(tmp_path):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert_fails_cleanly([str(folder), str(tmp_path / "o.gguf"), "Q4_K_M"], tmp_path / "o.gguf",
                         "MambaForCausalLM")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_fails_cleanly([str(tmp_path / "empty"), str(tmp_path / "o.gguf"), "Q4_K_M"],
                         tmp_path / "o.gguf", "config.json")


def test_moe_refuses_gptq(hf_fixture_gguf, tmp_path, capsys):
    """--method gptq (one-shot or sequential) has no sweep for stacked experts: one error,
    before any calibration pass."""
    f32 = hf_fixture_gguf("tiny-mixtral")
    text = Path(__file__).resolve().parents[2] / "shared" / "text" / "calibration" / "pg84.txt"
    for extra in ([], ["--gptq-one-shot"]):
        rc = quantize_main(["--method", "gptq", "--calibrate", str(text), *extra, str(f32),
                            str(tmp_path / "g.gguf"), "Q4_K_M"])
        assert rc == 1
        assert "--method gptq does not support mixture-of-experts models (llama, 8 experts)" in capsys.readouterr().err
    assert not (tmp_path / "g.gguf").exists()
