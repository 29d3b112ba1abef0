"""Matrix-vector speed of kquant.matmul against ggml's own vec_dot, per weight type.

    python tools/bench_matvec.py [--types Q4_K Q8_0 ...] [--threads 2] [--repeats 20]
    python tools/bench_matvec.py --crossover [--types Q4_K ...]   # block kernels vs BLAS

For each type and shape (4096 x 4096 and SmolLM2-135M's 576 x 1536 by default; rows x
values per row) the weights are random normals quantized with kquant.quantize, the
activation one random vector quantized once to the type's vec_dot_type (kquant's and
ggml's from_float give the same bytes; the script checks). Timed, alternating, best of
--repeats:
- kquant: kquant.matmul.cpu.run_blocks, the Numba kernel over all rows (prange);
- ggml: ggml's vec_dot for the type (ggml_get_type_traits_cpu from llama-cpp-python's
  libggml-cpu) called row by row from a Numba prange loop: the same rows on the same threads
  and harness, so the ratio compares the dot-product code alone.
GB/s counts the weight bytes read; Gop/s = 2 * rows * k / time; "of BW" is kquant's GB/s over
the machine's read bandwidth, measured first with a parallel Numba sum over 512 MiB on the
same threads (and a numpy copy, one thread, read + write, for reference). A 4096 x 4096
matrix of up to 8 bits (<= 17.8 MB) stays in this machine's 32 MiB L3 between repetitions,
so those rows can exceed the DRAM figure; F16 (33.6 MB) and F32 (67 MB) do not. `--copies N`
cycles through N copies of each matrix to time it from DRAM.

--crossover times `matmul` for growing token counts on the block kernels and on the BLAS path
(weight tiles dequantized to float32, numpy matmul; OpenBLAS limited to --threads too), which
is how BLAS_MIN_TOKENS in kquant/matmul/cpu.py were chosen.

Timings on a shared machine: a parallel region on 2 threads waits for both, so when another
process holds one of the 2 cores a call stalls for a scheduler time slice (milliseconds). The
alternation and best-of-N keep the comparison fair, but absolute 2-thread numbers swing; run
with --threads 1 for stable ones.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _preset_blas_threads() -> None:
    """BLAS (the --crossover BLAS path) on as many threads as Numba: set before numpy loads
    OpenBLAS. On 2 shared cores, a second pool spinning beside Numba's distorts both."""
    n = "2"
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = argv[i + 1]
        elif a.startswith("--threads="):
            n = a.split("=", 1)[1]
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, n)


_preset_blas_threads()

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

import kquant  # noqa: E402
from kquant.matmul import cpu  # noqa: E402
from kquant.types import TYPES  # noqa: E402

T = cpu.T


