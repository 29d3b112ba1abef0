"""The Numba-CUDA kernels that multiply straight from ggml blocks (kquant.matmul.cuda).

Without a GPU the kernels run on Numba's CUDA simulator, which must be chosen before
numba.cuda is first imported: the `test_sim_*` tests run only in a process started with
NUMBA_ENABLE_CUDASIM=1, and `test_simulator_suite` starts one (`python -m pytest` on this
file) from an ordinary run. To run them directly:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_matmul_cuda.py -k test_sim_

Every product is compared with float64 `dequantize(w) @ x`. The kernels multiply ggml's exact
float32 weights (the decoders reproduce `kquant.dequantize` bit for bit, checked below) with
float32 activations and sum in float32, so each output is within the worst-case bound of
any float32 summation order, (K + 1) u sum_i |w_i x_i| with u = 2^-24 (one rounding per
product, at most K per chain of additions). The errors measured are about 1e-3 of it
(~1e-8 relative to sum |w x|); ggml's own CUDA path, which rounds x to 8 bits, is ~1e-2 off.

Also here: the kernels compile for a real GPU (to PTX, with NVVM, no GPU needed) without
float64 arithmetic or local memory; and, on a machine with a GPU, larger shapes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import kquant
from kquant.matmul.cuda_blocks import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
TYPES = list(FAMILIES)
#: types whose blocks come from ggml_quantize_chunk with an importance matrix (several need one;
#: their codecs are not on every branch), their values from ggml's dequantize_row_*
GRID_TYPES = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"}
U = 2.0 ** -24

sim = pytest.mark.skipif(not SIM, reason="needs NUMBA_ENABLE_CUDASIM=1 (test_simulator_suite "
                                         "runs these in a subprocess)")

if SIM:
    # The simulator's block manager polls its threads while they run, and with Python's default
    # 5 ms GIL switch interval every barrier (each warp shuffle is one) waits for it: 0.1 ms
    # makes the warp kernel ~2.5x faster.
    sys.setswitchinterval(1e-4)


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _cols(name: str, big: bool = False) -> int:
    """A row length for the type: whole 256-blocks, three 32-blocks, or a ragged float row."""
    if name.endswith("_K") or name in ("IQ4_XS", "IQ3_XXS", "IQ3_S") or name in GRID_TYPES:
        return 4096 if big else 512
    if name.startswith(("Q", "IQ")):
        return 4096 if big else 96
    return 4000 if big else 199


def _case(name: str, rows: int, cols: int, seed: int = 0):
    """Weights quantized by kquant (rows of varied scale, heavy-ish tails) and their float64
    dequantization."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(5, (rows, cols)) * rng.uniform(0.05, 2.0, (rows, 1))
    if name in GRID_TYPES:
        from gguf import GGMLQuantizationType as Q

        from kquant.reference import find_libggml
        from kquant.reference.libggml import GGML

        if find_libggml() is None:
            pytest.skip(f"{name}: no codec here and no libggml to quantize with")
        g = GGML()
        q = g.quantize(w.astype(np.float32), Q[name], (rng.random(cols) + 0.1).astype(np.float32))
        return q, g.dequantize(q, Q[name]).astype(np.float64)
    q = kquant.quantize(w.astype(np.float32), name)
    return q, kquant.dequantize(q, name).astype(np.float64)


def _acts(tokens: int, cols: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((tokens, cols)).astype(np.float32)


def _check(got, Wd, X):
    """got: (tokens, rows) from the kernels; the float32 worst-case bound against float64."""
    X64 = X.astype(np.float64)
    ref = X64 @ Wd.T
    mag = np.abs(X64) @ np.abs(Wd).T
    assert got.shape == ref.shape and got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - ref)
    bound = (Wd.shape[1] + 1) * U * mag * 1.0001 + 1e-30
    assert np.all(err <= bound), f"max error / bound = {np.max(err / bound):.3g}"
    return float(np.max(err / np.maximum(mag, 1e-30)))


