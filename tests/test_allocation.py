"""Per-tensor bit allocation (kquant.quantization.allocation, sensitivity) and
kquant-quantize --target-bpw / --target-size."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import kquant
from kquant.quantization import allocation
from kquant.quantization.allocation import Options, allocate, candidate_types, sample_rows, weighted_errors
from kquant.quantization.calibrated import gptq_types
from kquant.types import find_type

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "data" / "calibration.txt"


def _random_options(rng: np.random.Generator, n: int) -> list[Options]:
    """Tensors with K-quant-like candidates: bytes rising, errors falling (not always convex)."""
    out = []
    for i in range(n):
        size = int(rng.integers(1, 20)) * 256
        nbytes = np.array([int(size * b / 8) for b in (2.625, 3.4375, 4.5, 5.5, 6.5625)], np.int64)
        loss = np.sort(rng.exponential(1.0, 5) * rng.uniform(0.1, 10))[::-1].copy()
        out.append(Options(f"t{i}", (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K), nbytes, loss))
    return out


def _brute_force(options: list[Options], budget: int) -> float:
    best = np.inf
    for pick in itertools.product(*[range(len(o.types)) for o in options]):
        if sum(o.nbytes[i] for o, i in zip(options, pick)) <= budget:
            best = min(best, sum(o.loss[i] for o, i in zip(options, pick)))
    return best


def test_allocation_is_the_lagrangian_optimum_and_meets_the_budget():
    """At every budget that a Lagrangian choice (each tensor minimising loss + lambda bytes)
    spends exactly, the allocator's loss is the brute-force optimum; at any budget it spends no
    more, and more budget never costs loss."""
    rng = np.random.default_rng(0)
    for trial in range(6):
        options = _random_options(rng, 5)
        for lam in np.geomspace(1e-5, 1, 12):
            pick = [int(np.argmin(o.loss + lam * o.nbytes)) for o in options]
            budget = int(sum(o.nbytes[i] for o, i in zip(options, pick)))
            got = allocate(options, budget)
            assert sum(o.nbytes[i] for o, i in zip(options, got)) <= budget
            loss = sum(o.loss[i] for o, i in zip(options, got))
            assert loss == pytest.approx(_brute_force(options, budget), rel=1e-12), (trial, lam)
        smallest = int(sum(o.nbytes[0] for o in options))
        largest = int(sum(o.nbytes[-1] for o in options))
        previous = np.inf
        for budget in np.linspace(smallest, largest, 25).astype(int):
            got = allocate(options, int(budget))
            assert sum(o.nbytes[i] for o, i in zip(options, got)) <= budget
            loss = sum(o.loss[i] for o, i in zip(options, got))
            assert loss <= previous + 1e-12
            previous = loss
        assert allocate(options, largest) == [len(o.types) - 1 for o in options]
        with pytest.raises(kquant.ModelError, match="below the smallest possible"):
            allocate(options, smallest - 1)


def test_a_larger_type_that_errs_no_less_is_never_chosen():
    o = Options("t", (T.Q2_K, T.Q3_K, T.Q4_K), np.array([10, 20, 30]), np.array([5.0, 5.0, 1.0]))
    assert o.hull() == [0, 2]
    assert allocate([o], 25) == [0] and allocate([o], 30) == [2]


def test_the_i_quants_kquant_runs_are_candidates():
    """Every type kquant writes and runs competes, by bytes per value; the i-quants llama-quantize
    makes only with an imatrix need one; --method gptq keeps to the types its sweeps know."""
    full = candidate_types(2048, "blk.0.ffn_up.weight", has_imatrix=True)
    assert {T.IQ4_XS, T.Q2_K, T.Q3_K, T.Q4_K, T.Q6_K, T.Q8_0} <= set(full)
    bpv = [find_type(q).type_size / find_type(q).block_size for q in full]
    assert bpv == sorted(bpv)
    for q in full:
        record = find_type(q)
        assert record.codec is not None and record.cpu_kernel is not None  # the runtime runs it
    if T.IQ3_XXS in full:  # once the runtime runs IQ3_XXS: only with an imatrix (or for token_embd)
        assert T.IQ3_XXS not in candidate_types(2048, "blk.0.ffn_up.weight", has_imatrix=False)
        assert T.IQ3_XXS in candidate_types(2048, "token_embd.weight", has_imatrix=False)
    assert T.IQ4_NL in candidate_types(576) and T.IQ4_XS not in candidate_types(576)
    assert candidate_types(2048, allowed=()) == (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
    assert candidate_types(576, allowed=()) == (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
    gptq = candidate_types(2048, allowed=gptq_types())  # the sweeps know IQ4's grid, not the lattices
    assert T.IQ4_XS in gptq and not {T.IQ3_S, T.IQ3_XXS, T.IQ2_XS} & set(gptq)
    assert candidate_types(100) == ()


def test_weighted_errors_are_the_imatrix_weighted_squared_errors():
    """e(type) = sum over rows of sum_j imatrix_j (w - q)^2 with each type quantized as the
    file would be (with the imatrix), scaled from the sample to all rows; a lookup (token
    embeddings) takes the mean row's plain squared error."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((40, 512)) * 0.02).astype(np.float32)
    im = np.exp(rng.standard_normal(512)).astype(np.float32)
    types = (T.Q3_K, T.Q6_K)
    got = weighted_errors(x, types, im, n_rows=400)
    for e, qtype in zip(got, types):
        q = kquant.dequantize(kquant.quantize(x, qtype, im), qtype).astype(np.float64)
        assert e == pytest.approx(10 * np.sum(im * (x - q) ** 2), rel=1e-9)
    assert got[0] > 5 * got[1]
    lookup = weighted_errors(x, types, im, n_rows=400, lookup=True)
    q = kquant.dequantize(kquant.quantize(x, T.Q3_K, im), T.Q3_K).astype(np.float64)
    assert lookup[0] == pytest.approx(np.mean(np.sum((x - q) ** 2, axis=1)), rel=1e-9)
    assert list(sample_rows(5, 8)) == [0, 1, 2, 3, 4]
    rows = sample_rows(1000, 8)
    assert len(rows) == 8 and rows[0] == 0 and rows[-1] == 999


