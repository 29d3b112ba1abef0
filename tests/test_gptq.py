"""GPTQ into ggml's types (kquant.quantization.gptq): the sweep's algebra, its bytes, its gain."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kquant
from kquant.quantization.gptq import gptq_quantize, hessian_error, inverse_cholesky

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS"]


def correlated_inputs(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """Activations with LLM-like structure: shared low-rank directions, uneven channel scales."""
    mix = rng.standard_normal((k, 32)) @ rng.standard_normal((32, k)) / 6 + np.eye(k)
    return (rng.standard_normal((n, k)) @ mix) * np.exp(rng.standard_normal(k))


def test_inverse_cholesky_factors_the_damped_inverse():
    rng = np.random.default_rng(1)
    x = correlated_inputs(rng, 96, 400)
    h = x.T @ x
    h[:, 7] = h[7, :] = 0  # a column no token reached
    u = inverse_cholesky(h, 0.01)
    assert np.allclose(u, np.triu(u))
    hd = h.copy()
    hd[7, 7] = 1.0
    hd[np.diag_indices_from(hd)] += 0.01 * np.mean(np.diagonal(hd))
    want = np.linalg.inv(hd)
    assert np.abs(u.T @ u - want).max() <= 1e-9 * np.abs(want).max()


@pytest.mark.parametrize("qtype", TYPES)
def test_without_correlations_gptq_is_plain_quantization(qtype):
    """A diagonal Hessian gives no error anything to move to: every value goes to its nearest
    level under the scales of kquant.quantize's (llama.cpp's) fit with the same imatrix. The
    K-quants' codecs end with that rounding, so the bytes are theirs; the legacy searches (and
    IQ4_NL's) keep the levels of their best trial scale, not the nearest under the stored one,
    and IQ4_XS rounds under its float32 scale rather than the stored float16 one, so there
    GPTQ's values are each at least as close."""
    rng = np.random.default_rng(2)
    k = 512
    w = (rng.standard_normal((48, k)) * 0.02).astype(np.float32)
    act = np.exp(rng.standard_normal(k))
    imatrix = act.astype(np.float32)
    result = gptq_quantize(w, np.diag(act.astype(np.float64) * 1000), qtype, imatrix)
    plain = kquant.quantize(w, qtype, imatrix)
    if qtype.endswith("_K"):
        assert np.array_equal(result.data, plain)
        assert result.error == pytest.approx(result.plain_error, rel=1e-12)
        return
    head = 8 if qtype == "IQ4_XS" else 2  # the first block's scales
    assert np.array_equal(result.data[:, :head], plain[:, :head])
    ours = np.abs(kquant.dequantize(result.data, qtype) - w)
    theirs = np.abs(kquant.dequantize(plain, qtype) - w)
    assert (ours <= theirs * (1 + 1e-6) + 1e-12).all()
    assert result.error <= result.plain_error


@pytest.mark.parametrize("qtype", TYPES)
def test_gptq_lowers_the_hessian_weighted_error(qtype):
    rng = np.random.default_rng(3)
    k = 512
    x = correlated_inputs(rng, k, 3000)
    h = x.T @ x
    imatrix = (x * x).mean(axis=0).astype(np.float32)
    w = (rng.standard_normal((64, k)) * 0.02).astype(np.float32)
    result = gptq_quantize(w, h, qtype, imatrix)
    q = kquant.dequantize(result.data, qtype)
    assert result.error == pytest.approx(hessian_error(w, q, h), rel=1e-9)
    assert result.improved
    assert result.error < 0.8 * result.plain_error, (qtype, result.error / result.plain_error)