# ---------------------------------------------------------------------------------------------
# no GPU, no simulator

@pytest.mark.parametrize("name", TYPES)
def test_decoders_match_dequantize(name):
    """Every lane's slice, decoded by the device functions run as plain Python, lands on
    ggml's dequantized values bit for bit, and the slices cover each row exactly once."""
    fam = FAMILIES[name]
    cols = _cols(name)
    q, ref = _case(name, 3, cols)
    ref = ref.astype(np.float32)
    view = {"u32": np.uint32, "u16": np.uint16, "f32": np.float32}[fam.view]
    qv, hv = q.view(view), q.view(np.float16)
    out = np.full(ref.shape, np.nan, np.float32)
    vals = np.empty(fam.vals, np.float32)
    for row in range(q.shape[0]):
        for blk in range(-(-cols // fam.qk)):
            for s in range(fam.lanes):
                fam.deq(qv, hv, np.uint64(row), blk, s, cols, vals)
                for r in range(fam.runs):
                    p0 = blk * fam.qk + fam.run_start(s, r)
                    for c in range(fam.run_len):
                        if p0 + c < cols:
                            assert np.isnan(out[row, p0 + c]), "slices overlap"
                            out[row, p0 + c] = vals[r * fam.run_len + c]
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))


def test_import_is_lazy():
    """Importing the module (and asking for an unsupported type) needs no numba.cuda."""
    code = textwrap.dedent("""
        import sys
        import kquant.matmul.cuda as kc
        assert "numba.cuda" not in sys.modules, "numba.cuda imported at module import"
        try:
            kc.matvec(b"", "Q8_K", None)
        except ValueError as e:
            assert "Q8_K" in str(e), e
        else:
            raise AssertionError("Q8_K accepted")
        assert "numba.cuda" not in sys.modules
    """)
    env = _env()
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.skipif(SIM, reason="this is the launcher of the simulator run")
def test_simulator_suite():
    """The test_sim_* tests, in a process with NUMBA_ENABLE_CUDASIM=1."""
    r = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-k",
                        "test_sim_", "-p", "no:cacheprovider"], cwd=ROOT,
                       env=_env(NUMBA_ENABLE_CUDASIM="1"), capture_output=True, text=True,
                       timeout=900)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], tail


_PTX_SCRIPT = textwrap.dedent("""
    import re, sys
    from numba import cuda, types
    from numba.cuda.cudadrv.error import CudaSupportError, NvvmSupportError
    import numba.cuda.dispatcher as dispatcher

    class _Device:          # device functions ask the current device for its compute capability
        compute_capability = (8, 0)
    dispatcher.get_current_device = lambda: _Device()

    from kquant.matmul import cuda as kc
    from kquant.matmul.cuda_blocks import FAMILIES

    A = lambda dt, layout="C": types.Array(dt, 2, layout)
    VIEW = {"u32": types.uint32, "u16": types.uint16, "f32": types.float32}
    bad = []
    for name, fam in FAMILIES.items():
        base = (A(VIEW[fam.view]), A(types.float16), A(types.float32), A(types.float32),
                types.int64, types.int64, types.int64)
        kernels = [("warp", kc._build_warp_kernel(fam, 2, 4, 1, 2), base)]
        if name in ("Q3_K", "Q4_K", "F32"):      # the tiled template, once per view dtype
            kernels.append(("tiled", kc._build_tiled_kernel(fam), base + (types.int64,)))
        for label, kern, sig in kernels:
            try:
                ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(8, 0))
            except (CudaSupportError, NvvmSupportError, OSError) as e:
                print("NO-NVVM", e)
                sys.exit(3)
            body = [l for l in ptx.splitlines() if l.startswith("\\t") and "//" not in l]
            f64 = [l for l in body if ".f64" in l]
            local = [l for l in body if ".local" in l]
            print(name, label, len(body), "instructions")
            if f64 or local:
                bad.append((name, label, f64[:3], local[:3]))
    if bad:
        print("BAD", bad)
        sys.exit(1)
""")


