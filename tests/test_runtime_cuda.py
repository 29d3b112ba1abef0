"""The runtime on the GPU: quantized matrices kept as their blocks on the device and multiplied
by kquant.matmul.cuda's kernels (kquant.runtime.gpu_matrices), against the CPU default path.

Without a GPU the kernels run on Numba's CUDA simulator, chosen before numba.cuda is first
imported: the `test_sim_*` tests run only with NUMBA_ENABLE_CUDASIM=1, and
`test_simulator_suite` starts such a process from an ordinary run. They build the GPU path
with a numpy-like array module (the CuPy code path, on the CPU) and a GpuBlocks loader, on a
model small enough for the simulator (a Python thread per CUDA thread, ~1.5 s per 32 rows of
a one-token product): 2 blocks, n_embd 32, every legacy 32-value type and K-quants on the
256-wide rows of ffn_down, written to a GGUF by the tests.

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_runtime_cuda.py -k test_sim_

The `gpu`-marked tests need CuPy and an NVIDIA GPU (tools/gpu_check.sh runs them) and compare
`--device cuda` with `--device cpu` on the project's tiny model.

Bounds. Every product the GPU path takes is checked on its own input: the activations are
ggml's rounding for the weight's type (bit for bit what the CPU path rounds them to), and the
kernel's result is within the float32 summation bound (K + 1) u sum |w x| of the float64
product with the exact dequantized weights (u = 2^-24), as tests/test_matmul_cuda.py checks
the kernels. The logits are then compared with the CPU default path's. Float summation order
alone moves them by ~1e-7, but an activation that lands near a rounding tie of the next
product's 8-bit quantization can go one level (1/127 of its block's largest value) either way,
(as can a key or value's float16 rounding in the KV cache), and every later token's attention
reads it. The CPU's own paths show it, no GPU code involved: numpy + Numba against the CuPy-style
array expressions differ by 1e-2 on a 12-token prompt of a 64-wide variant of the simulator's
model, and by 5.6e-3 on 128 tokens of data/tiny-llama at Q4_K_M (identical for the first 5
tokens, ~3e-3 per token after the first flip; the CPU default path against its own BLAS
fallback: 5.5e-3). On the simulator's model no flip happens (measured: 1e-7 for the prompt and
the step, GPU path and CPU path alike), but another machine's BLAS sums in another order; so the
logits must agree to 2e-2 relative (the steps too: they read the cache the prompt filled). The
per-product checks are the strict ones.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

import kquant

ROOT = Path(__file__).resolve().parent.parent
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
U = 2.0 ** -24
# the logits' relative distance from the CPU default path (see above)
REL = 2e-2

sim = pytest.mark.skipif(not SIM, reason="needs NUMBA_ENABLE_CUDASIM=1 (test_simulator_suite "
                                         "runs these in a subprocess)")

if SIM:
    # The simulator's block manager polls its threads while they run, and with Python's default
    # 5 ms GIL switch interval every barrier (each warp shuffle is one) waits for it: 0.1 ms
    # makes the warp kernel ~2.5x faster here.
    sys.setswitchinterval(1e-4)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class _NumpyStandIn:
    """numpy under another name: the runtime takes its CuPy code path on the CPU."""

    def __getattr__(self, name):
        return getattr(np, name)


# --- a model small enough for the simulator ---------------------------------------------------

N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_VOCAB = 32, 1, 1, 256, 32
HEAD_DIM = N_EMBD // N_HEAD
# each block's matrices: every legacy type (Q4_1/Q5_1 with ggml's min term), K-quants on the
# 256-wide rows of ffn_down, F16/F32 matrices (which stay float arrays; ffn_gate/up too, as
# their 256 rows would cost the simulator ~12 s a token); the output is tied to a Q8_0 token
# embedding, so it is the embedding's blocks on the device
BLOCK_TYPES = [
    {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q5_0, "attn_output": Q.Q4_1,
     "ffn_gate": Q.F16, "ffn_up": Q.F32, "ffn_down": Q.Q4_K},
    {"attn_q": Q.Q5_1, "attn_k": Q.F16, "attn_v": Q.Q8_0, "attn_output": Q.Q5_0,
     "ffn_gate": Q.F32, "ffn_up": Q.F16, "ffn_down": Q.Q6_K},
]
EMBD_TYPE = Q.Q8_0
# products through the block kernels per forward pass: the quantized matrices and the output
N_GPU_PRODUCTS = sum(t not in (Q.F16, Q.F32) for b in BLOCK_TYPES for t in b.values()) + 1


def _shapes() -> dict[str, tuple[int, int]]:
    kv = N_HEAD_KV * HEAD_DIM
    return {"attn_q": (N_EMBD, N_EMBD), "attn_k": (kv, N_EMBD), "attn_v": (kv, N_EMBD),
            "attn_output": (N_EMBD, N_EMBD), "ffn_gate": (N_FF, N_EMBD), "ffn_up": (N_FF, N_EMBD),
            "ffn_down": (N_EMBD, N_FF)}


def _tensor(name: str, values: np.ndarray, qtype: Q):
    """A SourceTensor of float values stored as `qtype` (quantized by kquant)."""
    from kquant.files.source import SourceTensor

    if qtype == Q.F32:
        data = values.astype(np.float32)
    elif qtype == Q.F16:
        data = values.astype(np.float16)
    else:
        data = kquant.quantize(values.astype(np.float32), qtype.name)
    shape = tuple(reversed(values.shape))  # ggml order: the row length first
    return SourceTensor(name, shape, qtype, lambda: data)


def write_tiny_model(path: Path, seed: int = 0) -> Path:
    """A 2-block llama GGUF of random weights (scaled so activations stay of order 1)."""
    from kquant.files.gguf_write import write_gguf
    from kquant.files.source import KV, ModelSource

    rng = np.random.default_rng(seed)
    kv = [KV("general.architecture", "llama", V.STRING),
          KV("general.name", "kquant-gpu-test", V.STRING),
          KV("llama.block_count", len(BLOCK_TYPES), V.UINT32),
          KV("llama.context_length", 256, V.UINT32),
          KV("llama.embedding_length", N_EMBD, V.UINT32),
          KV("llama.feed_forward_length", N_FF, V.UINT32),
          KV("llama.attention.head_count", N_HEAD, V.UINT32),
          KV("llama.attention.head_count_kv", N_HEAD_KV, V.UINT32),
          KV("llama.attention.layer_norm_rms_epsilon", 1e-5, V.FLOAT32),
          KV("llama.rope.freq_base", 10000.0, V.FLOAT32),
          KV("llama.vocab_size", N_VOCAB, V.UINT32)]
    norm = lambda: 1.0 + 0.1 * rng.standard_normal(N_EMBD)  # noqa: E731
    tensors = [_tensor("token_embd.weight", rng.standard_normal((N_VOCAB, N_EMBD)), EMBD_TYPE),
               _tensor("output_norm.weight", norm(), Q.F32)]
    for i, types in enumerate(BLOCK_TYPES):
        tensors.append(_tensor(f"blk.{i}.attn_norm.weight", norm(), Q.F32))
        tensors.append(_tensor(f"blk.{i}.ffn_norm.weight", norm(), Q.F32))
        for m, shape in _shapes().items():
            w = rng.standard_t(5, shape) / np.sqrt(shape[1]) * rng.uniform(0.5, 1.5, (shape[0], 1))
            tensors.append(_tensor(f"blk.{i}.{m}.weight", w, types[m]))
    return write_gguf(ModelSource("llama", kv, tensors), path, progress=False)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("gpu") / "tiny-mixed.gguf")


@pytest.fixture(scope="module")
def models(tiny_gguf):
    """(the CPU default path, the GPU path on the simulator) of the tiny model."""
    from kquant.models import open_model
    from kquant.runtime import Transformer, set_threads
    from kquant.runtime.gpu_matrices import GpuBlocks

    set_threads(2)
    source = open_model(tiny_gguf, "f32")
    cpu = Transformer(source, "cpu", progress=False)
    gpu = Transformer(source, "cpu", progress=False, xp=_NumpyStandIn(), gpu=GpuBlocks())
    return cpu, gpu


class ProductLog:
    """Every block-kernel product of a model: the unrounded input of its _linear call, the
    rounded activations the kernel got, its result, and the kernel method."""

    def __init__(self, model, monkeypatch):
        import kquant.matmul.cuda as kc
        from kquant.runtime.device import to_host
        from kquant.runtime.gpu_matrices import GpuMatrix

        self.inputs, self.products, self.methods = [], [], []
        rounded_product, product, run = model._rounded_product, GpuMatrix.product, kc._run

        def log_input(x, w, b, name, qtype):
            if isinstance(w, GpuMatrix):
                self.inputs.append(to_host(x).copy())
            return rounded_product(x, w, b, name, qtype)

        def log_product(m, x, xp):
            y = product(m, x, xp)
            self.products.append((m, to_host(x).copy(), to_host(y).copy()))
            return y

        def log_method(dw, X, Y, method, wpr):
            self.methods.append(method)
            return run(dw, X, Y, method, wpr)

        monkeypatch.setattr(model, "_rounded_product", log_input)
        monkeypatch.setattr(GpuMatrix, "product", log_product)
        monkeypatch.setattr(kc, "_run", log_method)

    def clear(self) -> None:
        self.inputs.clear(), self.products.clear(), self.methods.clear()

    def check(self) -> float:
        """Each product's activations are ggml's rounding of its input, its result within the
        float32 bound; returns the largest error relative to sum |w x|."""
        from kquant.matmul.activations import round_activations

        assert len(self.inputs) == len(self.products)
        worst = 0.0
        for x_src, (m, x, y) in zip(self.inputs, self.products):
            np.testing.assert_array_equal(x, round_activations(x_src, m.qtype, np))
            Wd = m.dequantized().astype(np.float64)
            x64 = x.astype(np.float64)
            mag = np.abs(x64) @ np.abs(Wd).T
            err = np.abs(y.astype(np.float64) - x64 @ Wd.T)
            assert np.all(err <= (Wd.shape[1] + 1) * U * mag * 1.0001 + 1e-30), m.qtype.name
            worst = max(worst, float(np.max(err / np.maximum(mag, 1e-30))))
        return worst


# --- under the simulator ----------------------------------------------------------------------

@sim
def test_sim_quantized_matrices_stay_blocks(models):
    from kquant.runtime.gpu_matrices import GpuMatrix

    _, gpu = models
    W = gpu.weights
    L0, L1 = W.layers
    assert isinstance(L0.wq, GpuMatrix) and L0.wq.shape == (N_EMBD, N_EMBD)
    assert isinstance(L0.w_down, GpuMatrix) and L0.w_down.qtype == Q.Q4_K
    assert isinstance(L1.wk, np.ndarray) and L1.wk.dtype == np.float32  # F16: a float array
    assert isinstance(W.output, GpuMatrix) and W.output.shape == (N_VOCAB, N_EMBD)  # tied
    assert isinstance(W.token_embd, np.ndarray)


@sim
def test_sim_prompt_then_step_match_the_cpu(models, monkeypatch):
    """A 12-token prompt (the tiled kernel) then a generation step of 1 token (the warp
    kernel): every product checked on its own input, the logits against the CPU's."""
    from kquant.runtime import Segment

    cpu, gpu = models
    log = ProductLog(gpu, monkeypatch)
    toks = np.random.default_rng(1).integers(0, N_VOCAB, 13)
    caches = cpu.new_cache(32), gpu.new_cache(32)
    for piece in (toks[:12], toks[12:]):
        log.clear()
        a = cpu.forward([Segment(piece, caches[0])])
        b = gpu.forward([Segment(piece, caches[1])])
        assert isinstance(b, np.ndarray) and b.shape == (len(piece), N_VOCAB)
        assert log.methods == ["tiled" if len(piece) > 8 else "warp"] * N_GPU_PRODUCTS
        worst = log.check()
        err = rel_error(b, a)
        print(f"{len(piece)} tokens: products within {worst:.2e} of sum |w x|, "
              f"logits {err:.2e} from the CPU's")
        assert err < REL


