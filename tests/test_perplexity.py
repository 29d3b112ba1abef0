"""kquant-perplexity and kquant-generate against llama.cpp: outputs of llama-perplexity made once
(tests/data/perplexity_ref, with the commands in its README), its logits-file format, and
llama-cpp-python's greedy generation."""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kquant.cli.perplexity import main
from kquant.validation.logits_file import BaseLogits, row_values

ROOT = Path(__file__).resolve().parents[1]
REF = Path(__file__).parent / "data" / "perplexity_ref"
WIKI = ROOT.parent / "shared" / "text" / "eval" / "wiki.test.raw"
BASE_C64 = REF / "tiny-llama-f32.c64.logits"

CALIB = ROOT / "data" / "calibration.txt"

# Quantized models. Each of kquant's products equals ggml's up to float32 summation order
# (tests/test_runtime.py, against libggml-cpu), but a last-bit difference that moves an activation
# across a rounding boundary of Q8_K/Q8_0 changes it by a whole quantum, and the network carries
# that on: logits of single tokens then differ by ~1e-3 and a few short chunks' PPL by up to 0.3%.
# Over a whole text in the model's own domain these average out: the tiny model's final estimates
# agree to 2e-4 and its KL-divergence statistics to 0.3%, which is what these tests hold. On
# SmolLM2's 30 blocks the flips compound further (test_smollm2_quantized_matches_llama_perplexity).

@pytest.fixture(scope="module", autouse=True)
def _wiki():
    if not WIKI.is_file():
        pytest.skip(f"evaluation text ({WIKI}) not available")