@pytest.mark.slow
@pytest.mark.skipif(SIM, reason="compiles for a real GPU")
def test_kernels_compile_for_gpu():
    """The kernels compile with Numba's real CUDA target (to PTX; NVVM, no GPU): the warp
    kernel of every type and the tiled one for each integer view, with no float64
    arithmetic and no local-memory arrays (the register arrays stay in registers)."""
    env = _env()
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    r = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=900)
    if r.returncode == 3:
        pytest.skip("NVVM (CUDA toolkit) not found: " + r.stdout.strip()[-300:])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


# ---------------------------------------------------------------------------------------------
# under the simulator

@pytest.fixture(scope="module")
def kc():
    from numba import cuda
    if not cuda.is_available():
        pytest.skip("numba.cuda unavailable")
    import kquant.matmul.cuda as module
    return module


@sim
@pytest.mark.parametrize("name", TYPES)
def test_sim_matvec(kc, name):
    q, Wd = _case(name, 5, _cols(name))
    x = _acts(1, Wd.shape[1])[0]
    dw = kc.to_device(q, name)
    y = kc.matvec(dw, name, x)
    assert isinstance(y, np.ndarray) and y.shape == (5,)
    _check(y[None, :], Wd, x[None, :])


@sim
@pytest.mark.parametrize("name", TYPES)
def test_sim_matmul_warp(kc, name):
    q, Wd = _case(name, 4, _cols(name), seed=2)
    X = _acts(3, Wd.shape[1], seed=3)
    _check(kc.matmul(kc.to_device(q, name), name, X), Wd, X)


@sim
@pytest.mark.parametrize("name", TYPES)
def test_sim_matmul_tiled(kc, name):
    q, Wd = _case(name, 5, _cols(name), seed=4)
    X = _acts(3, Wd.shape[1], seed=5)
    _check(kc.matmul(kc.to_device(q, name), name, X, method="tiled"), Wd, X)


@sim
@pytest.mark.parametrize("name,cols,wpr", [("Q4_K", 1024, 2), ("Q6_K", 1024, 4),
                                           ("Q5_0", 96, 4), ("BF16", 300, 2)])
def test_sim_warps_per_row(kc, name, cols, wpr):
    """Rows split over 2 or 4 warps (combined in shared memory), some warps without blocks."""
    q, Wd = _case(name, 3, cols, seed=6)
    dw = kc.to_device(q, name)
    x = _acts(1, cols, seed=7)
    _check(kc.matvec(dw, name, x[0], warps_per_row=wpr)[None, :], Wd, x)
    X = _acts(2, cols, seed=8)
    _check(kc.matmul(dw, name, X, method="warp", warps_per_row=wpr), Wd, X)


@sim
def test_sim_launch_config(kc):
    fam = FAMILIES["Q4_K"]
    assert kc.launch_config(fam, 4096, 16, 1) == (4, 1, 2)     # 4096 columns: 8 iterations
    assert kc.launch_config(fam, 4096, 16, 3) == (4, 1, 2)
    assert kc.launch_config(fam, 4096, 16, 6) == (2, 2, 2)
    assert kc.launch_config(fam, 4096, 2, 1) == (1, 1, 2)      # one iteration: one warp
    assert kc.launch_config(fam, 1, 16, 1)[2] == 1
    with pytest.raises(ValueError):
        kc.launch_config(fam, 8, 16, 1, warps_per_row=3)


@sim
def test_sim_token_groups(kc):
    """More tokens than one warp-kernel launch takes (8) run in groups; "auto" switches to
    the tiled kernel above 8."""
    q, Wd = _case("Q6_K", 3, 512, seed=9)
    dw = kc.to_device(q, "Q6_K")
    X = _acts(10, 512, seed=10)
    _check(kc.matmul(dw, "Q6_K", X, method="warp"), Wd, X)
    q, Wd = _case("Q8_0", 3, 64, seed=11)
    X = _acts(9, 64, seed=12)
    _check(kc.matmul(kc.to_device(q, "Q8_0"), "Q8_0", X), Wd, X)