@sim
def test_sim_imatrix_collects_the_same(models):
    """The imatrix collector on the GPU path (its accumulators in the array module) sees the
    activations the CPU path does."""
    from kquant.calibration.imatrix import Collector, ImatrixParams, compute_imatrix
    from kquant.calibration.imatrix_file import Imatrix

    tokens = np.random.default_rng(2).integers(0, N_VOCAB, 40)
    params = ImatrixParams(n_ctx=16, n_batch=16, n_chunks=1, output_frequency=0)  # the tiled kernel
    results = []
    for model in models:
        collector = Collector(params, Imatrix(), model.xp)
        results.append(compute_imatrix(model, tokens, params, collector, None, progress=False,
                                       log=lambda s: None))
    a, b = results
    assert sorted(a.imatrix.entries) == sorted(b.imatrix.entries) and len(a.imatrix.entries) == 14
    worst = 0.0
    for name, e in a.imatrix.entries.items():
        np.testing.assert_array_equal(b.imatrix.entries[name].counts, e.counts)
        worst = max(worst, rel_error(b.imatrix.entries[name].sums, e.sums))
    print(f"imatrix sums {worst:.2e} from the CPU's, chunk perplexities {a.chunk_ppl} {b.chunk_ppl}")
    assert worst < REL
    assert b.chunk_ppl == pytest.approx(a.chunk_ppl, rel=REL)