def test_corrected_target_is_the_least_squares_fit_to_the_float_outputs():
    """With inputs X_q that carry upstream errors, the corrected target W* fits the float
    layer's outputs X_f W^T best (least squares), and GPTQ's error against W* under H is the
    error against the float outputs up to a constant: quantizing W* on H minimises
    ||X_f W^T - X_q Q^T||."""
    from kquant.quantization.gptq import corrected_target

    rng = np.random.default_rng(5)
    k, n = 256, 3000
    x_f = correlated_inputs(rng, k, n)
    x_q = x_f + 0.05 * rng.standard_normal((n, k)) * x_f.std(axis=0)
    w = (rng.standard_normal((16, k)) * 0.02).astype(np.float32)
    h, cross = x_q.T @ x_q, (x_f - x_q).T @ x_q
    aim = corrected_target(w, h, cross, 1.0, damp=0.0)
    want = np.linalg.lstsq(x_q, x_f @ w.T.astype(np.float64), rcond=None)[0].T
    assert np.abs(aim - want).max() <= 1e-4 * np.abs(want).max()
    assert corrected_target(w, h, cross, 0.0) is w
    half = corrected_target(w, h, cross, 0.5, damp=0.0)
    assert np.allclose(half, (w + want) / 2, atol=1e-4 * np.abs(want).max())
    q = kquant.dequantize(kquant.quantize(w, "Q4_K"), "Q4_K").astype(np.float64)
    direct = np.sum((x_f @ w.T - x_q @ q.T) ** 2)
    base = np.sum((x_f @ w.T - x_q @ want.T) ** 2)
    assert hessian_error(want, q, h) + base == pytest.approx(direct, rel=1e-6)


def test_held_out_row_errors_are_the_output_errors_on_those_tokens():
    """Heldout's Gram matrices give each row's ||X_m w_r - X_q q_r||^2 on the held-out tokens,
    X_m = X_q + asym (X_f - X_q) (the outputs the sweep aims at); without the float stream,
    the Hessian error's rows."""
    from kquant.quantization.gptq import row_errors
    from kquant.quantization.sequential import _heldout

    rng = np.random.default_rng(6)
    k, n = 256, 700
    x_f = correlated_inputs(rng, k, n)
    x_q = x_f + 0.05 * rng.standard_normal((n, k)) * x_f.std(axis=0)
    w = (rng.standard_normal((16, k)) * 0.02).astype(np.float32)
    q = kquant.dequantize(kquant.quantize(w, "Q4_K"), "Q4_K")
    for asym in (0.25, 1.0):
        x_m = x_q + asym * (x_f - x_q)
        want = np.sum((x_m @ w.T.astype(np.float64) - x_q @ q.T.astype(np.float64)) ** 2, axis=0)
        got, = _heldout(x_q, x_f, asym).row_errors(w, q)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    got, = _heldout(x_q, None, 0.25).row_errors(w, q)
    np.testing.assert_allclose(got, row_errors(w, q, x_q.T @ x_q), rtol=1e-6)


def test_each_row_comes_from_whichever_errs_less_on_the_held_out_tokens():
    """Judged on other tokens than its Hessian's, GPTQ loses some rows to plain quantization:
    the file's rows are GPTQ's where it errs less, llama.cpp's elsewhere, whole rows of blocks."""
    from kquant.quantization.gptq import Heldout

    rng = np.random.default_rng(7)
    k = 512
    x = correlated_inputs(rng, k, 600)
    other = rng.standard_normal((300, k)) * np.exp(rng.standard_normal(k))  # tokens unlike x
    w = (rng.standard_normal((64, k)) * 0.02).astype(np.float32)
    imatrix = (x * x).mean(axis=0).astype(np.float32)
    result = gptq_quantize(w, x.T @ x, "Q4_K", imatrix)
    assert result.chosen.all()
    h = other.T @ other
    result.judge(Heldout(h, h, h), w)
    chosen = result.chosen
    assert 0 < chosen.sum() < len(chosen)
    out = result.bytes
    assert np.array_equal(out[chosen], result.data[chosen])
    assert np.array_equal(out[~chosen], result.plain_data[~chosen])
    assert np.array_equal(result.plain_data, kquant.quantize(w, "Q4_K", imatrix))
    mixed = kquant.dequantize(out, "Q4_K")
    assert result.error == pytest.approx(hessian_error(w, mixed, h), rel=1e-6)
    assert result.error < min(result.plain_error, hessian_error(w, result.q, h))


def test_gptq_checks_its_inputs():
    w = np.zeros((4, 256), np.float32)
    with pytest.raises(ValueError, match="multiple of 256"):
        gptq_quantize(np.zeros((4, 100), np.float32), np.eye(100), "Q4_K")
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq_quantize(w, np.eye(128), "Q4_K")