@njit(parallel=True, cache=True, fastmath=True)
def _par_sum(a):
    n = a.shape[0]
    chunks = 64
    part = np.zeros(chunks, np.float32)
    for c in prange(chunks):
        seg = a[c * n // chunks:(c + 1) * n // chunks]
        s = np.float32(0.0)
        for i in range(seg.shape[0]):    # vectorised: fastmath lets LLVM reassociate
            s += seg[i]
        part[c] = s
    return part.sum()


def bandwidth(mib: int = 512, repeats: int = 5) -> tuple[float, float]:
    """(parallel read GB/s on Numba's threads, numpy copy GB/s counting read + write)."""
    a = np.ones(mib << 18, np.float32)
    b = np.empty_like(a)
    _par_sum(a)
    best_r = best_c = 1e9
    for _ in range(repeats):
        t0 = time.perf_counter()
        _par_sum(a)
        best_r = min(best_r, time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.copyto(b, a)
        best_c = min(best_c, time.perf_counter() - t0)
    return a.nbytes / best_r / 1e9, 2 * a.nbytes / best_c / 1e9


def make_weights(qtype, rows: int, k: int, rng) -> np.ndarray:
    w = rng.standard_normal((rows, k), dtype=np.float32)
    if qtype == T.F32:
        return w
    if TYPES[qtype].codec_class is None or qtype.name.startswith(("IQ1", "IQ2")):
        # the grid i-quants (IQ2 / IQ1; some need an importance matrix, and their codecs here
        # are slow to compile): ggml_quantize_chunk's blocks, with an imatrix of ones
        from kquant.reference.libggml import GGML

        return GGML().quantize(w, qtype, np.ones(k, np.float32))
    return kquant.quantize(w, qtype)


def time_pair(fa, fb, repeats: int) -> tuple[float, float]:
    fa()
    fb()
    ta = tb = 1e9
    for _ in range(repeats):
        t0 = time.perf_counter()
        fa()
        ta = min(ta, time.perf_counter() - t0)
        t0 = time.perf_counter()
        fb()
        tb = min(tb, time.perf_counter() - t0)
    return ta, tb


def bench_matvec(args, ggml) -> None:
    bw_read, bw_copy = bandwidth()
    print(f"# kquant.matmul vs ggml vec_dot: one activation vector, {args.threads} threads "
          f"(Numba prange over rows for both), best of {args.repeats}, weights in "
          f"{'DRAM (%d copies)' % args.copies if args.copies > 1 else 'cache where they fit'}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; read bandwidth "
          f"{bw_read:.1f} GB/s (parallel sum, {args.threads} threads), numpy copy "
          f"{bw_copy:.1f} GB/s (1 thread, read + write)")
    print("| type | shape | MB | kquant GB/s | kquant Gop/s | ggml GB/s | ggml Gop/s | ratio "
          "| of BW | max rel diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    worst = (9.9, None)
    for shape in args.shapes:
        rows, k = shape
        for name in args.types:
            qtype = cpu.qtype_of(name)
            if k % TYPES[qtype].block_size:
                continue
            ws = [cpu.weight_rows(make_weights(qtype, rows, k, rng), qtype)[0]
                  for _ in range(args.copies)]
            x = rng.standard_normal((1, k), dtype=np.float32)
            act = cpu.quantize_activations(x, qtype)
            g_act = ggml.from_float(x, cpu.VEC_DOT_TYPE[qtype])
            if not np.array_equal(g_act, act.data):
                print(f"# {qtype.name}: activation bytes differ from ggml's from_float")
            out_k = np.empty((1, rows), np.float32)
            out_g = np.empty((1, rows), np.float32)
            it = {"k": 0, "g": 0}

            def run_k():
                it["k"] += 1
                cpu.run_blocks(ws[it["k"] % len(ws)], qtype, act, out_k)

            def run_g():
                it["g"] += 1
                ggml.vec_dot_rows(ws[it["g"] % len(ws)], qtype, act.data, out_g)

            tk, tg = time_pair(run_k, run_g, args.repeats)
            cpu.run_blocks(ws[0], qtype, act, out_k)
            ggml.vec_dot_rows(ws[0], qtype, act.data, out_g)
            diff = float(np.max(np.abs(out_k - out_g)) / max(np.max(np.abs(out_g)), 1e-30))
            nbytes = ws[0].nbytes
            ops = 2.0 * rows * k
            ratio = tg / tk
            worst = min(worst, (ratio, f"{qtype.name} {rows}x{k}"))
            print(f"| {qtype.name} | {rows}x{k} | {nbytes / 1e6:.1f} | {nbytes / tk / 1e9:.1f} | "
                  f"{ops / tk / 1e9:.1f} | {nbytes / tg / 1e9:.1f} | {ops / tg / 1e9:.1f} | "
                  f"{ratio:.2f}x | {nbytes / tk / 1e9 / bw_read:.0%} | {diff:.1e} |")
    print(f"\nworst ratio {worst[0]:.2f}x ({worst[1]})")


def bench_crossover(args) -> None:
    rows, k = args.shapes[0]
    print(f"# matmul {rows}x{k}, {args.threads} threads: block kernels vs dequantized tiles + "
          f"BLAS (ms, best of {args.repeats}; activation quantization included in both)")
    tokens = args.tokens
    print("| type | " + " | ".join(f"{n} tok" for n in tokens) + " | first n where BLAS wins |")
    print("|---|" + "---:|" * len(tokens) + "---:|")
    rng = np.random.default_rng(0)
    for name in args.types:
        qtype = cpu.qtype_of(name)
        wb = cpu.weight_rows(make_weights(qtype, rows, k, rng), qtype)[0]
        cells, first = [], None
        for n in tokens:
            x = rng.standard_normal((n, k), dtype=np.float32)

            def blocks():
                cpu.run_blocks(wb, qtype, cpu.quantize_activations(x, qtype))

            def blas():
                cpu.run_blas(wb, qtype, cpu.quantize_activations(x, qtype))

            tb, tl = time_pair(blocks, blas, args.repeats)
            cells.append(f"{tb * 1e3:.1f} / {tl * 1e3:.1f}")
            if first is None and tl < tb:
                first = n
        print(f"| {qtype.name} | " + " | ".join(cells) + f" | {first or '-'} |")
    print("\ncells: block kernels / BLAS")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="+", default=[t.name for t in cpu.WEIGHT_TYPES])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "576x1536"],
                   help="ROWSxK matrices")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--copies", type=int, default=1,
                   help="distinct copies of each matrix, cycled, to time from DRAM")
    p.add_argument("--crossover", action="store_true")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128])
    args = p.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    if args.crossover:
        bench_crossover(args)
        return 0
    from kquant.reference.ggml_cpu import ggml_cpu

    try:
        ggml = ggml_cpu()
    except FileNotFoundError as e:
        print(f"bench_matvec: {e}", file=sys.stderr)
        return 1
    bench_matvec(args, ggml)
    return 0


if __name__ == "__main__":
    sys.exit(main())