@sim
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K])
def test_sim_gpu_matrix_dequantizes_for_gptq(qtype):
    """GPTQ's sweep takes a quantized source matrix back to the host as float32, exactly."""
    from kquant.quantization.sequential import _host_matrix
    from kquant.runtime.gpu_matrices import GpuBlocks

    w = np.random.default_rng(3).standard_normal((3, 256)).astype(np.float32)
    raw = kquant.quantize(w, qtype.name)
    m = GpuBlocks().load(raw, qtype, np)
    np.testing.assert_array_equal(_host_matrix(m), kquant.dequantize(raw, qtype.name))


@pytest.mark.skipif(SIM, reason="this is the launcher of the simulator run")
def test_simulator_suite():
    """The test_sim_* tests, in a process with NUMBA_ENABLE_CUDASIM=1."""
    r = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-s", "-k",
                        "test_sim_", "-p", "no:cacheprovider"], cwd=ROOT,
                       env=_env(NUMBA_ENABLE_CUDASIM="1"), capture_output=True, text=True,
                       timeout=600)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], tail


# --- on a real GPU (tools/gpu_check.sh) -------------------------------------------------------

def _cupy_gpu() -> bool:
    if SIM:
        return False
    from kquant.runtime.device import cuda_available

    return cuda_available()