def test_hessian_diagonals_are_the_importance_matrix(tmp_path, capsys):
    """One calibration run gives the Hessians and the imatrix: diag(H) / tokens equals
    kquant-imatrix's sums / counts for every matrix (float64 against float32 sums), and the
    matrices that share an input share one Hessian."""
    from kquant.calibration.hessian import calibration_tokens, collect_hessians
    from kquant.calibration.imatrix import ImatrixParams
    from kquant.calibration.imatrix_file import load_imatrix
    from kquant.cli.imatrix import main
    from kquant.models import open_model
    from kquant.runtime import Transformer

    root = Path(__file__).resolve().parent.parent
    tiny, calib = root / "data" / "tiny-llama", root / "data" / "calibration.txt"
    out = tmp_path / "im.gguf"
    assert main(["-m", str(tiny), "-f", str(calib), "-o", str(out), "-c", "128", "--chunks", "4",
                 "--device", "cpu", "--no-ppl"]) == 0
    capsys.readouterr()
    im = load_imatrix(out)
    source = open_model(tiny, "f32")
    tokens, bos = calibration_tokens(source, calib, 128)
    hessians, _ = collect_hessians(Transformer(source, "cpu", progress=False), tokens,
                                   ImatrixParams(n_ctx=128, n_chunks=4, compute_ppl=False), bos,
                                   progress=False)
    assert set(hessians.shared) == set(im.entries)
    assert hessians.of("blk.0.attn_q.weight") is hessians.of("blk.0.attn_v.weight")
    assert hessians.of("blk.0.ffn_up.weight") is hessians.of("blk.0.ffn_gate.weight")
    assert len(hessians.sums) == 4 * len({n.split(".")[1] for n in im.entries})
    for name, e in im.entries.items():
        h = hessians.of(name)
        assert hessians.count(name) == int(e.counts[0])
        assert np.allclose(np.diagonal(h) / hessians.count(name), e.sums / e.counts[0], rtol=1e-5), name
        assert np.allclose(h, h.T)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-phi3", "tiny-gemma2", "tiny-gemma3"])
def test_sequential_pass_sees_what_the_float_model_computes(model, hf_fixture):
    """The sequential sweep's own forward pass (all chunks at once, block by block): with no
    matrix replaced, every Hessian it forms equals the one-shot calibration's (the runtime's
    forward with the imatrix's batches); with the matrices quantized, block 0's attention input
    is unchanged and every later input differs (plain GPTQ, no asymmetric target). phi3: fused
    Q/K/V and gate/up; gemma2: scaled embeddings, post-norms, sliding window (32 of 128)."""
    from kquant.calibration.hessian import calibration_tokens, collect_hessians
    from kquant.calibration.imatrix import ImatrixParams
    from kquant.models import open_model
    from kquant.quantization.calibrated import GptqReport
    from kquant.quantization.pipeline import plan_quantization
    from kquant.quantization.sequential import SequentialGptq, gram
    from kquant.runtime import Transformer
    from kquant.runtime.chunks import chunk_sequences

    root = Path(__file__).resolve().parent.parent
    calib = root / "data" / "calibration.txt"
    tiny = root / "data" / "tiny-llama" if model == "tiny-llama" else hf_fixture(model)
    source = open_model(tiny, "f32")
    tokens, bos = calibration_tokens(source, calib, 128)
    one_shot, _ = collect_hessians(Transformer(source, "cpu", progress=False), tokens,
                                   ImatrixParams(n_ctx=128, n_chunks=4, compute_ppl=False), bos,
                                   progress=False)
    chunks = chunk_sequences(tokens, 0, 4, 128, bos)
    planned = {p.source.name: p for p in plan_quantization(source, "Q4_K_M").tensors}

    class Recording(SequentialGptq):
        seen: dict = {}
        keep_float = True

        def hessian_of(self, name, x, x_fp=None):
            self.seen[name] = gram(x)
            return None if self.keep_float else super().hessian_of(name, x, x_fp)

        def quantize(self, L, attr, hessian):
            if not self.keep_float:
                super().quantize(L, attr, hessian)

    float_pass = Recording(Transformer(source, "cpu", progress=False), planned, None, GptqReport())
    float_pass.seen = {}
    float_pass.run(chunks, progress=False)
    assert set(float_pass.seen) == set(one_shot.sums)
    for name, h in float_pass.seen.items():
        assert np.allclose(h, one_shot.sums[name], rtol=1e-4, atol=1e-3 * np.abs(h).max()), name

    from kquant.quantization.pipeline import convert_tensor

    from kquant.quantization.gptq import GptqSettings

    for p in planned.values():  # plain GPTQ: the asymmetric target would make up for some errors
        p.gptq = GptqSettings(asym=0.0)
    report = GptqReport()
    quantized = Recording(Transformer(source, "cpu", progress=False), planned, convert_tensor, report)
    quantized.seen, quantized.keep_float = {}, False
    layers = quantized.model.weights.layers
    matrices = [name for L in layers for name in L.names.values()]
    data = quantized.run(chunks, progress=False)
    assert sorted(data) == sorted(matrices) and report.tried == len(matrices)
    first = layers[0].names["wqkv" if layers[0].wqkv is not None else "wq"]
    for name, h in quantized.seen.items():
        same = np.allclose(h, one_shot.sums[name], rtol=1e-4, atol=1e-3 * np.abs(h).max())
        assert same == (name == first), name