def chunk_ppls(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\[\d+\]([\d.]+),", text)]


def final_estimate(text: str) -> tuple[float, float]:
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", text)
    assert m, text
    return float(m.group(1)), float(m.group(2))


def run(capsys, args: list[str]) -> str:
    assert main([*args, "-t", "2", "--device", "cpu", "--no-progress"]) == 0
    return capsys.readouterr().out


# --- models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_quant(tmp_path_factory, tiny_llama_f32):
    """The tiny model quantized by kquant-quantize (byte-identical to llama-quantize)."""
    from conftest import tiny_quantize_options

    from kquant import quantize_model
    from kquant.quantization.mixes import parse_ftype

    made: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("tiny-quant")

    def get(ftype: str) -> Path:
        if ftype not in made:
            made[ftype] = folder / f"tiny-llama-{ftype}.gguf"
            quantize_model(tiny_llama_f32, made[ftype], parse_ftype(ftype), tiny_quantize_options(ftype),
                           progress=False)
        return made[ftype]
    return get


@pytest.fixture(scope="module")
def smollm2_f16_full(tmp_path_factory):
    """SmolLM2-135M, all 30 blocks, F16 from the PyPI Q4_1."""
    from conftest import _smollm2_path, write_smollm2_f16

    if _smollm2_path() is None:
        pytest.skip("SmolLM2 model not available")
    return write_smollm2_f16(tmp_path_factory.mktemp("smollm2-full") / "smollm2-f16.gguf", 30)


@pytest.fixture(scope="module")
def smollm2_quant(smollm2_f16_full):
    """SmolLM2-135M F16 quantized by kquant-quantize (byte-identical to llama-quantize)."""
    from kquant import QuantizeOptions, quantize_model
    from kquant.quantization.mixes import parse_ftype

    def get(ftype: str) -> Path:
        out = smollm2_f16_full.with_name(f"smollm2-{ftype}.gguf")
        if not out.is_file():
            quantize_model(smollm2_f16_full, out, parse_ftype(ftype), QuantizeOptions(), progress=False)
        return out
    return get


@pytest.fixture(scope="module")
def smollm2_q4_k_m(smollm2_quant):
    return smollm2_quant("Q4_K_M")


def model_path(request, tiny_quant, name: str) -> Path:
    if name == "tiny-f32":
        return request.getfixturevalue("tiny_llama_f32")
    if name.startswith("tiny-"):
        return tiny_quant(name[5:])
    if name.startswith(("phi3-", "phi4-", "gemma2-", "gemma3-", "qwen3moe-", "qwen2moe-", "mixtral-")):  # the HF fixtures
        arch, _, ftype = name.rpartition("-")
        return request.getfixturevalue("hf_fixture_gguf")(f"tiny-{arch}", ftype)
    return request.getfixturevalue({"smollm2-2l-f32": "smollm2_2l_f32", "smollm2-Q4_K_M": "smollm2_q4_k_m"}[name])


# --- perplexity against llama-perplexity ---------------------------------------------------

# (reference output, model, arguments): tests/data/perplexity_ref/README.md
CASES = [
    pytest.param("tiny-llama-f32.c128", "tiny-f32", ["-c", "128", "--chunks", "8"], id="tiny-f32-c128"),
    pytest.param("tiny-llama-f32.c256b128", "tiny-f32", ["-c", "256", "-b", "128", "--chunks", "3"],
                 id="tiny-f32-c256-b128"),
    pytest.param("smollm2-2l-f32.c512", "smollm2-2l-f32", ["--chunks", "4"], id="smollm2-2l-f32-c512"),
    # i-quants: IQ4_NL against Q8_0 activations,
    # IQ4_XS against Q8_K (measured: final estimates 1.6e-4 and 8.6e-4 from llama-perplexity's)
    pytest.param("tiny-llama-IQ4_NL.c128", "tiny-IQ4_NL", ["-c", "128", "--chunks", "8"], id="tiny-IQ4_NL-c128"),
    pytest.param("tiny-llama-IQ4_XS.c128", "tiny-IQ4_XS", ["-c", "128", "--chunks", "8"], id="tiny-IQ4_XS-c128"),
    # IQ3_XXS (with IQ3_S and Q5_K tensors) and IQ3_S against Q8_K (measured: final estimates
    # 2.6e-4 and 5.9e-4 from llama-perplexity's, single chunks up to 2.7e-3 and 1.1e-3: see
    # IQ3_CHUNK_RTOL; IQ3_M: 8.6e-4 and 1.6e-3. --exact prints their digits, tests/test_exact.py)
    pytest.param("tiny-llama-IQ3_XXS.c128", "tiny-IQ3_XXS", ["-c", "128", "--chunks", "8"], id="tiny-IQ3_XXS-c128"),
    pytest.param("tiny-llama-IQ3_S.c128", "tiny-IQ3_S", ["-c", "128", "--chunks", "8"], id="tiny-IQ3_S-c128"),
    # phi3: short rope factors at -c 128, long ones (and the attention factor) at -c 512
    pytest.param("tiny-phi3-Q4_K_M.c128", "phi3-Q4_K_M", ["-c", "128", "--chunks", "8"], id="phi3-Q4_K_M-c128"),
    pytest.param("tiny-phi3-Q4_K_M.c512", "phi3-Q4_K_M", ["-c", "512", "--chunks", "4"], id="phi3-Q4_K_M-c512"),
    # phi4 (Phi-4-mini's layout): GPT-4o's pre-tokenizer on wiki.test.raw, tied output
    pytest.param("tiny-phi4-Q4_K_M.c128", "phi4-Q4_K_M", ["-c", "128", "--chunks", "8"], id="phi4-Q4_K_M-c128"),
    # gemma2: 128-token chunks cross its 32-token sliding window
    pytest.param("tiny-gemma2-f32.c128", "gemma2-F32", ["-c", "128", "--chunks", "8"], id="gemma2-f32-c128"),
    pytest.param("tiny-gemma2-Q4_K_M.c128", "gemma2-Q4_K_M", ["-c", "128", "--chunks", "8"], id="gemma2-Q4_K_M-c128"),
    # gemma3: 5 windowed layers (rope base 10000) and a global one (base 1e6; -vl: rope scaled by 8)
    pytest.param("tiny-gemma3-Q4_K_M.c128", "gemma3-Q4_K_M", ["-c", "128", "--chunks", "8"], id="gemma3-Q4_K_M-c128"),
    pytest.param("tiny-gemma3-vl-Q4_K_M.c128", "gemma3-vl-Q4_K_M", ["-c", "128", "--chunks", "8"],
                 id="gemma3-vl-Q4_K_M-c128"),
    # mixture of experts: 8 experts, 2 per token (Q4_K_M: Q4_K/Q6_K expert slabs, the router F32)
    pytest.param("tiny-qwen3moe-f32.c128", "qwen3moe-F32", ["-c", "128", "--chunks", "8"], id="qwen3moe-f32-c128"),
    pytest.param("tiny-qwen3moe-Q4_K_M.c128", "qwen3moe-Q4_K_M", ["-c", "128", "--chunks", "8"],
                 id="qwen3moe-Q4_K_M-c128"),
    # 4 experts, not renormalized, and a shared expert behind its sigmoid gate
    pytest.param("tiny-qwen2moe-f32.c128", "qwen2moe-F32", ["-c", "128", "--chunks", "8"], id="qwen2moe-f32-c128"),
    pytest.param("tiny-qwen2moe-Q4_K_M.c128", "qwen2moe-Q4_K_M", ["-c", "128", "--chunks", "8"],
                 id="qwen2moe-Q4_K_M-c128"),
    # mixtral (arch llama with experts): 8 experts, llama-quantize's 8-expert rules
    pytest.param("tiny-mixtral-f32.c128", "mixtral-F32", ["-c", "128", "--chunks", "8"], id="mixtral-f32-c128"),
    pytest.param("tiny-mixtral-Q4_K_M.c128", "mixtral-Q4_K_M", ["-c", "128", "--chunks", "8"],
                 id="mixtral-Q4_K_M-c128"),
]


# 3-bit weights carry a flipped activation quantum further: a chunk of the IQ3_XXS file moves by
# 2.7e-3 with products that differ from ggml's only in float32 summation order (the final
# estimate by 2.6e-4)
IQ3_CHUNK_RTOL = 3e-3
# The Q8_K i-quants' default path runs their products in float32 BLAS on dequantized weights, so
# OpenBLAS's kernel choice moves them: the tolerances above were measured with its SkylakeX
# kernel (AVX-512, Zen 4); its Haswell kernel (AVX2-only CPUs, Zen 1-3) moved IQ4_XS's chunks by
# up to 3.0e-3 and its final line by 1.1e-3 (uncertainty 1.5e-3), IQ3_XXS's chunks by 3.7e-3,
# IQ2_M's by 3.5e-3. --exact holds the digits on every CPU (tests/test_exact.py).
BLAS_KERNEL_RTOL = 5e-3


@pytest.mark.parametrize("ref_name, model, args", CASES)
def test_matches_llama_perplexity(request, capsys, tiny_quant, ref_name, model, args):
    """Per-chunk perplexities and the final estimate (with its uncertainty) as llama-perplexity
    prints them: F32 models within 1e-4, quantized ones within 0.1%."""
    out = run(capsys, ["-m", str(model_path(request, tiny_quant, model)), "-f", str(WIKI), *args])
    ref = (REF / f"{ref_name}.out").read_text()
    rtol = 1e-4 if "f32" in model.lower() else 2e-3 if model == "tiny-IQ4_XS" else 1e-3
    # gemma2's GELU reads ggml's float16 table: an input one float16 step away moves it by up to
    # 1e-3, and on a quantized file (activations rounded to 8 bits) single chunks move by 1.4e-3
    chunk_rtol = (2e-3 if model == "gemma2-Q4_K_M" else
                  BLAS_KERNEL_RTOL if model in ("tiny-IQ4_XS", "tiny-IQ3_XXS") else
                  IQ3_CHUNK_RTOL if "IQ3" in model else rtol)
    ours, theirs = chunk_ppls(out), chunk_ppls(ref)
    assert len(ours) == len(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=chunk_rtol)
    np.testing.assert_allclose(final_estimate(out), final_estimate(ref), rtol=rtol)


@pytest.mark.parametrize("ftype", ["IQ2_M", "IQ2_M-plain", "IQ1_S", "IQ1_M"])
def test_grid_i_quants_match_llama_perplexity(capsys, tiny_llama_cpp_grid_quant, ftype):
    """The tiny model's llama-quantize IQ2_M (IQ2_S, IQ2_XS, IQ2_XXS matrices), IQ1_S and IQ1_M
    files (conftest.tiny_llama_cpp_grid_quant) against llama-perplexity. Measured (2-vCPU AMD
    EPYC): chunks within 1.7e-3, 1.6e-3, 1.3e-3 (IQ2_M's first 249.4323 against 249.0254), final
    estimates +9.8e-4, +7.1e-4, +1.1e-3, their uncertainties within 2.1e-3: 1- and 2-bit
    weights make the logits more sensitive to the float32 summation order of the BLAS products
    than IQ4's 4-bit ones (1e-3 there), so 2e-3 for the chunks, 3e-3 for the final line;
    --exact gives the printed digits (tests/test_exact.py). The plain IQ2_M file (IQ2_S with
    IQ3_S tensors): chunks within 3.5e-3 (its first 238.7530 against 237.9246), final +1.5e-3,
    so IQ3_CHUNK_RTOL + 1e-3 for its chunks."""
    out = run(capsys, ["-m", str(tiny_llama_cpp_grid_quant(ftype)), "-f", str(WIKI), "-c", "128", "--chunks", "8"])
    ref = (REF / f"tiny-llama-{ftype}.c128.out").read_text()
    ours, theirs = chunk_ppls(out), chunk_ppls(ref)
    assert len(ours) == len(theirs) == 8
    np.testing.assert_allclose(ours, theirs, rtol=BLAS_KERNEL_RTOL)
    np.testing.assert_allclose(final_estimate(out), final_estimate(ref), rtol=3e-3)


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q6_K", "Q2_K"])
def test_smollm2_quantized_matches_llama_perplexity(capsys, smollm2_quant, ftype):
    """SmolLM2-135M (30 blocks; its 576-wide rows fall back to Q5_0/Q8_0/Q4_1) on 20 chunks of
    WikiText-2 against llama-perplexity's AVX2 build. Measured on an AVX-512 Xeon: -4.4e-4,
    +4.9e-4, -1.1e-3 (Q4_K_M, Q6_K, Q2_K). Every product rounds its activations to 8 bits, so
    any change of float32 summation order moves a 20-chunk estimate by up to ~0.2%, in llama.cpp
    as in kquant: llama.cpp's AVX-512 build differs from its AVX2 build by -6.0e-4, -1.7e-3,
    -2.1e-3 on these files; kquant with OpenBLAS's Haswell kernel instead of SkylakeX gives
    -1.9e-3, -7.1e-4, -8.5e-4 (README; tools/compare_perplexity.py shows the per-token KL
    divergences, kquant's from llama.cpp as large as llama.cpp's between its builds); on a
    2-vCPU AMD EPYC (Haswell kernel, products cut in one tile per CPU) Q4_K_M gave -2.6e-3. The
    final estimate must be within that spread, 3e-3; each running estimate within 2%
    (measured: at most 1.1e-2 for kquant, 7e-3 for llama.cpp's AVX-512 build)."""
    out = run(capsys, ["-m", str(smollm2_quant(ftype)), "-f", str(WIKI), "--chunks", "20"])
    ref = (REF / f"smollm2-{ftype}.c512x20.out").read_text()
    ours, theirs = chunk_ppls(out), chunk_ppls(ref)
    assert len(ours) == len(theirs) == 20
    np.testing.assert_allclose(ours, theirs, rtol=2e-2)
    np.testing.assert_allclose(final_estimate(out), final_estimate(ref), rtol=3e-3)


# --- token by token against llama.cpp (llama-cpp-python) on the real model ----------------

def _chunk_tokens(llama_cpp, path: Path, n: int = 512) -> np.ndarray:
    """BOS and the first n-1 tokens of wiki.test.raw: llama-perplexity's first chunk."""
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    text = WIKI.read_text(encoding="utf-8")[:20000].encode()
    return np.array([vocab.token_bos(), *vocab.tokenize(text, add_bos=False)[:n - 1]], np.int64)


def _second_half_log_probs(logits: np.ndarray) -> np.ndarray:
    """Log-softmax (float64) of the rows llama-perplexity scores: the second half, last excluded."""
    n = len(logits)
    z = logits[n // 2:n - 1].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _agreement(base: np.ndarray, other: np.ndarray, tokens: np.ndarray) -> tuple[float, float, float]:
    """Mean KL divergence of `other` from `base`, the share of rows with the same top token,
    and the relative difference of the two perplexities over the scored rows."""
    a, b = _second_half_log_probs(base), _second_half_log_probs(other)
    kld = float((np.exp(a) * (a - b)).sum(axis=1).mean())
    same_top = float((a.argmax(axis=1) == b.argmax(axis=1)).mean())
    rows, targets = np.arange(len(a)), tokens[len(tokens) // 2 + 1:]
    ppl_rel = math.exp(a[rows, targets].mean() - b[rows, targets].mean()) - 1  # PPL(other)/PPL(base) - 1
    return kld, same_top, ppl_rel


def _llama_cpp_logits(llama_cpp, path: Path, tokens: np.ndarray) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=len(tokens), n_batch=len(tokens),
                          n_threads=2, flash_attn=True, verbose=False)
    llm.eval(tokens.tolist())
    return np.array(llm.scores[:len(tokens)], np.float32)


@pytest.mark.slow
def test_smollm2_f16_tokens_agree_with_llama_cpp(llama_cpp, smollm2_f16_full):
    """All 30 blocks at F16, one 512-token chunk: the same distributions as llama.cpp's
    (measured: mean KLD 2.6e-6, every top token the same, chunk PPL within 2e-4)."""
    from kquant.runtime import Segment, load_model

    tokens = _chunk_tokens(llama_cpp, smollm2_f16_full)
    model = load_model(smollm2_f16_full, progress=False)
    ours = model.forward([Segment(tokens, model.new_cache(len(tokens)))])
    kld, same_top, ppl_rel = _agreement(_llama_cpp_logits(llama_cpp, smollm2_f16_full, tokens), ours, tokens)
    assert kld < 1e-4 and same_top > 0.99 and abs(ppl_rel) < 1e-3


@pytest.mark.slow
def test_smollm2_quantized_tokens_agree_with_llama_cpp_as_kquant_with_itself(llama_cpp, smollm2_q4_k_m):
    """Q4_K_M rounds every product's activations to 8 bits (Q8_0, Q8_K). On this 30-block model
    a last-bit change anywhere flips some of those roundings and the flips compound: two
    float32 summation orders of the same arithmetic give different token distributions. This
    holds kquant to llama.cpp by that yardstick: its distance from llama.cpp's logits is no
    more than about its distance from itself when only the attention's summation order changes
    (`exact_attention`, ggml's own flash-attention order). Measured on one 512-token chunk:
    kquant vs llama.cpp mean KLD 6.1e-3, kquant vs kquant 5.4e-3 (with OpenBLAS's Haswell
    kernel: 5.9e-3 and 5.1e-3); the quantization itself (F16 vs Q4_K_M) 6.1e-2."""
    from kquant.runtime import Segment, load_model

    tokens = _chunk_tokens(llama_cpp, smollm2_q4_k_m)
    model = load_model(smollm2_q4_k_m, progress=False)
    ours = model.forward([Segment(tokens, model.new_cache(len(tokens)))])
    model.exact_attention = True
    reordered = model.forward([Segment(tokens, model.new_cache(len(tokens)))])
    ref = _llama_cpp_logits(llama_cpp, smollm2_q4_k_m, tokens)
    kld, same_top, _ = _agreement(ref, ours, tokens)
    kld_self, _, _ = _agreement(reordered, ours, tokens)
    assert 0 < kld_self < 2e-2
    assert kld < 2.5 * kld_self and same_top > 0.93


QUANT_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0", "Q5_1"]
# the fast lane keeps one K-quant mix; the rest (each a quantization and a whole-text run) are slow
QUANT_CASES = [t if t == "Q4_K_M" else pytest.param(t, marks=pytest.mark.slow) for t in QUANT_TYPES]


@pytest.mark.parametrize("ftype", QUANT_CASES)
def test_quantized_matches_llama_perplexity(capsys, tiny_quant, ftype):
    """The tiny model in eight types (every product kernel family: K-quants, Q4_0/Q8_0, Q5_1's
    Q8_1 block sums) over the whole calibration text at llama-perplexity's defaults (35 chunks
    of 512): the final estimate within 0.1% (measured: 3.9e-4 at most, Q4_K_M), each chunk within 1%."""
    out = run(capsys, ["-m", str(tiny_quant(ftype)), "-f", str(CALIB)])
    ref = (REF / f"tiny-llama-{ftype}.calib.out").read_text()
    ours, theirs = chunk_ppls(out), chunk_ppls(ref)
    assert len(ours) == len(theirs) == 35
    np.testing.assert_allclose(ours, theirs, rtol=1e-2)
    np.testing.assert_allclose(final_estimate(out), final_estimate(ref), rtol=1e-3)


def test_strided_matches_llama_perplexity(capsys, tiny_llama_f32):
    """--ppl-stride: llama-perplexity's perplexity_v2 (256-token windows every 64 tokens here)."""
    out = run(capsys, ["-m", str(tiny_llama_f32), "-f", str(WIKI), "-c", "128", "-b", "128",
                       "--ppl-stride", "64", "--chunks", "4"])
    np.testing.assert_allclose(chunk_ppls(out), chunk_ppls((REF / "tiny-llama-f32.c128s64.out").read_text()),
                               rtol=1e-4)
    assert "Final estimate" not in out  # llama-perplexity prints none in this mode


def test_output_lines(capsys, tiny_llama_f32):
    """llama-perplexity's progress line on stdout, its timing line on stderr, the closing
    estimate and kquant's one-line summary; --ppl-output-type 1 prints a line per chunk."""
    assert main(["-m", str(tiny_llama_f32), "-f", str(WIKI), "-c", "128", "--chunks", "3", "-t", "2",
                 "--no-progress"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert re.fullmatch(r"(\[\d\]\d+\.\d{4},){3}", lines[0])
    assert re.fullmatch(r"Final estimate: PPL = \d+\.\d{4} \+/- \d+\.\d{5}", lines[1])
    assert re.fullmatch(r"kquant-perplexity: 3 chunks x 128 tokens in [\d.]+ s \(\d+ tokens/s\), "
                        r"PPL \d+\.\d{4}, [\d.]+ s in all", lines[2])
    assert re.search(r"^perplexity: \d+\.\d\d seconds per pass - ETA \d+\.\d\d minutes$", cap.err, re.M)
    assert "n_ctx=128, batch_size=2048, n_seq=16" in cap.err
    out = run(capsys, ["-m", str(tiny_llama_f32), "-f", str(WIKI), "-c", "128", "--chunks", "2",
                       "--ppl-output-type", "1"])
    assert re.match(r"       0  \d+\.\d{4}  \d+\.\d{6}  \d+\.\d{6}\n       0  ", out)


def test_python_api_and_array_module_path(tiny_llama_f32):
    """kquant.validation.perplexity.perplexity on the CuPy code path (a numpy stand-in) gives the same chunks."""
    from test_runtime import _NumpyStandIn

    from kquant.files.text import read_text
    from kquant.validation.perplexity import PerplexityParams, perplexity
    from kquant.models import open_model
    from kquant.runtime import Transformer
    from kquant.tokenizer import Tokenizer

    source = open_model(tiny_llama_f32, "f32")
    tok = Tokenizer.from_source(source)
    tokens = tok.tokenize(read_text(WIKI)[:20000])
    params = PerplexityParams(n_ctx=128, n_chunks=3)
    printed: list[str] = []
    results = [perplexity(Transformer(source, "cpu", progress=False, xp=xp), tokens, params, tok.bos_id,
                          tok.n_vocab, progress=False, log=lambda s: None, emit=printed.append)
               for xp in (None, _NumpyStandIn())]
    a, b = results
    assert a.n_chunks == 3 and a.n_scored == 3 * 63 and a.ppl == pytest.approx(a.chunk_ppl[-1])
    assert b.chunk_ppl == pytest.approx(a.chunk_ppl, rel=1e-5)
    assert "".join(printed[:4]) == "".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(a.chunk_ppl)) + "\n"


# --- the logits file and KL divergence -------------------------------------------------------

def test_base_file_is_llamas_format(tmp_path, capsys, tiny_llama_f32):
    """--kl-divergence-base writes llama-perplexity's file: the same header and tokens byte for
    byte, the same size and layout, and the same compressed log-probabilities but where the last
    bits of the logits move a rounding (kquant's F32 logits are llama.cpp's within ~1e-6)."""
    ours = tmp_path / "base.logits"
    out = run(capsys, ["-m", str(tiny_llama_f32), "-f", str(WIKI), "-c", "64", "--chunks", "2",
                       "--kl-divergence-base", str(ours)])
    ref = (REF / "tiny-llama-f32.c64.base.out").read_text()
    np.testing.assert_allclose(chunk_ppls(out), chunk_ppls(ref), rtol=1e-4)
    a, b = ours.read_bytes(), BASE_C64.read_bytes()
    assert len(a) == len(b)
    n_head = 20 + 4 * 64 * 2
    assert a[:n_head] == b[:n_head]
    x, y = BaseLogits.open(ours), BaseLogits.open(BASE_C64)
    assert (x.n_ctx, x.n_vocab, x.n_chunk) == (64, 4096, 2) and x.log_probs.shape == (2, 31, row_values(4096))
    fx = np.ascontiguousarray(x.log_probs[..., :4]).view(np.float32)
    fy = np.ascontiguousarray(y.log_probs[..., :4]).view(np.float32)
    np.testing.assert_allclose(fx, fy, rtol=1e-4)  # scale and minimum log-probability per token
    d = np.abs(x.log_probs[..., 4:].astype(np.int32) - y.log_probs[..., 4:])
    # how many steps of the 16-bit code apart depends on the BLAS kernel summing the logits:
    # OpenBLAS's Haswell kernel (FMA over 8 lanes, as the AVX2 ggml that made the reference)
    # leaves 95% equal and 99.9% within one step, its SkylakeX and Sandybridge kernels 87-88%
    # and 98.5%; a wrong layout or token would leave next to none equal
    share0, share1 = (d == 0).mean(), (d <= 1).mean()
    assert d.max() <= 4 and share0 > 0.8 and share1 > 0.97, (d.max(), share0, share1)


# llama-perplexity's two log_softmax functions (tools/perplexity/perplexity.cpp, llama.cpp of
# llama-cpp-python 0.3.36, MIT licence), verbatim, in a harness: kquant's kernels must give the
# same bytes and values on the same logits
_HARNESS = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>
static inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i; memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}
static double log_softmax(int n_vocab, const float * logits, uint16_t * log_prob, int tok) {
    float max_logit = logits[0];
    float min_logit = logits[0];
    for (int i = 1; i < n_vocab; ++i) {
        max_logit = std::max(max_logit, logits[i]);
        min_logit = std::min(min_logit, logits[i]);
    }
    min_logit = std::max(min_logit, max_logit - 16);
    double sum_exp = 0.0;
    for (int i = 0; i < n_vocab; ++i) {
        sum_exp += expf(logits[i] - max_logit);
    }
    const float log_sum_exp = log(sum_exp);
    const float min_log_prob = min_logit - max_logit - log_sum_exp;
    const float scale = (max_logit - min_logit)/65535.f;
    float * d = (float *)log_prob;
    d[0] = scale;
    d[1] = min_log_prob;
    log_prob += 4;
    if (scale) {
        const float inv_scale = 1/scale;
        for (int i = 0; i < n_vocab; ++i) {
            log_prob[i] = logits[i] > min_logit ? nearest_int(inv_scale*(logits[i] - min_logit)) : 0;
        }
    } else {
        std::memset(log_prob, 0, n_vocab*sizeof(uint16_t));
    }
    return max_logit + log_sum_exp - logits[tok];
}
struct kl_divergence_result {
    double sum_nll = 0.0, sum_nll2 = 0.0, sum_nll_base = 0.0, sum_nll_base2 = 0.0, sum_nll_nll_base = 0.0;
    double sum_kld = 0.0, sum_kld2 = 0.0, sum_p_diff = 0.0, sum_p_diff2 = 0.0, sum_p_diff4 = 0.0;
    float max_p_diff = 0.0f; size_t n_same_top = 0; size_t count = 0;
};
static std::pair<double, float> log_softmax(int n_vocab, const float * logits, const uint16_t * base_log_prob, int tok, kl_divergence_result & kld) {
    float max_logit = logits[0];
    int imax = 0;
    for (int i = 1; i < n_vocab; ++i) {
        if (logits[i] > max_logit) {
            max_logit = logits[i];
            imax = i;
        }
    }
    double sum_exp = 0.0;
    for (int i = 0; i < n_vocab; ++i) {
        sum_exp += expf(logits[i] - max_logit);
    }
    const float log_sum_exp = log(sum_exp);
    const float * d = (const float *)base_log_prob;
    const float scale = d[0];
    const float min_log_prob = d[1];
    base_log_prob += 4;
    const float nll = max_logit + log_sum_exp - logits[tok];
    kld.sum_nll  += nll;
    kld.sum_nll2 += nll*nll;
    const float nll_base = -(scale*base_log_prob[tok] + min_log_prob);
    kld.sum_nll_base  += nll_base;
    kld.sum_nll_base2 += nll_base*nll_base;
    kld.sum_nll_nll_base += nll*nll_base;
    max_logit += log_sum_exp;
    double sum = 0;
    int imax_base = -1;
    float p_log_base_max = 0;
    for (int i = 0; i < n_vocab; ++i) {
        const float p_log_base = scale*base_log_prob[i] + min_log_prob;
        if (i == 0 || p_log_base > p_log_base_max) {
            p_log_base_max = p_log_base;
            imax_base = i;
        }
        if (p_log_base > -16.f) {
            const float p_base = expf(p_log_base);
            sum += p_base * (p_log_base - logits[i] + max_logit);
        }
    }
    kld.sum_kld  += sum;
    kld.sum_kld2 += sum*sum;
    ++kld.count;
    if (imax == imax_base) {
        ++kld.n_same_top;
    }
    const float p_base = expf(-nll_base);
    const float p = expf(-nll);
    const float p_diff = p - p_base;
    kld.sum_p_diff  += p_diff;
    const double p_diff2 = p_diff*p_diff;
    kld.sum_p_diff2 += p_diff2;
    kld.sum_p_diff4 += p_diff2*p_diff2;
    kld.max_p_diff = std::max(kld.max_p_diff, std::fabs(p_diff));
    return std::make_pair(sum, p_diff);
}
int main(int argc, char ** argv) {
    FILE * f = fopen(argv[1], "rb"); int rows, n;
    if (fread(&rows, 4, 1, f) != 1 || fread(&n, 4, 1, f) != 1) return 1;
    std::vector<float> L(size_t(rows)*n), L2(size_t(rows)*n); std::vector<int> T(rows);
    if (fread(L.data(), 4, L.size(), f) != L.size() || fread(T.data(), 4, rows, f) != size_t(rows) ||
        fread(L2.data(), 4, L2.size(), f) != L2.size()) return 1;
    fclose(f);
    const int nv = 2*((n + 1)/2) + 4;
    std::vector<uint16_t> lp(size_t(rows)*nv, 0); std::vector<double> nll(rows);
    for (int r = 0; r < rows; r++) nll[r] = log_softmax(n, L.data() + size_t(r)*n, lp.data() + size_t(r)*nv, T[r]);
    kl_divergence_result k; std::vector<float> kv(rows), pd(rows);
    for (int r = 0; r < rows; r++) {
        auto p = log_softmax(n, L2.data() + size_t(r)*n, lp.data() + size_t(r)*nv, T[r], k);
        kv[r] = p.first; pd[r] = p.second;
    }
    double s[12] = {k.sum_nll, k.sum_nll2, k.sum_nll_base, k.sum_nll_base2, k.sum_nll_nll_base, k.sum_kld,
                    k.sum_kld2, k.sum_p_diff, k.sum_p_diff2, k.sum_p_diff4, k.max_p_diff, double(k.n_same_top)};
    f = fopen(argv[2], "wb");
    fwrite(lp.data(), 2, lp.size(), f); fwrite(nll.data(), 8, rows, f); fwrite(kv.data(), 4, rows, f);
    fwrite(pd.data(), 4, rows, f); fwrite(s, 8, 12, f);
    fclose(f);
    return 0;
}
"""


def test_log_prob_kernels_are_llamas_code(tmp_path):
    """On the same logits, kquant's kernels write llama-perplexity's bytes and compute its
    KL-divergence values and sums bit for bit (its C++ compiled here, when a compiler is)."""
    from kquant.validation.kld import _kld_accumulate, _kld_rows
    from kquant.validation.logits_file import compress_log_probs

    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "h.cpp").write_text(_HARNESS)
    exe = tmp_path / "h"
    subprocess.run([cxx, "-O2", "-std=c++17", str(tmp_path / "h.cpp"), "-o", str(exe)], check=True)
    rng = np.random.default_rng(1)
    for n in (4096, 4097):  # odd vocabularies get a pad value per row
        rows = 200
        L = (rng.standard_normal((rows, n)) * 3).astype(np.float32)
        L[0] = 1.5  # a flat row: scale 0
        L[1, :100] = -40  # a range over 16: clamped minimum
        T = rng.integers(0, n, rows).astype(np.int32)
        L2 = (L + rng.standard_normal((rows, n)).astype(np.float32) * 0.3).astype(np.float32)
        (tmp_path / "in").write_bytes(np.array([rows, n], np.int32).tobytes() + L.tobytes() + T.tobytes()
                                      + L2.tobytes())
        subprocess.run([str(exe), str(tmp_path / "in"), str(tmp_path / "out")], check=True)
        raw = (tmp_path / "out").read_bytes()
        nv = row_values(n)
        want16 = np.frombuffer(raw, np.uint16, rows * nv).reshape(rows, nv)
        o = rows * nv * 2
        want_nll = np.frombuffer(raw, np.float64, rows, o)
        want_kld = np.frombuffer(raw, np.float32, rows, o + 8 * rows)
        want_pd = np.frombuffer(raw, np.float32, rows, o + 12 * rows)
        want_sums = np.frombuffer(raw, np.float64, 12, o + 16 * rows)

        got16 = np.zeros((rows, nv), np.uint16)
        nll = compress_log_probs(L, T, got16, got16.view(np.float32))
        np.testing.assert_array_equal(got16, want16)
        np.testing.assert_array_equal(nll, want_nll)
        v, vb, kld = np.empty(rows, np.float32), np.empty(rows, np.float32), np.empty(rows)
        pd, same = np.empty(rows, np.float32), np.empty(rows, np.bool_)
        _kld_rows(L2, got16, got16.view(np.float32), T, v, vb, kld, pd, same)
        np.testing.assert_array_equal(kld.astype(np.float32), want_kld)
        np.testing.assert_array_equal(pd, want_pd)
        sums = np.zeros(11)
        n_same = _kld_accumulate(sums, v, vb, kld, pd, same)
        np.testing.assert_array_equal(sums, want_sums[:11])
        assert n_same == want_sums[11]


def kld_rows(text: str) -> list[list[float]]:
    """The per-chunk table: [chunk, PPL, unc, ln ratio, unc, KLD, unc, RMS dp, unc, same top, unc]."""
    rows = []
    for line in text.splitlines():
        if re.match(r"\s*\d+\s+[\d.]+ ± ", line):
            rows.append([float(x) for x in re.findall(r"-?nan|-?[\d.]+", line)])
    return rows


def kld_block(text: str) -> dict[str, list[float]]:
    """The closing statistics block: label -> its numbers."""
    block = text[text.index("====== Perplexity statistics"):]
    out = {}
    for line in block.splitlines():
        if ":" in line:
            label, rest = line.split(":", 1)
            out[label.strip()] = [float(x) for x in re.findall(r"-?nan|-?\d+\.\d+", rest)]
            if label == "Same top p":
                break
    return out


def test_reads_llamas_base_file(capsys, tiny_llama_f32):
    """--kl-divergence on llama-perplexity's own base file (the tiny model in F32 against itself):
    the table llama-perplexity prints, PPL(Q) within 1e-4, ln(PPL(Q)/PPL(base)) and KLD within 1e-5."""
    out = run(capsys, ["-m", str(tiny_llama_f32), "--kl-divergence-base", str(BASE_C64), "--kl-divergence",
                       "-c", "64"])
    assert "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence" in out
    ours, ref = kld_rows(out), kld_rows((REF / "tiny-llama-f32.c64.kld.out").read_text())
    assert len(ours) == len(ref) == 2
    for a, b in zip(ours, ref):
        assert a[0] == b[0]
        np.testing.assert_allclose(a[1:3], b[1:3], rtol=1e-4)  # PPL(Q) and its uncertainty
        np.testing.assert_allclose(a[3], b[3], atol=1e-5)  # ln(PPL(Q)/PPL(base))
        np.testing.assert_allclose(a[5:7], b[5:7], atol=1e-5)  # KLD
        assert a[9] == b[9] == 100.0  # same top token everywhere


@pytest.fixture(scope="module")
def base_c128x4(tmp_path_factory, tiny_llama_f32):
    """kquant's base file of the tiny F32 model, 4 chunks of 128 (252 tokens: enough for the block)."""
    path = tmp_path_factory.mktemp("kld") / "tiny-f32.c128x4.logits"
    assert main(["-m", str(tiny_llama_f32), "-f", str(WIKI), "-c", "128", "--chunks", "4",
                 "--kl-divergence-base", str(path), "-t", "2", "--device", "cpu", "--no-progress"]) == 0
    return path


def check_block(out: str, ref: str, ppl_rtol: float, kld_rtol: float, kld_atol: float) -> None:
    ours, theirs = kld_block(out), kld_block(ref)
    assert list(ours) == list(theirs)  # the same statistics in the same order
    np.testing.assert_allclose(ours["Mean PPL(base)"], theirs["Mean PPL(base)"], rtol=1e-4)
    np.testing.assert_allclose(ours["Mean PPL(Q)"], theirs["Mean PPL(Q)"], rtol=ppl_rtol)
    for label in ("Mean    KLD", "Maximum KLD", "99.0%   KLD", "Median  KLD", "Minimum KLD"):
        np.testing.assert_allclose(ours[label][0], theirs[label][0], rtol=kld_rtol, atol=kld_atol, err_msg=label)
    np.testing.assert_allclose(ours["Same top p"][0], theirs["Same top p"][0], atol=100 / 252 + 1e-6)


def test_kld_statistics_f32(capsys, tiny_llama_f32, base_c128x4):
    """The F32 model against its own base file: llama-perplexity's statistics block, line for line,
    PPL(Q) and PPL(base) within 1e-4 (KLD ~1e-6 there: the uint16 rounding of the base)."""
    out = run(capsys, ["-m", str(tiny_llama_f32), "--kl-divergence-base", str(base_c128x4), "--kl-divergence",
                       "-c", "128"])
    ref = (REF / "tiny-llama-f32.c128x4.kld.out").read_text()
    check_block(out, ref, 1e-4, 0.0, 1e-5)
    assert kld_block(out)["Same top p"][0] == 100.0
    np.testing.assert_allclose([r[1] for r in kld_rows(out)], [r[1] for r in kld_rows(ref)], rtol=1e-4)


@pytest.fixture(scope="module")
def base_calib(tmp_path_factory, tiny_llama_f32):
    """kquant's base file of the tiny F32 model: 8 chunks of 512 of the calibration text."""
    path = tmp_path_factory.mktemp("kld") / "tiny-f32.calib.c512x8.logits"
    assert main(["-m", str(tiny_llama_f32), "-f", str(CALIB), "--chunks", "8",
                 "--kl-divergence-base", str(path), "-t", "2", "--device", "cpu", "--no-progress"]) == 0
    return path


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M", "Q2_K"])
def test_kld_statistics_quantized(capsys, tiny_quant, base_calib, ftype):
    """Quantized against the F32 base (2040 tokens): llama-perplexity's block with its values
    (measured: mean KLD within 0.3%, PPL(Q) within 2.4e-4, same-top within 0.25 points)."""
    out = run(capsys, ["-m", str(tiny_quant(ftype)), "--kl-divergence-base", str(base_calib), "--kl-divergence"])
    ours = kld_block(out)
    theirs = kld_block((REF / f"tiny-llama-{ftype}.calib.c512x8.kld.out").read_text())
    assert list(ours) == list(theirs)
    np.testing.assert_allclose(ours["Mean PPL(base)"], theirs["Mean PPL(base)"], rtol=1e-4)
    np.testing.assert_allclose(ours["Mean PPL(Q)"], theirs["Mean PPL(Q)"], rtol=1e-3)
    for label in ("Mean    KLD", "99.0%   KLD", "Median  KLD"):
        # Q8_0's KLDs are tiny (mean 1.6e-4) and its products are now llama.cpp's own, so the
        # tail quantile mostly measures the F32 base's float order: 99% within 6.1%
        rtol = 0.1 if ftype == "Q8_0" and label.startswith("99") else 0.02
        np.testing.assert_allclose(ours[label][0], theirs[label][0], rtol=rtol, err_msg=label)
    np.testing.assert_allclose(ours["Same top p"][0], theirs["Same top p"][0], atol=0.5)


def _llama_perplexity() -> Path | None:
    exe = os.environ.get("KQUANT_LLAMA_PERPLEXITY") or shutil.which("llama-perplexity")
    return Path(exe) if exe and Path(exe).is_file() else None


def test_llama_perplexity_reads_our_base_file(tmp_path, capsys, tiny_llama_f32):
    """llama-perplexity --kl-divergence on kquant's base file prints what kquant does on it
    (needs the binary: $KQUANT_LLAMA_PERPLEXITY or llama-perplexity on PATH)."""
    exe = _llama_perplexity()
    if exe is None:
        pytest.skip("llama-perplexity not found (set KQUANT_LLAMA_PERPLEXITY)")
    base = tmp_path / "ours.logits"
    run(capsys, ["-m", str(tiny_llama_f32), "-f", str(WIKI), "-c", "64", "--chunks", "2", "--kl-divergence-base",
                 str(base)])
    ours = run(capsys, ["-m", str(tiny_llama_f32), "--kl-divergence-base", str(base), "--kl-divergence", "-c", "64"])
    env = dict(os.environ, LD_LIBRARY_PATH=str(exe.parent) + os.pathsep + os.environ.get("LD_LIBRARY_PATH", ""))
    done = subprocess.run([str(exe), "-m", str(tiny_llama_f32), "--kl-divergence-base", str(base),
                           "--kl-divergence", "-c", "64", "-t", "2"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = kld_rows(done.stdout)
    if len(theirs) < 2:  # llama.cpp's asynchronous log sometimes loses its last lines at exit
        pytest.skip("llama-perplexity's output was cut short")
    for a, b in zip(kld_rows(ours), theirs):
        np.testing.assert_allclose(a[1], b[1], rtol=1e-4)
        np.testing.assert_allclose(a[3], b[3], atol=1e-5)
        assert b[9] == 100.0


# --- bad input ------------------------------------------------------------------------------

def run_error(capsys, args: list[str]) -> str:
    assert main([*args, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kquant-perplexity: error: ")
    return err[-1]


def test_text_too_short(tmp_path, capsys, tiny_llama_f32):
    """llama-perplexity's condition: fewer than 2 * n_ctx tokens (BOS included)."""
    from kquant.models import open_model
    from kquant.tokenizer import Tokenizer

    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.\n")
    msg = run_error(capsys, ["-m", str(tiny_llama_f32), "-f", str(text)])
    assert "you need at least 1024 tokens" in msg and "tokenizes to only" in msg
    tok = Tokenizer.from_source(open_model(tiny_llama_f32, "f32"))
    words = "the house was quiet and " * 20
    n = len(tok.tokenize(words))
    text.write_text(words + "\n")
    for c, ok in ((n // 2, True), (n // 2 + 1, False)):  # exactly 2 * n_ctx tokens is enough
        args = ["-m", str(tiny_llama_f32), "-f", str(text), "-c", str(c)]
        if ok:
            assert main([*args, "--no-progress"]) == 0
            capsys.readouterr()
        else:
            assert f"you need at least {2 * c} tokens" in run_error(capsys, args)


def test_unreadable_model_and_missing_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    run_error(capsys, ["-m", str(bad), "-f", str(WIKI)])
    run_error(capsys, ["-m", str(tmp_path / "missing.gguf"), "-f", str(WIKI)])
    assert "no text" in run_error(capsys, ["-m", str(bad)])
    assert "cannot read" in run_error(capsys, ["-m", str(bad), "-f", str(tmp_path / "missing.txt")])


def test_bad_base_files(tmp_path, capsys, tiny_llama_f32):
    m = ["-m", str(tiny_llama_f32), "--kl-divergence"]
    assert "must provide" in run_error(capsys, m)
    assert "failed to open" in run_error(capsys, [*m, "--kl-divergence-base", str(tmp_path / "none")])
    not_logits = tmp_path / "text.logits"
    not_logits.write_text("hello")
    assert "does not look like" in run_error(capsys, [*m, "--kl-divergence-base", str(not_logits)])

    def fake(name: str, n_ctx: int, n_vocab: int, n_chunk: int, cut: int = 0) -> str:
        n_score = n_ctx - 1 - n_ctx // 2
        data = (b"_logits_" + np.array([n_ctx, n_vocab, n_chunk], "<i4").tobytes()
                + np.ones(n_ctx * n_chunk, "<i4").tobytes() + bytes(2 * n_chunk * n_score * row_values(n_vocab)))
        (tmp_path / name).write_bytes(data[:len(data) - cut])
        return str(tmp_path / name)

    msg = run_error(capsys, [*m, "-c", "64", "--kl-divergence-base", fake("vocab", 64, 49152, 1)])
    assert "inconsistent vocabulary (49152 vs 4096)" in msg
    msg = run_error(capsys, [*m, "-c", "128", "-b", "128", "--kl-divergence-base", fake("ctx", 512, 4096, 1)])
    assert "computed with a context of 512" in msg
    msg = run_error(capsys, [*m, "-c", "64", "--kl-divergence-base", fake("cut", 64, 4096, 2, 100)])
    assert "truncated" in msg


def test_failed_run_leaves_no_base_file(tmp_path, capsys, tiny_llama_f32):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.\n")
    out = tmp_path / "base.logits"
    run_error(capsys, ["-m", str(tiny_llama_f32), "-f", str(text), "--kl-divergence-base", str(out)])
    assert list(tmp_path.iterdir()) == [text]


# --- generation -----------------------------------------------------------------------------

PROMPT = "It was a dark and stormy night, and"


def test_greedy_generation_matches_llama_cpp(capsys, tiny_llama_f32, llama_cpp):
    """Greedy continuation through the KV cache, token by token, = llama.cpp's (llama-cpp-python,
    argmax of its logits) for 20 tokens; kquant-generate streams the same text."""
    from kquant.validation.generate import Sampler, generate
    from kquant.cli.generate import main as generate_main
    from kquant.models import open_model
    from kquant.runtime import Transformer
    from kquant.tokenizer import Tokenizer

    llm = llama_cpp.Llama(str(tiny_llama_f32), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    llm.eval(prompt)
    theirs = []
    for _ in range(20):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    source = open_model(tiny_llama_f32, "f32")
    tok = Tokenizer.from_source(source)
    mine = tok.tokenize(PROMPT, add_special=True, parse_special=True)
    assert mine.tolist() == prompt
    ours = list(generate(Transformer(source, "cpu", progress=False), mine, 20, Sampler(temp=0)))
    assert ours == theirs
    assert generate_main(["-m", str(tiny_llama_f32), "-p", PROMPT, "-n", "20", "-t", "2", "--device", "cpu",
                          "--temp", "0"]) == 0
    cap = capsys.readouterr()
    assert cap.out == PROMPT + b"".join(tok.token_to_piece(t) for t in theirs).decode() + "\n"
    assert re.search(r"kquant-generate: prompt eval time = +[0-9.]+ ms / +11 tokens", cap.err), cap.err
    assert re.search(r"kquant-generate:        eval time = +[0-9.]+ ms / +19 runs", cap.err), cap.err


def test_sampling_and_stop_tokens(tiny_llama_f32):
    from kquant.validation.generate import Sampler, generate
    from kquant.models import open_model
    from kquant.runtime import Transformer
    from kquant.tokenizer import Tokenizer

    source = open_model(tiny_llama_f32, "f32")
    tok = Tokenizer.from_source(source)
    model = Transformer(source, "cpu", progress=False)
    prompt = tok.tokenize(PROMPT)
    runs = [list(generate(model, prompt, 12, Sampler(temp=0.8, seed=s))) for s in (1, 1, 2)]
    assert runs[0] == runs[1] and len(runs[0]) == 12  # the same seed, the same text
    greedy = list(generate(model, prompt, 12, Sampler(temp=0)))
    # a stop token ends generation before it is yielded
    assert list(generate(model, prompt, 12, Sampler(temp=0), stop=frozenset({greedy[3]}))) == \
        greedy[:greedy.index(greedy[3])]
    # top-k 1 is greedy whatever the temperature
    assert list(generate(model, prompt, 12, Sampler(temp=1.5, top_k=1, seed=3))) == greedy
    probs = np.exp(np.arange(10, dtype=np.float32))
    s = Sampler(temp=1.0, top_k=0, top_p=0.5, min_p=0.0, seed=0)
    assert {s(np.log(probs)) for _ in range(50)} == {9}  # top-p 0.5 keeps only the best (p = 0.63)
    assert not math.isnan(s(np.log(probs)))