@pytest.fixture(scope="module")
def tiny_llama_q4_k_m(tmp_path_factory, tiny_llama_f32) -> Path:
    from kquant import QuantizeOptions, quantize_model
    from kquant.quantization.mixes import parse_ftype

    out = tmp_path_factory.mktemp("gpu") / "tiny-q4_k_m.gguf"
    quantize_model(tiny_llama_f32, out, parse_ftype("Q4_K_M"), QuantizeOptions(), progress=False)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_gpu(), reason="needs CuPy and an NVIDIA GPU")
@pytest.mark.parametrize("which", ["mixed", "q4_k_m"])
def test_gpu_device_cuda_matches_cpu(which, request, monkeypatch):
    """`--device cuda` (CuPy, the blocks on the GPU): a 100-token prompt (tiled kernel) and
    token steps (warp kernel), every product checked on its own input as under the simulator,
    the logits against the CPU's."""
    import cupy

    from kquant.models import open_model
    from kquant.runtime import Segment, Transformer
    from kquant.runtime.device import to_host
    from kquant.runtime.gpu_matrices import GpuMatrix

    path = request.getfixturevalue("tiny_gguf" if which == "mixed" else "tiny_llama_q4_k_m")
    source = open_model(path, "f32")
    cpu = Transformer(source, "cpu", progress=False)
    dev = Transformer(source, "cuda", progress=False)
    assert isinstance(dev.weights.layers[0].wq, GpuMatrix)
    log = ProductLog(dev, monkeypatch)
    toks = np.random.default_rng(4).integers(0, cpu.config.n_vocab, 104)
    ca, cb = cpu.new_cache(128), dev.new_cache(128)
    for piece in (toks[:100], toks[100:101], toks[101:104]):
        log.clear()
        a = cpu.forward([Segment(piece, ca)])
        b = dev.forward([Segment(piece, cb)])
        assert isinstance(b, cupy.ndarray)
        assert set(log.methods) == {"tiled" if len(piece) > 8 else "warp"}
        worst = log.check()
        err = rel_error(to_host(b), a)
        print(f"{which}, {len(piece)} tokens: products within {worst:.2e} of sum |w x|, "
              f"logits {err:.2e} from the CPU's")
        assert err < REL


@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_gpu(), reason="needs CuPy and an NVIDIA GPU")
def test_gpu_imatrix_and_perplexity_match_cpu(tiny_llama_q4_k_m, tmp_path):
    """kquant-perplexity and kquant-imatrix on --device cuda agree with --device cpu, to the
    rounding flips the module docstring describes: on this model the CPU's own array-expression
    path (no GPU code) is 2.9e-3 from the CPU default path's perplexity, so 1e-2 for the
    perplexity and for each imatrix entry's sums (relative norm)."""
    from kquant.calibration.imatrix import ImatrixParams, run_imatrix
    from kquant.validation.common import PerplexityParams
    from kquant.validation.perplexity import run_perplexity

    text = ROOT / "data" / "calibration.txt"
    quiet = lambda s: None  # noqa: E731
    ppl = [run_perplexity(tiny_llama_q4_k_m, text, PerplexityParams(n_ctx=128, n_chunks=4), device=d,
                          progress=False, log=quiet, emit=quiet).ppl for d in ("cpu", "cuda")]
    print("perplexity cpu, cuda:", ppl)
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-2)
    ims = [run_imatrix(tiny_llama_q4_k_m, text, ImatrixParams(n_ctx=128, n_chunks=4, output_frequency=0,
                                                              out_file=str(tmp_path / f"{d}.gguf")),
                       device=d, progress=False, log=quiet).imatrix for d in ("cpu", "cuda")]
    assert sorted(ims[1].entries) == sorted(ims[0].entries)
    for name, e in ims[0].entries.items():
        np.testing.assert_array_equal(ims[1].entries[name].counts, e.counts)
        assert rel_error(ims[1].entries[name].sums, e.sums) < 1e-2, name