@sim
def test_sim_tile_edges(kc):
    """The tiled kernel over two row tiles (66 rows) and over two token tiles (34 tokens)."""
    q, Wd = _case("F32", 66, 128, seed=13)
    X = _acts(2, 128, seed=14)
    _check(kc.matmul(kc.to_device(q, "F32"), "F32", X, method="tiled"), Wd, X)
    q, Wd = _case("Q4_0", 3, 160, seed=15)
    X = _acts(34, 160, seed=16)
    _check(kc.matmul(kc.to_device(q, "Q4_0"), "Q4_0", X, method="tiled"), Wd, X)


@sim
def test_sim_device_arrays(kc):
    """Device arrays in, device arrays out (into `out`); weights already on the device."""
    from numba import cuda
    q, Wd = _case("Q5_K", 4, 256, seed=17)
    dw = kc.to_device(cuda.to_device(q), "q5_k")
    assert (dw.weight_type, dw.rows, dw.cols, dw.nbytes) == ("Q5_K", 4, 256, q.nbytes)
    x = _acts(1, 256, seed=18)
    out = cuda.device_array(4, np.float32)
    y = kc.matvec(dw, "Q5_K", cuda.to_device(x[0]), out=out)
    assert not isinstance(y, np.ndarray)
    _check(out.copy_to_host()[None, :], Wd, x)
    X = _acts(2, 256, seed=19)
    Y = kc.matmul(dw, "Q5_K", cuda.to_device(X))
    _check(Y.copy_to_host(), Wd, X)
    # raw numpy weights are accepted too (copied per call)
    _check(kc.matvec(q, "Q5_K", x[0])[None, :], Wd, x)


@sim
def test_sim_errors(kc):
    q, _ = _case("Q4_0", 2, 64)
    dw = kc.to_device(q, "Q4_0")
    with pytest.raises(ValueError, match="shape"):
        kc.matvec(dw, "Q4_0", np.zeros(32, np.float32))
    with pytest.raises(ValueError, match="shape"):
        kc.matmul(dw, "Q4_0", np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="not Q4_1"):
        kc.matvec(dw, "Q4_1", np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="whole number"):
        kc.to_device(q[:, :17], "Q4_0")
    with pytest.raises(ValueError, match="out"):
        kc.matvec(dw, "Q4_0", np.zeros(64, np.float32), out=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="method"):
        kc.matmul(dw, "Q4_0", np.zeros((1, 64), np.float32), method="mmq")
    with pytest.raises(ValueError, match="no CUDA matmul kernel"):
        kc.to_device(kquant.quantize(np.zeros((1, 256), np.float32), "Q8_K"), "Q8_K")


# ---------------------------------------------------------------------------------------------
# on a real GPU

def _real_gpu() -> bool:
    if SIM:
        return False
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:                                  # noqa: BLE001 - no driver, no toolkit
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _real_gpu(), reason="no CUDA GPU")
@pytest.mark.parametrize("name", TYPES)
def test_gpu_large(name):
    import kquant.matmul.cuda as kc
    rows = 1030                                       # not a multiple of any tile
    q, Wd = _case(name, rows, _cols(name, big=True), seed=20)
    dw = kc.to_device(q, name)
    cols = Wd.shape[1]
    x = _acts(1, cols, seed=21)
    _check(kc.matvec(dw, name, x[0])[None, :], Wd, x)
    for tokens, method in ((5, "auto"), (8, "auto"), (77, "auto"), (3, "tiled"), (12, "warp")):
        X = _acts(tokens, cols, seed=22 + tokens)
        _check(kc.matmul(dw, name, X, method=method), Wd, X)