@pytest.fixture(scope="module")
def tiny_imatrix(tmp_path_factory, tiny_llama_f32) -> Path:
    from kquant.cli.imatrix import main

    out = tmp_path_factory.mktemp("alloc") / "im.gguf"
    assert main(["-m", str(tiny_llama_f32), "-f", str(CALIB), "-o", str(out), "-c", "128", "--no-ppl",
                 "--device", "cpu", "--no-progress"]) == 0
    return out


def test_target_bpw_meets_the_budget_and_llama_cpp_runs_the_file(tmp_path, capsys, llama_cpp,
                                                                   tiny_llama_f32, tiny_imatrix):
    """--target-bpw 3.6 on the tiny model: all tensor data at most 3.6 bits per weight, several
    types chosen, the norms as the mix leaves them, the budget in the metadata, the chosen types
    as --dry-run printed them; llama.cpp loads and runs the file."""
    from kquant.cli.quantize import main
    from kquant.models import open_model

    out = tmp_path / "alloc.gguf"
    args = ["--imatrix", str(tiny_imatrix), "--target-bpw", "3.6", str(tiny_llama_f32)]
    assert main(["--dry-run", *args, "Q4_K_M"]) == 0
    shown = capsys.readouterr().out
    assert "allocation: 30 tensors chosen" in shown and "estimated loss" in shown
    assert not out.exists()
    assert main([*args, str(out), "Q4_K_M"]) == 0
    err = capsys.readouterr().err
    assert "allocation: 30 tensors chosen" in err
    q = open_model(out, "f32")
    n = sum(t.n_elements for t in q.tensors)
    assert 8 * sum(t.nbytes for t in q.tensors) / n <= 3.6
    assert 8 * sum(t.nbytes for t in q.tensors) / n > 3.5  # the budget is spent, not wasted
    types = {t.name: t.type for t in q.tensors}
    assert len({types[k] for k in types if k.endswith("weight") and "norm" not in k}) >= 3
    assert all(types[k] == T.F32 for k in types if "norm" in k)
    for name, qtype in types.items():
        if "norm" not in name:
            assert f"{name} " in shown and f"({qtype.name})" in shown.split(f"{name} ")[1].split("\n")[0]
    assert q.get("quantize.kquant.target_bpw") == pytest.approx(3.6)
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    tokens = llm.tokenize(b"The quick brown fox")
    llm.eval(tokens)
    assert np.isfinite(np.array(llm.scores[:len(tokens)])).all()