def test_sequential_sweep_aims_at_the_float_model(tiny_llama_f32):
    """With --gptq-asym the sweep runs the float model's stream beside the quantized one: the
    first matrix input of block 0 is the same in both (no cross term), every later one carries
    the upstream errors; asym 0 runs no float stream and gives other bytes."""
    from kquant.calibration.hessian import calibration_tokens
    from kquant.models import open_model
    from kquant.quantization.calibrated import GptqReport
    from kquant.quantization.gptq import GptqSettings
    from kquant.quantization.pipeline import convert_tensor, plan_quantization
    from kquant.quantization.sequential import SequentialGptq
    from kquant.runtime import Transformer
    from kquant.runtime.chunks import chunk_sequences

    calib = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
    source = open_model(tiny_llama_f32, "f32")
    tokens, bos = calibration_tokens(source, calib, 128)
    chunks = chunk_sequences(tokens, 0, 2, 128, bos)

    class Recording(SequentialGptq):
        def hessian_of(self, name, x, x_fp=None):
            stats = super().hessian_of(name, x, x_fp)
            self.cross[name] = None if stats is None else stats.cross
            return stats

    runs = {}
    for asym in (0.25, 0.0):
        planned = {}
        for p in plan_quantization(source, "Q4_K_M").tensors:
            p.gptq = GptqSettings(asym=asym)
            planned[p.source.name] = p
        seq = Recording(Transformer(source, "cpu", progress=False), planned, convert_tensor, GptqReport())
        seq.cross = {}
        runs[asym] = seq.run(chunks, progress=False), seq.cross
    data, cross = runs[0.25]
    assert len(cross) == 16 and all(c is None for c in runs[0.0][1].values())
    for name, c in cross.items():
        assert (np.abs(c).max() == 0) == (name == "blk.0.attn_q.weight"), name
    assert any(not np.array_equal(data[n], runs[0.0][0][n]) for n in data)


