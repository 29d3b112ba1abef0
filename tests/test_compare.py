"""kquant-compare: its table against kquant-perplexity --kl-divergence's own figures, the weight
errors, the plot, and its errors on bad input (the project's tiny model, 2 chunks of 128)."""
from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from kquant.cli.compare import main
from kquant.cli.perplexity import main as perplexity_main
from kquant.files.source import KV, ModelSource

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "data" / "calibration.txt"
OPTS = ["-c", "128", "--chunks", "2", "-t", "2", "--device", "cpu", "--no-progress"]  # 126 scored tokens


def run_main(fn, args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = fn(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quants(tmp_path_factory, tiny_llama_f32) -> dict[str, Path]:
    from kquant import QuantizeOptions, quantize_model
    from kquant.quantization.mixes import parse_ftype

    folder = tmp_path_factory.mktemp("compare")
    out = {}
    for ftype in ("Q8_0", "Q4_K_M"):
        out[ftype] = folder / f"tiny-{ftype}.gguf"
        quantize_model(tiny_llama_f32, out[ftype], parse_ftype(ftype), QuantizeOptions(), progress=False)
    return out


@pytest.fixture(scope="module")
def compared(tiny_llama_f32, quants) -> tuple[str, Path]:
    """One kquant-compare run: BASE, Q8_0, Q4_K_M and BASE again as a QUANT, with --tensors and --plot."""
    png = quants["Q8_0"].with_name("kld.png")
    rc, out, err = run_main(main, [str(tiny_llama_f32), str(quants["Q8_0"]), str(quants["Q4_K_M"]),
                                   str(tiny_llama_f32), "-f", str(CALIB), *OPTS, "--tensors", "--plot", str(png)])
    assert rc == 0, err
    return out, png


def table(out: str) -> list[list[str]]:
    """The main table's data rows, as cells."""
    lines = out.split("\n\n")[0].splitlines()
    assert lines[0].startswith("| file | size (bytes) | bpw | PPL | mean KLD | median KLD | p99 KLD | same top (%)")
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def perplexity_figures(out: str) -> list[str]:
    """PPL(Q), mean, median and 99% KLD, same top, as kquant-perplexity --kl-divergence prints them."""
    labels = ("Mean PPL(Q)                   :", "Mean    KLD:", "Median  KLD:", "99.0%   KLD:", "Same top p:")
    return [re.search(re.escape(label) + r"\s+(\S+?)%?\s", out).group(1) for label in labels]


def test_figures_are_kquant_perplexitys(tmp_path, tiny_llama_f32, quants, compared):
    """Every PPL/KLD/same-top cell is what kquant-perplexity prints for the same files and options,
    character for character; BASE's PPL is its Final estimate."""
    rows = table(compared[0])
    logits = tmp_path / "base.logits"
    rc, out, err = run_main(perplexity_main, ["-m", str(tiny_llama_f32), "-f", str(CALIB), *OPTS,
                                              "--kl-divergence-base", str(logits)])
    assert rc == 0, err
    final = re.search(r"Final estimate: PPL = (\S+)", out).group(1)
    assert f"{float(rows[0][3]):.4f}" == final
    for row, model in zip(rows[1:], [quants["Q8_0"], quants["Q4_K_M"], tiny_llama_f32]):
        rc, out, err = run_main(perplexity_main, ["-m", str(model), "--kl-divergence-base", str(logits),
                                                  "--kl-divergence", *OPTS])
        assert rc == 0, err
        assert [row[3], row[4], row[5], row[6], row[7]] == perplexity_figures(out), model.name


def test_api_report(tiny_llama_f32, quants, compared):
    """compare() returns what the CLI prints; BASE's PPL to kquant-perplexity's 4 digits."""
    from kquant.validation.common import PerplexityParams
    from kquant.validation.compare import compare

    report = compare(tiny_llama_f32, [quants["Q4_K_M"]], CALIB, PerplexityParams(n_ctx=128, n_chunks=2),
                     device="cpu", n_threads=2, progress=False, log=lambda s: None)
    rows = table(compared[0])
    assert report.to_markdown().splitlines()[2:4] == [
        "| " + " | ".join(rows[0]) + " |", "| " + " | ".join(rows[2]) + " |"]
    assert report.n_chunks == 2 and report.n_ctx == 128 and not report.weighted
    q = report.quants[0]
    assert q.kld is not None and q.kld.stats.count == 2 * 63
    assert q.size == quants["Q4_K_M"].stat().st_size and 4.5 < q.bpw < 5.5
    assert report.base.bpw == 32.0 and report.base.size == tiny_llama_f32.stat().st_size
    assert report.summary().startswith("kquant-compare: 1 file(s) against tiny-llama-f32.gguf over 2 chunks x 128")


def test_base_against_itself(compared):
    rows = table(compared[0])
    assert rows[0][0] == "tiny-llama-f32.gguf (base)" and rows[0][4:] == ["0", "0", "0", "100", "0"]
    itself = rows[3]
    assert itself[0] == "tiny-llama-f32.gguf" and itself[3] == rows[0][3]
    # the base logits are stored as llama-perplexity stores them (uint16 steps of 16/65535), so the
    # model against itself is 0 only to that rounding, as in llama-perplexity
    assert abs(float(itself[4])) < 1e-5 and abs(float(itself[5])) < 1e-5
    assert itself[7] == "100.000" and float(itself[8]) == 0.0


def test_weight_error_order(compared):
    rows = table(compared[0])
    q8, q4 = float(rows[1][8]), float(rows[2][8])
    assert 0 < q8 < q4 < 0.05
    assert float(rows[1][4]) < float(rows[2][4])  # and so is the KLD
    out = compared[0]
    # --tensors: one table per QUANT, its types as stored
    assert "### tiny-Q4_K_M.gguf" in out and "| blk.0.ffn_up.weight | Q4_K |" in out
    assert "| output.weight | Q6_K |" in out and "| output.weight | Q8_0 |" in out
    assert re.search(r"^kquant-compare: 3 file\(s\) against tiny-llama-f32.gguf over 2 chunks x 128 tokens",
                     out, re.M)


def test_plot(compared):
    png = compared[1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in png.parent.iterdir() if p.name.endswith(".part")]  # written atomically


def _imatrix(tiny_llama_f32, path: Path, fmt: str, ones: bool = False) -> Path:
    from kquant.calibration.imatrix_file import Imatrix, ImatrixEntry, save_imatrix
    from kquant.files.gguf_read import load_gguf

    rng = np.random.default_rng(0)
    im = Imatrix(chunk_count=1, chunk_size=128)
    for t in load_gguf(tiny_llama_f32).tensors:
        if len(t.shape) == 2 and t.name.startswith("blk."):
            n = t.shape[0]
            sums = np.full(n, 10.0, np.float32) if ones else rng.gamma(0.5, 20.0, n).astype(np.float32)
            im.entries[t.name] = ImatrixEntry(sums, np.array([10], np.int64))
    return save_imatrix(im, path, fmt)


def test_imatrix_weights_the_error(tmp_path, tiny_llama_f32, quants):
    """GGUF and legacy .dat give the same weights; all-equal weights give the unweighted error;
    uneven ones another, still 0 for BASE against itself."""
    from kquant.files.gguf_read import load_gguf
    from kquant.validation.compare import imatrix_weights, weight_errors

    base, q4 = load_gguf(tiny_llama_f32), load_gguf(quants["Q4_K_M"])
    plain = weight_errors(base, q4)
    ones = imatrix_weights(_imatrix(tiny_llama_f32, tmp_path / "ones.gguf", "gguf", ones=True), base)
    np.testing.assert_allclose([e.error for e in weight_errors(base, q4, ones)], [e.error for e in plain],
                               rtol=1e-12)
    w_gguf = imatrix_weights(_imatrix(tiny_llama_f32, tmp_path / "im.gguf", "gguf"), base)
    w_dat = imatrix_weights(_imatrix(tiny_llama_f32, tmp_path / "im.dat", "dat"), base)
    weighted = weight_errors(base, q4, w_gguf)
    assert [e.error for e in weighted] == [e.error for e in weight_errors(base, q4, w_dat)]
    by_name = {e.name: (e.error, p.error) for e, p in zip(weighted, plain)}
    assert by_name["token_embd.weight"][0] == by_name["token_embd.weight"][1]  # not in the imatrix
    assert by_name["blk.0.attn_q.weight"][0] != pytest.approx(by_name["blk.0.attn_q.weight"][1], rel=1e-3)
    assert all(e.error == 0 for e in weight_errors(base, base, w_gguf))


# --- bad input -------------------------------------------------------------------------------

def run_error(args: list[str]) -> str:
    rc, out, err = run_main(main, args)
    assert rc == 1, out + err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("kquant-compare: error: ") and "Traceback" not in err
    return lines[-1]


def _variant(tiny_llama_f32, path: Path, arch: str | None = None, token: str | None = None,
             n_layers: int | None = None, iq_no_codec: str | None = None) -> Path:
    """The tiny model with another architecture name, one token renamed, fewer blocks, or one
    tensor (zeros) in a type kquant does not decode."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from kquant.files.gguf_read import load_gguf
    from kquant.files.gguf_write import write_gguf
    from kquant.files.source import SourceTensor

    src = load_gguf(tiny_llama_f32)
    kv = []
    for k in src.kv:
        if arch is not None and k.key == "general.architecture":
            k = KV(k.key, arch, k.type)
        elif token is not None and k.key == "tokenizer.ggml.tokens":
            k = KV(k.key, [token, *k.value[1:]], k.type, k.sub_type)
        elif n_layers is not None and k.key == "llama.block_count":
            k = KV(k.key, n_layers, k.type)
        kv.append(k)
    tensors = [t for t in src.tensors
               if n_layers is None or not t.name.startswith("blk.") or int(t.name.split(".")[1]) < n_layers]
    if iq_no_codec:  # a type kquant has no codec for
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType.TQ2_0]
        tensors = [SourceTensor(t.name, t.shape, GGMLQuantizationType.TQ2_0,
                                lambda t=t: np.zeros(t.n_elements // block * size, np.uint8))
                   if t.name == iq_no_codec else t for t in tensors]
    return write_gguf(ModelSource(arch or src.arch, kv, tensors), path, progress=False)


def test_bad_inputs(tmp_path, tiny_llama_f32, quants):
    base, q8 = str(tiny_llama_f32), str(quants["Q8_0"])
    f = ["-f", str(CALIB), *OPTS]
    assert "no such file" in run_error([str(tmp_path / "missing.gguf"), q8, *f])
    assert "missing.gguf: no such file" in run_error([base, str(tmp_path / "missing.gguf"), *f])
    assert "at least one QUANT" in run_error([base, *f])
    assert "no text" in run_error([base, q8, *OPTS])
    assert "cannot read the text file" in run_error([base, q8, "-f", str(tmp_path / "none.txt"), *OPTS])
    assert "neither a GGUF" in run_error([base, str(CALIB), *f])
    for n in ("0", "-3"):
        assert f"--chunks must be a number above 0, or -1 for all of the text, not {n}" in run_error([base, q8, "-f", str(CALIB), "--chunks", n])
    other = _variant(tiny_llama_f32, tmp_path / "vocab.gguf", token="<other>")
    assert "its vocabulary differs from the base model's (token 0: '<other>'" in run_error([base, q8, str(other), *f])
    other = _variant(tiny_llama_f32, tmp_path / "arch.gguf", arch="qwen2")
    assert "architecture qwen2 differs from the base model's (llama)" in run_error([base, str(other), *f])
    other = _variant(tiny_llama_f32, tmp_path / "layers.gguf", n_layers=3)
    assert "another architecture" in run_error([base, str(other), *f])
    other = _variant(tiny_llama_f32, tmp_path / "tq2_0.gguf", iq_no_codec="blk.0.attn_k.weight")
    assert "blk.0.attn_k.weight is TQ2_0, which kquant cannot dequantize" in run_error([base, str(other), *f])
    assert "does not exist" in run_error([base, q8, *f, "--plot", str(tmp_path / "no" / "kld.png")])
    assert "is also an input" in run_error([base, q8, *f, "--plot", q8])
    not_im = tmp_path / "bad.imatrix"
    not_im.write_bytes(b"\x00" * 8)
    assert "bad.imatrix" in run_error([base, q8, *f, "--imatrix", str(not_im)])


def test_imatrix_of_another_model(tmp_path, tiny_llama_f32, quants):
    from kquant.calibration.imatrix_file import Imatrix, ImatrixEntry, save_imatrix

    im = Imatrix(chunk_count=1, chunk_size=128)
    im.entries["blk.0.attn_q.weight"] = ImatrixEntry(np.ones(576, np.float32), np.array([1], np.int64))
    path = save_imatrix(im, tmp_path / "other.gguf")
    msg = run_error([str(tiny_llama_f32), str(quants["Q8_0"]), "-f", str(CALIB), *OPTS, "--imatrix", str(path)])
    assert "576 weights for rows of 256" in msg


def test_text_too_short(tmp_path, tiny_llama_f32, quants):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.\n")
    msg = run_error([str(tiny_llama_f32), str(quants["Q8_0"]), "-f", str(text), *OPTS])
    assert "you need at least 256 tokens" in msg and "tokenizes to only" in msg
    assert list(tmp_path.iterdir()) == [text]


def test_plot_without_matplotlib(tmp_path, monkeypatch, tiny_llama_f32, quants):
    """A missing matplotlib fails at once, before any model runs, and writes nothing."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "kld.png"
    msg = run_error([str(tiny_llama_f32), str(quants["Q8_0"]), "-f", str(CALIB), *OPTS, "--plot", str(png)])
    assert "--plot needs matplotlib" in msg and not png.exists()