def test_target_size_gives_a_file_of_at_most_that_size(tmp_path, capsys, tiny_llama_f32, tiny_imatrix):
    """--target-size: the file (metadata and padding included) is at most BYTES; --tensor-type
    choices stay as given."""
    from kquant.cli.quantize import main
    from kquant.models import open_model

    for size in (2_700_000, 3_300_000):
        out = tmp_path / f"s{size}.gguf"
        assert main(["--imatrix", str(tiny_imatrix), "--target-size", str(size), "--tensor-type",
                     "attn_v=q8_0", str(tiny_llama_f32), str(out), "Q4_K_M"]) == 0
        assert size - 40_000 < out.stat().st_size <= size
        q = open_model(out, "f32")
        assert all(t.type == T.Q8_0 for t in q.tensors if "attn_v" in t.name)
    capsys.readouterr()


def test_measured_sensitivities_rank_the_real_kl_divergence(tiny_llama_f32, tiny_imatrix):
    """The estimate sum_t s_t e_t, with the sensitivities measured per tensor, ranks the KL divergences that whole allocations really give (measured the same way, on
    other text)."""
    from kquant.calibration.hessian import calibration_tokens
    from kquant.models import open_model
    from kquant.quantization.allocation import estimate
    from kquant.quantization.pipeline import QuantizeOptions, plan_quantization
    from kquant.quantization.sensitivity import _Probe, measure_sensitivities
    from kquant.runtime import Transformer
    from kquant.runtime.chunks import chunk_sequences

    source = open_model(tiny_llama_f32, "f32")
    plan = plan_quantization(source, "Q4_K_M", QuantizeOptions(imatrix=str(tiny_imatrix)))
    planned = [p for p in plan.tensors if p.target not in (T.F32, T.F16)]
    options = [estimate(p) for p in planned]
    s = measure_sensitivities(tiny_llama_f32, CALIB, planned, options, n_ctx=128)
    assert set(s.tensor) == {p.name for p in planned} and len(s.tensor) == 30
    assert all(v > 0 for v in s.tensor.values())

    tokens, bos = calibration_tokens(source, CALIB, 128)
    probe = _Probe(Transformer(source, "cpu", progress=False),
                   chunk_sequences(tokens, len(tokens) - 4 * 128, 4, 128, bos))  # the text's end
    rng = np.random.default_rng(3)
    predicted, measured = [], []
    for trial in range(6):
        picks = [int(rng.integers(0, 4)) for _ in options]
        saved = {}
        for p, o, i in zip(planned, options, picks):
            w = np.asarray(probe.get(p.source.name))
            saved[p.source.name] = w
            q = kquant.dequantize(kquant.quantize(np.ascontiguousarray(w), o.types[i], p.imatrix), o.types[i])
            probe.put(p.source.name, q.reshape(w.shape))
        measured.append(probe.kld())
        for name, w in saved.items():
            probe.put(name, w)
        predicted.append(sum(s.of(o.name) * o.loss[i] for o, i in zip(options, picks)))
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    rho = np.corrcoef(rank(predicted), rank(measured))[0, 1]
    assert rho >= 0.8, (predicted, measured)