def test_sequential_sweep_holds_out_every_nth_chunk(tiny_llama_f32):
    """With --gptq-holdout 4 and 4 chunks, each sweep's Hessian sums chunks 0-2 (first tokens
    weighted) and chunk 3 judges its rows (every token once); with fewer chunks than 4, or
    holdout 0, nothing is held out."""
    from kquant.calibration.hessian import calibration_tokens
    from kquant.models import open_model
    from kquant.quantization.calibrated import GptqReport
    from kquant.quantization.gptq import GptqSettings
    from kquant.quantization.pipeline import convert_tensor, plan_quantization
    from kquant.quantization.sequential import SequentialGptq, gram
    from kquant.runtime import Transformer
    from kquant.runtime.chunks import chunk_sequences

    calib = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
    source = open_model(tiny_llama_f32, "f32")
    tokens, bos = calibration_tokens(source, calib, 64)

    class Recording(SequentialGptq):
        def hessian_of(self, name, x, x_fp=None):
            stats = super().hessian_of(name, x, x_fp)
            if stats is not None:
                self.seen[name] = (x.copy(), stats)
            return stats

    def run(n_chunks, holdout):
        planned = {}
        for p in plan_quantization(source, "Q4_K_M").tensors:
            p.gptq = GptqSettings(holdout=holdout, asym=0.0, sink_weight=4.0)
            planned[p.source.name] = p
        seq = Recording(Transformer(source, "cpu", progress=False), planned, convert_tensor, GptqReport())
        seq.seen = {}
        seq.run(chunk_sequences(tokens, 0, n_chunks, 64, bos), progress=False)
        return seq.seen

    seen = run(4, 4)
    assert len(seen) == 16 and all(st.heldout is not None for _, st in seen.values())
    for name, (x, stats) in seen.items():
        h = stats.heldout
        np.testing.assert_allclose(h.qq, gram(x[192:]), rtol=1e-9, atol=1e-9)
        x = x.copy()
        x[::64] *= 2  # sqrt of the sink weight
        np.testing.assert_allclose(stats.hessian, gram(x[:192]), rtol=1e-9, atol=1e-9)
        assert h.mq is h.qq and h.mm is h.qq
    assert all(st.heldout is None for _, st in run(3, 4).values())
    assert all(st.heldout is None for _, st in run(4, 0).values())


def test_sequential_sweep_on_the_array_module_path(tiny_llama_f32):
    """The CuPy code path of the sequential sweep (run here on a numpy stand-in) quantizes the
    same matrices with the same gains as the numpy path. (Not the same bytes: the forward's
    float order differs in the last bits, and one level flipped early in a GPTQ sweep changes
    the columns after it.)"""
    from test_runtime import _NumpyStandIn

    from kquant.calibration.hessian import calibration_tokens
    from kquant.models import open_model
    from kquant.quantization.calibrated import GptqReport
    from kquant.quantization.pipeline import convert_tensor, plan_quantization
    from kquant.quantization.sequential import SequentialGptq
    from kquant.runtime import Transformer
    from kquant.runtime.chunks import chunk_sequences

    calib = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
    source = open_model(tiny_llama_f32, "f32")
    tokens, bos = calibration_tokens(source, calib, 128)
    chunks = chunk_sequences(tokens, 0, 3, 128, bos)
    runs = []
    for xp in (None, _NumpyStandIn()):
        planned = {p.source.name: p for p in plan_quantization(source, "Q4_K_M").tensors}
        model = Transformer(source, "cpu", progress=False, xp=xp)
        report = GptqReport()
        data = SequentialGptq(model, planned, convert_tensor, report).run(chunks, progress=False)
        runs.append((data, report))
    (a, ra), (b, rb) = runs
    assert set(a) == set(b) and len(a) == 28 and ra.tried == rb.tried == 28
    assert set(ra.errors) == set(rb.errors)
    for kind, (gptq, plain) in ra.errors.items():
        other = rb.errors[kind][0] / rb.errors[kind][1]
        assert gptq / plain < 0.8 and abs(gptq / plain - other) < 0.03, (kind, gptq / plain, other)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _llama_cpp_log_probs(llama_cpp, path: Path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=len(tokens), n_batch=len(tokens),
                          n_threads=2, verbose=False)
    llm.eval(tokens)
    return _log_softmax(np.array(llm.scores[:len(tokens)], np.float32))


