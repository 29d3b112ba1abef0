"""The forward pass against llama.cpp's (through llama-cpp-python) on the same F32 models.

llama.cpp runs with flash attention, as llama-imatrix and llama-perplexity do by default on the
CPU (its F16 KV cache is rounded the same way in kquant); the logits then agree to float32
summation order: about 1e-6 relative on SmolLM2, 1e-5 on the tiny model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from kquant.models import open_model

from kquant.runtime import Segment, Transformer, load_model, set_threads

sys.path.insert(0, str(Path(__file__).parent))
import make_hf_fixtures as fixtures  # noqa: E402


def llama_logits(llama_cpp, path: Path, tokens: np.ndarray) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=512, n_batch=512, n_threads=2,
                          flash_attn=True, verbose=False)
    llm.eval(tokens.tolist())
    return np.array(llm.scores[:len(tokens)], np.float32)


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tokens_for(n_vocab: int, n: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_vocab, n)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    set_threads(2)


def test_smollm2_logits_match_llama_cpp(smollm2_2l_f32, llama_cpp):
    model = load_model(smollm2_2l_f32, progress=False)
    toks = tokens_for(model.config.n_vocab)
    ours = model.forward([Segment(toks, model.new_cache(512))])
    assert rel_error(ours, llama_logits(llama_cpp, smollm2_2l_f32, toks)) < 1e-5


def test_tiny_llama_from_hf_folder_matches_llama_cpp(tiny_llama_f32, llama_cpp):
    from conftest import TINY_LLAMA

    model = load_model(TINY_LLAMA, progress=False)  # the HF folder, read at float32
    toks = tokens_for(model.config.n_vocab)
    ours = model.forward([Segment(toks, model.new_cache(512))])
    assert rel_error(ours, llama_logits(llama_cpp, tiny_llama_f32, toks)) < 1e-4


@pytest.fixture(scope="module")
def hf_built(tmp_path_factory):
    if not fixtures.DEFAULT_TEXT.is_file():
        pytest.skip(f"training text {fixtures.DEFAULT_TEXT} (shared/) not available")
    return fixtures.build(tmp_path_factory.mktemp("hf"))


@pytest.mark.parametrize("name", list(fixtures.FIXTURES))
def test_architectures_match_llama_cpp(hf_built, tmp_path, llama_cpp, name):
    """llama (SPM, llama3 rope factors, tied), mistral (GQA, 2 shards), qwen2 (Q/K/V biases,
    NEOX rope), qwen3 (q/k norms, head_dim 128), smollm: random weights, real layouts."""
    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model

    gguf_path = tmp_path / f"{name}-f32.gguf"
    write_gguf(load_hf_model(hf_built[name], "f32"), gguf_path, progress=False)
    model = load_model(hf_built[name], progress=False)
    toks = tokens_for(model.config.n_vocab, 200)
    ours = model.forward([Segment(toks, model.new_cache(512))])
    # gemma3's six blocks of GeGLU through ggml's float16 GELU table turn float32 rounding
    # differences into float16 steps, against logits of a few tenths (no soft-cap): 2.6e-4 and
    # 2.9e-4 measured, as large on the first 20 tokens as on the last (a wrong rope base or
    # window is 0.7 to 1.1): 5e-4 there; `exact` is bit for bit (test_gemma3_windows_and_rope_bases)
    tol = 5e-4 if name.startswith("tiny-gemma3") else 1e-4
    assert rel_error(ours, llama_logits(llama_cpp, gguf_path, toks)) < tol


def test_phi3_rope_factors_follow_the_context(hf_built, tmp_path, llama_cpp):
    """LongRoPE as llama.cpp chooses it: the tiny-phi3 fixture's original context is 256, so a
    512-token context takes rope_factors_long (and rope.scaling.attn_factor), a 256-token one
    rope_factors_short; with `exact`, llama.cpp's logits to the bit either way; the CuPy code
    path computes the same; one batch cannot mix the two contexts."""
    from kquant.errors import ModelError
    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model

    gguf_path = tmp_path / "tiny-phi3-f32.gguf"
    write_gguf(load_hf_model(hf_built["tiny-phi3"], "f32"), gguf_path, progress=False)
    model = Transformer(open_model(gguf_path, "f32"), "cpu", progress=False)
    generic = Transformer(open_model(gguf_path, "f32"), "cpu", progress=False, xp=_NumpyStandIn())
    toks = tokens_for(model.config.n_vocab, 100)
    for n_ctx in (256, 512):
        llm = llama_cpp.Llama(str(gguf_path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2,
                              flash_attn=True, verbose=False)
        llm.eval(toks.tolist())
        ref = np.array(llm.scores[:len(toks)], np.float32)
        model.exact = False
        ours = model.forward([Segment(toks, model.new_cache(n_ctx))])
        assert rel_error(ours, ref) < 1e-4
        assert rel_error(generic.forward([Segment(toks, generic.new_cache(n_ctx))]), ours) < 1e-5
        model.exact = True
        exact = model.forward([Segment(toks, model.new_cache(n_ctx))])
        assert np.array_equal(exact.view(np.uint32), ref.view(np.uint32)), n_ctx
    with pytest.raises(ModelError, match="different rope factors"):
        model.forward([Segment(toks[:10], model.new_cache(256)), Segment(toks[:10], model.new_cache(512))])


def test_gemma2_window_caps_and_array_module_path(hf_built, tmp_path, llama_cpp):
    """tiny-gemma2 (sliding window 32 on layer 0, soft-capped scores and logits): the CuPy code
    path computes what the Numba one does; the window matters (without it the logits differ
    from llama.cpp's); `exact` gives llama.cpp's logits bit for bit (llama-cpp-python runs the
    whole batch through flash attention, the tiled kernel, window and caps included)."""
    import dataclasses

    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model

    gguf_path = tmp_path / "tiny-gemma2-f32.gguf"
    write_gguf(load_hf_model(hf_built["tiny-gemma2"], "f32"), gguf_path, progress=False)
    model = Transformer(open_model(gguf_path, "f32"), "cpu", progress=False)
    assert model.config.n_swa == 32 and model.config.swa_layers == (True, False)
    generic = Transformer(open_model(gguf_path, "f32"), "cpu", progress=False, xp=_NumpyStandIn())
    toks = tokens_for(model.config.n_vocab, 100, 1)
    ours = model.forward([Segment(toks, model.new_cache(128))])
    # GELU's float16 table turns float32 rounding differences into float16 steps: 1e-4, not 1e-5
    assert rel_error(generic.forward([Segment(toks, generic.new_cache(128))]), ours) < 1e-4
    ref = llama_logits(llama_cpp, gguf_path, toks)
    assert rel_error(ours, ref) < 1e-4
    model.config = dataclasses.replace(model.config, swa_layers=(False, False))
    assert rel_error(model.forward([Segment(toks, model.new_cache(128))]), ref) > 1e-3
    model = Transformer(open_model(gguf_path, "f32"), "cpu", progress=False)
    model.exact = True
    exact = model.forward([Segment(toks, model.new_cache(512))])
    assert np.array_equal(exact.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gemma3-vl"])
def test_gemma3_windows_and_rope_bases(hf_built, tmp_path, llama_cpp, name):
    """tiny-gemma3 (layers 0-4 slide over 32 keys and rope with base 10000, layer 5 attends to
    all with base 1e6; -vl: that layer's rope scaled linearly by 8, logits soft-capped): each
    of the window, the SWA layers' base and the global layer's scaling matters (dropping one
    moves the logits away from llama.cpp's); the CuPy code path computes what the Numba one
    does; `exact` gives llama.cpp's logits bit for bit (so the 2.6e-4 of the default path is
    float32 rounding through the GELU table, not a difference of the model)."""
    import dataclasses

    from kquant.files.gguf_write import write_gguf
    from kquant.files.hf import load_hf_model

    gguf_path = tmp_path / f"{name}-f32.gguf"
    write_gguf(load_hf_model(hf_built[name], "f32"), gguf_path, progress=False)
    model = Transformer(open_model(gguf_path, "f32"), "cpu", progress=False)
    c = model.config
    assert c.n_swa == 32 and c.swa_layers == (True,) * 5 + (False,) and c.rope_swa == (10000.0, 1.0)
    assert (c.rope_base, c.rope_freq_scale, c.final_softcap) == \
        ((1e6, 0.125, 5.0) if name.endswith("-vl") else (1e6, 1.0, 0.0))
    toks = tokens_for(c.n_vocab, 100, 1)
    ours = model.forward([Segment(toks, model.new_cache(128))])
    ref = llama_logits(llama_cpp, gguf_path, toks)
    assert rel_error(ours, ref) < 5e-4
    generic = Transformer(open_model(gguf_path, "f32"), "cpu", progress=False, xp=_NumpyStandIn())
    assert rel_error(generic.forward([Segment(toks, generic.new_cache(128))]), ours) < 5e-4
    changes = [dict(swa_layers=(False,) * 6), dict(rope_swa=None)]
    if name.endswith("-vl"):
        changes.append(dict(rope_freq_scale=1.0))
    for change in changes:
        model.config = dataclasses.replace(c, **change)
        assert rel_error(model.forward([Segment(toks, model.new_cache(128))]), ref) > 1e-2, change
    model.config, model.exact = c, True
    exact = model.forward([Segment(toks, model.new_cache(512))])
    assert np.array_equal(exact.view(np.uint32), ref.view(np.uint32))


def test_quantized_model_runs_on_dequantized_weights(tiny_llama_f32, tmp_path, llama_cpp):
    """A Q8_0 file: kquant dequantizes bit-exactly, so it matches llama.cpp like F32 does."""
    from kquant import QuantizeOptions, quantize_model
    from kquant.quantization.mixes import parse_ftype

    q8 = tmp_path / "tiny-q8_0.gguf"
    quantize_model(tiny_llama_f32, q8, parse_ftype("Q8_0"), QuantizeOptions(), progress=False)
    model = load_model(q8, progress=False)
    toks = tokens_for(model.config.n_vocab, 200)
    ours = model.forward([Segment(toks, model.new_cache(512))])
    ref = llama_logits(llama_cpp, q8, toks)
    # activations rounded to Q8_0 as llama.cpp does; its tiled/sgemm kernels still round a
    # little differently on some rows (measured 3e-3)
    assert rel_error(ours, ref) < 1e-2


def test_kv_cache_and_batching_give_the_same_logits(tiny_llama_f32):
    model = load_model(tiny_llama_f32, progress=False)
    a, b = tokens_for(model.config.n_vocab, 160, 1), tokens_for(model.config.n_vocab, 96, 2)
    whole_a = model.forward([Segment(a, model.new_cache(256))])
    whole_b = model.forward([Segment(b, model.new_cache(256))])
    # a in three pieces through its cache, b alongside in one batch, then token by token
    ca, cb = model.new_cache(256), model.new_cache(256)
    first = model.forward([Segment(a[:100], ca), Segment(b[:40], cb)])
    second = model.forward([Segment(a[100:150], ca), Segment(b[40:], cb)])
    steps = [model.forward([Segment(a[i:i + 1], ca)]) for i in range(150, 160)]
    got_a = np.concatenate([first[:100], second[:50], *steps])
    got_b = np.concatenate([first[100:], second[50:]])
    assert rel_error(got_a, whole_a) < 1e-5
    assert rel_error(got_b, whole_b) < 1e-5
    only_last = model.forward([Segment(b, model.new_cache(256))], logit_rows=[95])
    np.testing.assert_allclose(only_last[0], whole_b[95], rtol=1e-4, atol=1e-4)


class _NumpyStandIn:
    """numpy under another name: makes the runtime take its CuPy code path on the CPU."""

    def __getattr__(self, name):
        return getattr(np, name)


def test_array_module_path_matches_numba_path(tiny_llama_f32):
    """The CuPy path (plain array expressions) computes what the numpy+Numba path does."""
    source = open_model(tiny_llama_f32, "f32")
    cpu = Transformer(source, "cpu", progress=False)
    generic = Transformer(source, "cpu", progress=False, xp=_NumpyStandIn())
    toks = tokens_for(cpu.config.n_vocab, 200, 3)
    a = cpu.forward([Segment(toks, cpu.new_cache(256))])
    b = generic.forward([Segment(toks, generic.new_cache(256))])
    assert rel_error(b, a) < 1e-5


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from kquant.runtime.config import read_config
    from kquant.errors import ModelError
    from kquant.files.source import KV, ModelSource

    with pytest.raises(ModelError, match="not supported"):
        read_config(ModelSource("mamba", [KV("general.architecture", "mamba", None)], []))


@pytest.mark.parametrize("wtype", ["Q4_K", "Q8_0", "Q4_1", "F16", "BF16"])
def test_activation_rounding_is_the_vec_dot_type_roundtrip(wtype):
    """Activations rounded for a weight type = kquant's (ggml-exact) codec of its vec_dot type,
    quantized and dequantized; the array-module path computes the same values."""
    import kquant
    from gguf import GGMLQuantizationType as T

    from kquant.matmul.activations import round_activations, vec_dot_type

    t = T[wtype]
    x = np.random.default_rng(5).standard_normal((8, 512)).astype(np.float32) * 3
    x[1, :256] = 0  # an all-zero block
    got = round_activations(x, t)
    vt = vec_dot_type(t)
    codec = T.Q8_0 if vt == T.Q8_1 else vt
    want = kquant.dequantize(kquant.quantize(x, codec), codec).reshape(x.shape)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(round_activations(x, t, _NumpyStandIn()), want)


# --- single operations against ggml's CPU backend (libggml-cpu through ctypes) --------------

@pytest.fixture(scope="module")
def ggml_cpu():
    from kquant.reference.libggml import GGMLCompute

    try:
        return GGMLCompute()
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"ggml's CPU backend not available: {e}")


@pytest.mark.parametrize("wtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0",
                                   "Q5_1", "Q8_0", "F16", "BF16", "IQ3_XXS", "IQ3_S"])
def test_products_match_ggml_mul_mat(ggml_cpu, wtype):
    """Rounded activations times dequantized weights (+ the Q8_1 block-sum term) is ggml's
    quantized product up to float32 summation order, for 1 token (vec_dot), 8 (the tiled K-quant
    kernels) and 64 (llamafile's sgemm)."""
    import kquant
    from gguf import GGMLQuantizationType as T

    from kquant.matmul.activations import block_mins, min_term_correction, round_activations

    t = T[wtype]
    rng = np.random.default_rng(7)
    rows, k = 128, 576 if t not in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ3_XXS, T.IQ3_S) else 512
    w = rng.standard_normal((rows, k)).astype(np.float32)
    wq = kquant.quantize(w, t)
    wd = kquant.dequantize(wq, t).reshape(rows, k)
    for n in (1, 8, 64):
        x = rng.standard_normal((n, k)).astype(np.float32)
        ours = round_activations(x, t) @ wd.T
        if t in (T.Q4_1, T.Q5_1):
            ours += min_term_correction(x, t) @ block_mins(wq, t, rows).T
        ref = ggml_cpu.mul_mat(wq, t, k, x)
        assert rel_error(ours, ref) < 2e-6, (n, rel_error(ours, ref))


def test_flash_attention_is_ggmls_bit_for_bit(ggml_cpu):
    from kquant.runtime.kernels import flash_attention

    rng = np.random.default_rng(8)
    T, hq, hkv, d = 200, 6, 2, 64
    q = rng.standard_normal((T, hq, d)).astype(np.float32)
    k = rng.standard_normal((T, hkv, d)).astype(np.float16)
    v = rng.standard_normal((T, hkv, d)).astype(np.float16)
    scale = np.float32(1) / np.sqrt(np.float32(d))
    ours = np.empty_like(q)
    flash_attention(q, np.ascontiguousarray(k.astype(np.float32).transpose(1, 2, 0)),
                    np.ascontiguousarray(v.astype(np.float32).transpose(1, 0, 2)), 0, scale, hq // hkv, ours)
    np.testing.assert_array_equal(ours, ggml_cpu.flash_attn(q, k, v, float(scale)))


@pytest.mark.parametrize("neox, base", [(False, 10000.0), (True, 1000000.0)])
def test_rope_is_ggmls_bit_for_bit(ggml_cpu, neox, base):
    from kquant.runtime.forward import Transformer
    from kquant.runtime.kernels import rope_inplace

    T, h, d = 300, 3, 64
    x = np.random.default_rng(9).standard_normal((T, h, d)).astype(np.float32)

    class Model:  # just what the table builder reads
        xp = np
        _rope_cache: dict = {}

        class config:
            n_rot, rope_base, rope_freq_scale, rope_neox, rope_attn_factor = d, base, 1.0, neox, 1.0

        class weights:
            rope_freqs = None

    cos, sin = Transformer._rope_tables(Model(), T, None)
    ours = x.copy()
    rope_inplace(ours, np.arange(T), cos, sin, d, neox)
    np.testing.assert_array_equal(ours, ggml_cpu.rope(x, d, neox, base))


def test_generation_steps_read_the_quantized_blocks(tiny_llama_f32, tmp_path):
    """A few tokens go through kquant.matmul's block kernels (ggml's vec_dot arithmetic) instead
    of the dequantized float32 copy: the same logits as the batched BLAS path, to the float
    order of the products (both round activations as ggml does)."""
    from kquant import QuantizeOptions, quantize_model
    from kquant.quantization.mixes import parse_ftype

    q = tmp_path / "tiny-q4_k_m.gguf"
    quantize_model(tiny_llama_f32, q, parse_ftype("Q4_K_M"), QuantizeOptions(), progress=False)
    model = load_model(q, progress=False)
    assert "blk.0.attn_q.weight" in model.weights.blocks
    toks = tokens_for(model.config.n_vocab, 1, 4)
    step = model.forward([Segment(toks, model.new_cache(64))])  # 1 token: block kernels
    import kquant.runtime.forward as F

    saved, F._BLOCK_KERNEL_TOKENS = F._BLOCK_KERNEL_TOKENS, 0
    try:
        batched = model.forward([Segment(toks, model.new_cache(64))])  # dequantized + BLAS
    finally:
        F._BLOCK_KERNEL_TOKENS = saved
    assert rel_error(step, batched) < 1e-4


@pytest.mark.parametrize("name", ["tiny-qwen2moe", "tiny-mixtral"])
def test_moe_array_module_path_and_decode_match(hf_fixture_gguf, name):
    """The CuPy path (plain array expressions: the router's softmax, the routed products) computes
    what the numpy+Numba path does on a MoE model; token-by-token decoding what the batch does."""
    source = open_model(hf_fixture_gguf(name), "f32")
    cpu = Transformer(source, "cpu", progress=False)
    generic = Transformer(source, "cpu", progress=False, xp=_NumpyStandIn())
    toks = tokens_for(cpu.config.n_vocab, 100, 3)
    a = cpu.forward([Segment(toks, cpu.new_cache(256))])
    assert rel_error(generic.forward([Segment(toks, generic.new_cache(256))]), a) < 1e-5
    cache = cpu.new_cache(256)
    steps = np.concatenate([cpu.forward([Segment(toks[i:i + 1], cache)]) for i in range(16)])
    assert rel_error(steps, a[:16]) < 1e-5


@pytest.mark.parametrize("shape", [(1, 576), (5, 576), (3, 9, 64), (2, 8, 128), (1, 12288), (2, 16400), (4, 7)])
def test_rms_norm_kernel_is_numpys_expression_to_the_bit(shape):
    """The default path's RMSNorm kernel equals the numpy lines it replaced, bit for bit (the
    squares' float64 sum in numpy's pairwise order, over its 8192-element buffers)."""
    from kquant.runtime.kernels import rms_norm_rows

    rng = np.random.default_rng(sum(shape))
    F32 = np.float32
    for scale in (1e-3, 1.0, 300.0):
        x = (rng.standard_normal(shape) * scale).astype(F32)
        w = rng.standard_normal(shape[-1]).astype(F32)
        eps = F32(1e-5)
        sums = (x * x).sum(axis=-1, dtype=np.float64)
        ref = x * (F32(1.0) / np.sqrt((sums / shape[-1]).astype(F32) + eps))[..., None]
        ref *= w
        ours = rms_norm_rows(x.reshape(-1, shape[-1]), w, eps).reshape(shape)
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), (shape, scale)