def test_a_probe_from_the_saved_block_inputs_equals_the_whole_pass(tiny_llama_f32):
    """A tensor of block l probed from the float pass's residual stream at block l's input gives
    the KLD of the whole forward pass with it; the float weights give 0."""
    from kquant.calibration.hessian import calibration_tokens
    from kquant.models import open_model
    from kquant.quantization.sensitivity import _Probe
    from kquant.runtime import Transformer
    from kquant.runtime.chunks import chunk_sequences

    source = open_model(tiny_llama_f32, "f32")
    tokens, bos = calibration_tokens(source, CALIB, 128)
    probe = _Probe(Transformer(source, "cpu", progress=False), chunk_sequences(tokens, 0, 2, 128, bos))
    assert probe.kld() == pytest.approx(0, abs=1e-12) and probe.kld(3) == pytest.approx(0, abs=1e-12)
    for name in ("blk.2.attn_v.weight", "blk.3.ffn_down.weight", "output.weight"):
        w = np.asarray(probe.get(name))
        probe.put(name, w + np.float32(0.01) * np.sign(w))
        first = probe.first_block(name)
        assert first == {"blk.2.attn_v.weight": 2, "blk.3.ffn_down.weight": 3, "output.weight": 4}[name]
        assert probe.kld(first) == pytest.approx(probe.kld(), rel=1e-6) and probe.kld() > 1e-5
        probe.put(name, w)


def test_a_sensitivity_file_is_measured_once_and_reused(tmp_path, capsys, tiny_llama_f32, tiny_imatrix):
    """--sensitivity F: written by the first run (measured on --calibrate's text), read by the
    next, which then needs no text and shows the same choice; refused for another imatrix or
    another text, and when damaged, with one error line."""
    from kquant.cli.quantize import main

    sens = tmp_path / "s.json"
    common = ["--dry-run", "--imatrix", str(tiny_imatrix), "-c", "128", "--target-bpw", "4.2",
              "--sensitivity", str(sens)]
    model = [str(tiny_llama_f32), "Q4_K_M"]

    def shown(out: str) -> list[str]:
        return [line for line in out.splitlines() if "s (dry run" not in line]

    assert main([*common, "--calibrate", str(CALIB), *model]) == 0
    first = shown(capsys.readouterr().out)
    doc = json.loads(sens.read_text())
    assert doc["format"] == "kquant.sensitivity" and len(doc["tensor"]) == 30 and doc["text"] == CALIB.name
    stamp = sens.stat().st_mtime_ns
    assert main([*common, *model]) == 0
    assert shown(capsys.readouterr().out) == first and sens.stat().st_mtime_ns == stamp

    other_text = tmp_path / "other.txt"
    other_text.write_text(CALIB.read_text()[:20000])
    assert main([*common, "--calibrate", str(other_text), *model]) == 1
    assert "measured on another text (calibration.txt)" in capsys.readouterr().err
    other_im = tmp_path / "im2.gguf"
    assert main_imatrix(tiny_llama_f32, other_im, ["--chunks", "3"]) == 0
    capsys.readouterr()
    assert main([*common[:2], str(other_im), *common[3:], *model]) == 1
    assert "measured for other weights or another imatrix" in capsys.readouterr().err
    sens.write_text("{")
    assert main([*common, *model]) == 1
    err = capsys.readouterr().err
    assert "not a readable sensitivity file" in err and "Traceback" not in err
    sens.unlink()
    assert main([*common, *model]) == 1
    assert "no such sensitivity file, and no --calibrate text" in capsys.readouterr().err
    assert main(["--sensitivity", str(sens), *model]) == 1
    assert "--sensitivity is for a budget" in capsys.readouterr().err