@pytest.mark.parametrize("ftype", ["Q3_K_M", "IQ4_XS"])
def test_gptq_file_has_llama_quantizes_types_and_is_closer_in_llama_cpp(tmp_path, capsys, llama_cpp,
                                                                       tiny_llama_f32, ftype):
    """kquant-quantize --method gptq on the tiny model (every matrix a K-quant, or IQ4_XS's
    non-uniform grid): the same tensor types and bytes per tensor as llama-quantize's file
    with the same imatrix (kquant's --method llama is byte-identical to it), llama.cpp loads
    and runs it, and its logits on text apart from the calibration text are closer to the F32
    model's (mean KL divergence and same top token, computed from llama.cpp's own logits)."""
    from kquant.cli.imatrix import main as imatrix_main
    from kquant.cli.quantize import main as quantize_main
    from kquant.models import open_model

    text = (Path(__file__).resolve().parent.parent / "data" / "calibration.txt").read_text()
    calib, held_out = tmp_path / "calib.txt", tmp_path / "held_out.txt"
    calib.write_text(text[:len(text) * 2 // 3])
    held_out.write_text(text[len(text) * 2 // 3:])
    im = tmp_path / "im.gguf"
    assert imatrix_main(["-m", str(tiny_llama_f32), "-f", str(calib), "-o", str(im), "-c", "128",
                         "--no-ppl", "--device", "cpu"]) == 0
    plain, gptq = tmp_path / "plain.gguf", tmp_path / "gptq.gguf"
    assert quantize_main(["--imatrix", str(im), str(tiny_llama_f32), str(plain), ftype]) == 0
    assert quantize_main(["--method", "gptq", "--calibrate", str(calib), "-c", "128", "--imatrix", str(im),
                          str(tiny_llama_f32), str(gptq), ftype]) == 0
    err = capsys.readouterr().err
    assert "gptq: " in err and "rows from GPTQ" in err

    a, b = open_model(plain, "f32"), open_model(gptq, "f32")
    assert [(t.name, t.type, t.nbytes) for t in a.tensors] == [(t.name, t.type, t.nbytes) for t in b.tensors]
    assert plain.stat().st_size == gptq.stat().st_size
    changed = sum(not np.array_equal(np.asarray(s.load()), np.asarray(t.load()))
                  for s, t in zip(a.tensors, b.tensors))
    assert changed >= 20  # the block matrices (28 in all)

    vocab = llama_cpp.Llama(str(tiny_llama_f32), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(held_out.read_text().encode())[:512]
    base = _llama_cpp_log_probs(llama_cpp, tiny_llama_f32, tokens)
    stats = {}
    for name, path in (("plain", plain), ("gptq", gptq)):
        lp = _llama_cpp_log_probs(llama_cpp, path, tokens)
        kld = (np.exp(base) * (base - lp)).sum(axis=1)
        stats[name] = (kld.mean(), (lp.argmax(axis=1) == base.argmax(axis=1)).mean())
    assert stats["gptq"][0] < 0.95 * stats["plain"][0], stats
    assert stats["gptq"][1] >= stats["plain"][1] - 0.01, stats


def test_gptq_bad_calibration_input_is_one_error_line(tmp_path, capsys, tiny_llama_f32):
    from kquant.cli.quantize import main

    out = tmp_path / "out.gguf"
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate anything.")
    cases = [
        ([], "--method gptq needs calibration text"),
        (["--calibrate", str(tmp_path / "missing.txt")], "no such calibration text"),
        (["--calibrate", str(short)], "too short for calibration"),
        (["--calibrate", str(short), "--gptq-damp", "nan"], "--gptq-damp must be a number >= 0"),
        (["--calibrate", str(short), "--gptq-sink-weight", "0"], "--gptq-sink-weight must be a number > 0"),
        (["--calibrate", str(short), "--gptq-asym", "1.5"], "--gptq-asym must be a number from 0 to 1"),
        (["--calibrate", str(short), "--gptq-holdout", "1"], "--gptq-holdout must be 0 or at least 2"),
    ]
    for extra, message in cases:
        assert main(["--method", "gptq", *extra, str(tiny_llama_f32), str(out), "Q4_K_M"]) == 1
        err = capsys.readouterr().err
        assert "kquant-quantize: error: " in err and message in err, err
        assert "Traceback" not in err
        assert not out.exists() and list(tmp_path.iterdir()) == [short]


@pytest.mark.parametrize("imatrix", [False, True])
def test_gptq_overflowing_activations_are_one_error_line(tmp_path, capsys, tiny_llama_f32, imatrix):
    """A model whose activations overflow float32 on the calibration text (block 1's FFN norm
    scaled by 1e30): one error line naming the input, no output, exit 1; with --imatrix the
    sequential sweep meets it itself (no float pass runs)."""
    from kquant.cli.quantize import main
    from kquant.files.gguf_read import load_gguf
    from kquant.files.gguf_write import write_gguf
    from kquant.files.source import ModelSource, SourceTensor

    src = load_gguf(tiny_llama_f32)

    def blown(t: SourceTensor) -> SourceTensor:
        if t.name != "blk.1.ffn_norm.weight":
            return t
        return SourceTensor(t.name, t.shape, t.type, lambda: np.asarray(t.load()).view(np.float32) * np.float32(1e30))

    model = tmp_path / "blown.gguf"
    write_gguf(ModelSource(src.arch, src.kv, [blown(t) for t in src.tensors]), model, progress=False)
    calib = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
    extra = []
    if imatrix:
        im = tmp_path / "im.gguf"
        from kquant.cli.imatrix import main as imatrix_main

        imatrix_main(["-m", str(tiny_llama_f32), "-f", str(calib), "-o", str(im), "-c", "128",
                      "--chunks", "2", "--no-ppl", "--device", "cpu"])
        extra = ["--imatrix", str(im)]
    capsys.readouterr()
    out = tmp_path / "out.gguf"
    assert main(["--method", "gptq", "--calibrate", str(calib), "-c", "128", "--chunks", "2", *extra,
                 str(model), str(out), "Q4_K_M"]) == 1
    err = capsys.readouterr().err
    assert "kquant-quantize: error: " in err and "non-finite" in err and "blk.1." in err, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("*.part*")) and not list(tmp_path.glob(".*"))


def test_saved_hessians_give_the_same_file_and_are_checked(tmp_path, capsys, tiny_llama_f32):
    """kquant-imatrix --hessian-out, then kquant-quantize --method gptq --hessian: the same bytes
    as calibrating in kquant-quantize itself; a Hessian file of another model, a damaged one
    or some other file is one error line and no output."""
    from kquant.cli.imatrix import main as imatrix_main
    from kquant.cli.quantize import main as quantize_main

    calib = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
    hess = tmp_path / "h.safetensors"
    assert imatrix_main(["-m", str(tiny_llama_f32), "-f", str(calib), "-o", str(tmp_path / "im.gguf"),
                         "-c", "128", "--chunks", "4", "--no-ppl", "--device", "cpu",
                         "--hessian-out", str(hess)]) == 0
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert quantize_main(["--method", "gptq", "--hessian", str(hess), str(tiny_llama_f32), str(a), "Q4_K_M"]) == 0
    assert quantize_main(["--method", "gptq", "--gptq-one-shot", "--calibrate", str(calib), "-c", "128",
                          "--chunks", "4", str(tiny_llama_f32), str(b), "Q4_K_M"]) == 0
    assert a.read_bytes() == b.read_bytes()
    capsys.readouterr()

    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(hess.read_bytes()[:-100])
    other = tmp_path / "other.gguf"
    quantize_main(["--pure", str(tiny_llama_f32), str(other), "Q8_0"])  # a model, not Hessians
    capsys.readouterr()
    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model
    from kquant.files.source import ModelSource

    src = load_hf_model(Path(__file__).resolve().parent.parent / "data" / "tiny-llama", "f32")
    pruned = tmp_path / "pruned.gguf"  # another model: one tensor fewer
    write_gguf(ModelSource(src.arch, src.kv, src.tensors[:-1], src.path), pruned, progress=False)
    out = tmp_path / "out.gguf"
    for model, hfile, message in [(pruned, hess, "Hessians of another model"),
                                  (tiny_llama_f32, damaged, "truncated"),
                                  (tiny_llama_f32, other, "safetensors"),
                                  (tiny_llama_f32, tmp_path / "none", "no such Hessian file")]:
        assert quantize_main(["--method", "gptq", "--hessian", str(hfile), str(model), str(out), "Q4_K_M"]) == 1
        err = capsys.readouterr().err
        assert "kquant-quantize: error: " in err and message in err and "Traceback" not in err, err
        assert not out.exists()


def test_gptq_bytes_do_not_depend_on_the_thread_count(tmp_path, capsys, tiny_llama_f32):
    from kquant.cli.quantize import main

    calib = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
    files = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}.gguf"
        assert main(["--method", "gptq", "--calibrate", str(calib), "-c", "128", "--chunks", "3",
                     str(tiny_llama_f32), str(out), "Q3_K_M", threads]) == 0
        files.append(out.read_bytes())
    assert files[0] == files[1]
