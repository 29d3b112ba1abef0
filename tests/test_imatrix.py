"""kquant-imatrix against llama-imatrix: reference files made once by llama-imatrix
(tests/data/imatrix_ref, with the commands in its README) and the command's behaviour."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from kquant.cli.imatrix import main
from kquant.calibration.imatrix_file import Imatrix, load_imatrix

ROOT = Path(__file__).resolve().parents[1]
REF = Path(__file__).parent / "data" / "imatrix_ref"
TEXTS = ROOT.parent / "shared" / "text" / "calibration"
TINY_HF = ROOT / "data" / "tiny-llama"


@pytest.fixture(scope="module", autouse=True)
def _texts():
    if not TEXTS.is_dir():
        pytest.skip(f"calibration texts ({TEXTS}) not available")


def chunk_ppls(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\[\d+\]([\d.]+),", text)]


def assert_close_to_reference(ours: Imatrix, ref: Imatrix, rtol: float = 1e-3) -> None:
    assert sorted(ours.entries) == sorted(ref.entries)
    assert (ours.chunk_count, ours.chunk_size) == (ref.chunk_count, ref.chunk_size)
    assert [Path(d).name for d in ours.datasets] == [Path(d).name for d in ref.datasets]
    for name, e in ref.entries.items():
        mine = ours.entries[name]
        np.testing.assert_array_equal(mine.counts, e.counts, err_msg=name)
        # an expert no token was routed to holds zeros (llama-imatrix writes partial entries)
        zero = e.sums == 0
        assert not mine.sums[zero].any(), name
        # each value relative to itself, or to 1% of its row's (its expert's) largest: an expert
        # that saw a few tokens can have a column summing to almost nothing, where float order
        # alone moves the last digits by more than rtol of it
        rows = np.abs(e.sums.astype(np.float64)).reshape(max(1, e.counts.size), -1)
        scale = np.maximum(rows, 0.01 * rows.max(axis=1, keepdims=True)).ravel()
        rel = np.abs(mine.sums.astype(np.float64) - e.sums)[~zero] / scale[~zero]
        assert rel.max() < rtol, (name, rel.max())


# (reference file, model fixture or the HF folder, text, arguments): tests/data/imatrix_ref/README.md
CASES = [
    ("tiny-llama.c128.gguf", "hf", "pg84.txt", ["-c", "128", "--chunks", "6", "--process-output"]),
    ("smollm2-2l.c256b128.from2.dat", "smollm2", "pg1342.txt",
     ["--output-format", "dat", "-c", "256", "-b", "128", "--chunks", "3", "--from-chunk", "2"]),
    ("smollm2-2l.c512.gguf", "smollm2", "pg1342.txt", ["--chunks", "4"]),
    # phi3: fused attn_qkv and ffn_up entries, long rope factors
    ("tiny-phi3.c512.gguf", "tiny-phi3", "pg84.txt", ["-c", "512", "--chunks", "3", "--process-output"]),
    # phi4 (Phi-4-mini's layout): tied output, so no output.weight entry; GPT-4o's pre-tokenizer
    ("tiny-phi4.c128.gguf", "tiny-phi4", "pg84.txt", ["-c", "128", "--chunks", "4", "--process-output"]),
    # gemma2: sliding window, soft-capping; a tied output, so no output.weight entry
    ("tiny-gemma2.c128.gguf", "tiny-gemma2", "pg84.txt", ["-c", "128", "--chunks", "4", "--process-output"]),
    # gemma3: Q/K norms, two rope bases (-vl: linear scaling on the global layer), tied output
    ("tiny-gemma3.c128.gguf", "tiny-gemma3", "pg84.txt", ["-c", "128", "--chunks", "4", "--process-output"]),
    ("tiny-gemma3-vl.c128.gguf", "tiny-gemma3-vl", "pg84.txt", ["-c", "128", "--chunks", "4", "--process-output"]),
    # qwen3moe: per-expert in_sum2 [n_embd, 8] and counts (ggml_mul_mat_id), the router's entry
    ("tiny-qwen3moe.c128.gguf", "tiny-qwen3moe", "pg84.txt", ["-c", "128", "--chunks", "4", "--process-output"]),
    # qwen2moe in the legacy layout: values per expert over its own count; the shared expert's
    # gate (ffn_gate_inp_shexp, one output row) has an entry of its own
    ("tiny-qwen2moe.c128.dat", "tiny-qwen2moe", "pg84.txt",
     ["--output-format", "dat", "-c", "128", "--chunks", "4", "--process-output"]),
    # mixtral: a llama with 8 experts of n_ff rows
    ("tiny-mixtral.c128.gguf", "tiny-mixtral", "pg84.txt", ["-c", "128", "--chunks", "4", "--process-output"]),
    # one 64-token chunk leaves an expert of each block unrouted: partial entries, written with
    # zero sums and count (GGUF) or 1 * ncall (.dat) for it, as llama-imatrix writes them
    ("tiny-mixtral.c64.gguf", "tiny-mixtral", "pg84.txt", ["-c", "64", "--chunks", "1"]),
    ("tiny-mixtral.c64.dat", "tiny-mixtral", "pg84.txt", ["--output-format", "dat", "-c", "64", "--chunks", "1"]),
]


@pytest.mark.parametrize("ref_name, model, text, args", CASES, ids=[c[0] for c in CASES])
def test_matches_llama_imatrix(request, tmp_path, capsys, ref_name, model, text, args):
    model_path = (TINY_HF if model == "hf" else request.getfixturevalue("smollm2_2l_f32") if model == "smollm2"
                  else request.getfixturevalue("hf_fixture")(model))
    out = tmp_path / ref_name
    rc = main(["-m", str(model_path), "-f", str(TEXTS / text), "-o", str(out), "-t", "2",
               "--device", "cpu", *args])
    printed = capsys.readouterr().out
    assert rc == 0
    assert_close_to_reference(load_imatrix(out), load_imatrix(REF / ref_name))
    ref_ppl = chunk_ppls((REF / ref_name).with_suffix(".out").read_text())
    np.testing.assert_allclose(chunk_ppls(printed), ref_ppl, rtol=1e-4)
    assert "Final estimate: PPL = " in printed


@pytest.mark.slow
def test_quantizes_like_llama_imatrix_output(tmp_path, tiny_llama_f32, capsys):
    """kquant-imatrix's file quantizes to what llama-imatrix's does, but for roundings moved by
    float order (kquant-quantize is byte-identical to llama-quantize: test_quantize_model)."""
    from kquant import QuantizeOptions, quantize_model
    from kquant.quantization.mixes import parse_ftype

    ours = tmp_path / "ours.gguf"
    assert main(["-m", str(tiny_llama_f32), "-f", str(TEXTS / "pg84.txt"), "-o", str(ours), "-c", "128",
                 "--chunks", "6", "--process-output", "-t", "2", "--device", "cpu"]) == 0
    outs = {}
    for tag, im in (("ours", ours), ("ref", REF / "tiny-llama.c128.gguf")):
        outs[tag] = tmp_path / f"q-{tag}.gguf"
        quantize_model(tiny_llama_f32, outs[tag], parse_ftype("Q4_K_M"), QuantizeOptions(imatrix=str(im)),
                       progress=False)
    from gguf import GGUFReader

    ra, rb = GGUFReader(outs["ours"]), GGUFReader(outs["ref"])
    ref_tensors = {t.name: t for t in rb.tensors}
    rows = differ = 0
    for t in ra.tensors:
        x = np.asarray(t.data).view(np.uint8).reshape(t.data.shape[0], -1)
        y = np.asarray(ref_tensors[t.name].data).view(np.uint8).reshape(x.shape[0], -1)
        assert x.shape == y.shape and t.tensor_type == ref_tensors[t.name].tensor_type
        rows += x.shape[0]
        differ += int((x != y).any(axis=1).sum())
    # a row differs where a near-tie in the scale search flips with the last digits of a weight
    assert differ < 0.02 * rows, (differ, rows)


def test_in_file_continues_a_run(tmp_path, tiny_llama_f32, capsys):
    """2 chunks, then --in-file that + --from-chunk 2 --chunks 1: the 3-chunk imatrix."""
    common = ["-m", str(tiny_llama_f32), "-f", str(TEXTS / "pg84.txt"), "-c", "128", "-t", "2", "--device", "cpu"]
    whole, first, rest = tmp_path / "whole.gguf", tmp_path / "first.gguf", tmp_path / "rest.gguf"
    assert main([*common, "-o", str(whole), "--chunks", "3", "-b", "128"]) == 0
    assert main([*common, "-o", str(first), "--chunks", "2", "-b", "128"]) == 0
    assert main([*common, "-o", str(rest), "--chunks", "1", "--from-chunk", "2", "-b", "128",
                 "--in-file", str(first)]) == 0
    a, b = load_imatrix(rest), load_imatrix(whole)
    assert a.chunk_count == b.chunk_count == 3 and len(a.datasets) == 2
    for name, e in b.entries.items():
        np.testing.assert_array_equal(a.entries[name].counts, e.counts)
        np.testing.assert_allclose(a.entries[name].sums, e.sums, rtol=1e-5)


def test_combine_convert_and_statistics(tmp_path, capsys):
    dat = tmp_path / "c.dat"
    assert main(["--in-file", str(REF / "smollm2-2l.c512.gguf"), "--output-format", "dat", "-o", str(dat)]) == 0
    back = tmp_path / "back.gguf"
    assert main(["--in-file", str(dat), "-o", str(back)]) == 0
    a, b = load_imatrix(back), load_imatrix(REF / "smollm2-2l.c512.gguf")
    assert sorted(a.entries) == sorted(b.entries) and a.chunk_count == b.chunk_count
    for name, e in b.entries.items():
        np.testing.assert_allclose(a.entries[name].sums, e.sums, rtol=1e-6)
    capsys.readouterr()
    assert main(["--show-statistics", "--in-file", str(REF / "smollm2-2l.c512.gguf")]) == 0
    err = capsys.readouterr().err
    assert "Computing statistics for" in err and "attn_q" in err and "Computing weighted average" in err


def test_periodic_saves(tmp_path, tiny_llama_f32, capsys):
    """--output-frequency / --save-frequency fire when a count crosses a chunk boundary, as
    llama-imatrix's collector does: 6 sequences of 128 tokens in ubatches of 6 x 85 and 6 x 43
    tokens reach chunk 3 and then chunk 6."""
    out = tmp_path / "im.gguf"
    assert main(["-m", str(tiny_llama_f32), "-f", str(TEXTS / "pg84.txt"), "-o", str(out), "-c", "128",
                 "--chunks", "6", "--save-frequency", "3", "-t", "2", "--device", "cpu"]) == 0
    at = sorted(p.name for p in tmp_path.glob("im.gguf.at_*"))
    assert at == ["im.gguf.at_3", "im.gguf.at_6"]
    assert load_imatrix(tmp_path / "im.gguf.at_3").chunk_count == 3


def test_array_module_path_collects_the_same(tiny_llama_f32):
    """The CuPy code path (run here on a numpy stand-in) accumulates what the Numba path does."""
    from test_runtime import _NumpyStandIn

    from kquant.calibration.imatrix import Collector, ImatrixParams, compute_imatrix
    from kquant.files.text import read_text
    from kquant.models import open_model
    from kquant.runtime import Transformer
    from kquant.tokenizer import Tokenizer

    source = open_model(tiny_llama_f32, "f32")
    tok = Tokenizer.from_source(source)
    tokens = tok.tokenize(read_text(TEXTS / "pg84.txt"))[:1024]
    params = ImatrixParams(n_ctx=128, n_chunks=4, output_frequency=0)
    results = []
    for xp in (None, _NumpyStandIn()):
        model = Transformer(source, "cpu", progress=False, xp=xp)
        collector = Collector(params, Imatrix(), model.xp)
        results.append(compute_imatrix(model, tokens, params, collector, tok.bos_id, progress=False,
                                       log=lambda s: None))
    a, b = results
    assert a.chunk_ppl == pytest.approx(b.chunk_ppl, rel=1e-5)
    for name, e in a.imatrix.entries.items():
        # the array path rounds RoPE and exp without ggml's fused multiply-adds: float order only
        np.testing.assert_allclose(b.imatrix.entries[name].sums, e.sums, rtol=1e-3)
        np.testing.assert_array_equal(b.imatrix.entries[name].counts, e.counts)


# --- bad input: one clear error, exit 1, files saved before intact ----------------------------

def run_error(capsys, args: list[str]) -> str:
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kquant-imatrix: error: ")
    return err[-1]


def test_text_too_short(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.\n")
    msg = run_error(capsys, ["-m", str(TINY_HF), "-f", str(text), "-o", str(tmp_path / "o.gguf")])
    assert "you need at least 1024 tokens" in msg
    assert not (tmp_path / "o.gguf").exists()


def test_unreadable_model(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    run_error(capsys, ["-m", str(bad), "-f", str(TEXTS / "pg84.txt"), "-o", str(tmp_path / "o.gguf")])
    run_error(capsys, ["-m", str(tmp_path / "missing"), "-f", str(TEXTS / "pg84.txt")])


def test_in_file_of_another_model(tmp_path, capsys):
    msg = run_error(capsys, ["-m", str(TINY_HF), "-f", str(TEXTS / "pg84.txt"), "-o", str(tmp_path / "o.gguf"),
                             "--in-file", str(REF / "smollm2-2l.c512.gguf"), "--chunks", "2"])
    assert "columns" in msg or "does not have" in msg


def test_bad_sizes_and_same_output(tmp_path, capsys):
    msg = run_error(capsys, ["-m", str(TINY_HF), "-f", str(TEXTS / "pg84.txt"), "-c", "0",
                             "-o", str(tmp_path / "o.gguf")])
    assert "-c (--ctx-size) must be a number above 0, not 0" in msg
    im = tmp_path / "im.gguf"
    im.write_bytes((REF / "tiny-llama.c128.gguf").read_bytes())
    msg = run_error(capsys, ["-m", str(TINY_HF), "-f", str(TEXTS / "pg84.txt"), "--in-file", str(im), "-o", str(im)])
    assert "also an input" in msg


def test_nan_in_activations_keeps_earlier_file(tmp_path, tiny_llama_f32, capsys):
    """A weight that overflows the activations to inf: a clear error naming the tensor, and the
    imatrix saved earlier at the output path is left as it was."""
    from kquant.files.gguf_read import load_gguf
    from kquant.files.gguf_write import write_gguf
    from kquant.files.source import SourceTensor

    src = load_gguf(tiny_llama_f32)

    def boosted(t: SourceTensor) -> SourceTensor:
        if t.name != "blk.1.ffn_norm.weight":
            return t
        return SourceTensor(t.name, t.shape, t.type, lambda: np.full(t.shape, 3e38, np.float32))

    broken = tmp_path / "broken.gguf"
    src.tensors = [boosted(t) for t in src.tensors]
    write_gguf(src, broken, progress=False)
    out = tmp_path / "im.gguf"
    out.write_bytes((REF / "tiny-llama.c128.gguf").read_bytes())
    before = out.read_bytes()
    msg = run_error(capsys, ["-m", str(broken), "-f", str(TEXTS / "pg84.txt"), "-o", str(out), "-c", "128",
                             "--chunks", "2"])
    assert "non-finite" in msg and "blk.1." in msg
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_moe_refusals(hf_fixture_gguf, tmp_path, capsys):
    """GPTQ's layer Hessians are per matrix: kquant-imatrix --hessian-out refuses a MoE model
    with one clear error, as does --exact (llama.cpp's float order: not for experts yet)."""
    model = hf_fixture_gguf("tiny-qwen3moe")
    common = ["-m", str(model), "-f", str(TEXTS / "pg84.txt"), "-c", "128", "--chunks", "2", "-t", "2",
              "--device", "cpu"]
    assert main([*common, "-o", str(tmp_path / "a.gguf"), "--hessian-out", str(tmp_path / "h.bin")]) == 1
    assert "does not support mixture-of-experts models (qwen3moe, 8 experts)" in capsys.readouterr().err
    assert main([*common, "-o", str(tmp_path / "b.gguf"), "--exact"]) == 1
    assert "does not run mixture-of-experts models" in capsys.readouterr().err