def main_imatrix(model: Path, out: Path, extra: list[str]) -> int:
    from kquant.cli.imatrix import main

    return main(["-m", str(model), "-f", str(CALIB), "-o", str(out), "-c", "128", "--no-ppl", "--device", "cpu",
                 "--no-progress", *extra])


@pytest.mark.parametrize("extra, message", [
    (["--target-bpw", "4", "--target-size", "3000000"], "cannot be used together"),
    (["--target-bpw", "0"], "--target-bpw must be a number above 0"),
    (["--target-bpw", "nan"], "--target-bpw must be a number above 0"),
    (["--target-bpw", "40"], "at most 32 (F32)"),
    (["--target-bpw", "1.5"], "below the smallest possible"),
    (["--target-size", "900000000"], "above the model's size at F32"),
    (["--target-size", "1000"], "below the file's"),
])
def test_bad_budgets_are_one_error_line(tmp_path, capsys, tiny_llama_f32, extra, message):
    from kquant.cli.quantize import main

    out = tmp_path / "out.gguf"
    assert main([*extra, str(tiny_llama_f32), str(out), "Q4_K_M"]) == 1
    err = capsys.readouterr().err
    assert "kquant-quantize: error: " in err and message in err, err
    assert "Traceback" not in err and not out.exists() and list(tmp_path.iterdir()) == []


def test_allocation_does_not_depend_on_the_thread_count(capsys, tiny_llama_f32, tiny_imatrix):
    """The same types, estimates and sensitivities with 1 and 2 threads."""
    from kquant.cli.quantize import main

    shown = []
    for threads in ("1", "2"):
        assert main(["--dry-run", "--imatrix", str(tiny_imatrix), "--calibrate", str(CALIB), "-c", "128",
                     "--target-bpw", "4.2", str(tiny_llama_f32), "Q4_K_M", threads]) == 0
        out = capsys.readouterr().out
        shown.append([line for line in out.splitlines() if "s (dry run" not in line])
    assert shown[0] == shown[1]
    assert any(line.startswith("sensitivity (KLD per unit of error, median per kind): attn_k ")
               for line in shown[0])


def test_allocation_with_gptq_sweeps_at_the_chosen_types(tmp_path, capsys, monkeypatch, tiny_llama_f32,
                                                        tiny_imatrix):
    """--method gptq with a budget: the types a plain allocation over the same candidates
    (K-quant, legacy and IQ4: the sweeps' grids) chooses, from the same imatrix and measured
    sensitivities; GPTQ's bytes in the block matrices. (A plain run's own candidates include
    the lattice i-quants once kquant runs them: here they are left out to compare like with
    like.)"""
    from kquant.cli.quantize import main
    from kquant.models import open_model

    common = ["--imatrix", str(tiny_imatrix), "--calibrate", str(CALIB), "-c", "128", "--chunks", "4",
              "--target-bpw", "3.8"]
    plain, gptq = tmp_path / "plain.gguf", tmp_path / "gptq.gguf"
    with monkeypatch.context() as m:
        m.setattr(allocation, "IQ_CANDIDATES", (T.IQ4_XS,))
        assert main([*common, str(tiny_llama_f32), str(plain), "Q4_K_M"]) == 0
    assert main(["--method", "gptq", *common, str(tiny_llama_f32), str(gptq), "Q4_K_M"]) == 0
    err = capsys.readouterr().err
    assert "allocation: 30 tensors chosen" in err and "rows from GPTQ" in err
    a, b = open_model(plain, "f32"), open_model(gptq, "f32")
    assert [(t.name, t.type) for t in a.tensors] == [(t.name, t.type) for t in b.tensors]
    assert len({t.type for t in a.tensors}) >= 4
    changed = sum(not np.array_equal(np.asarray(s.load()), np.asarray(t.load()))
                  for s, t in zip(a.tensors, b.tensors) if s.name.startswith("blk."))
    assert changed >= 20
