"""Speed of kquant.matmul.tinyblas against ggml's own mul_mat (llamafile's tinyBLAS), per type.

    python tools/bench_tinyblas.py [--types Q8_0 F16 ...] [--rows 2048] [--k 2048]
                                   [--tokens 512] [--threads 1 2] [--repeats 5]

For each type: random normal weights (rows x k, quantized with kquant.quantize; F32 / F16 /
BF16 as their bits) and float32 activations (tokens x k). Timed, alternating, best of
--repeats, on each thread count:
- ggml: one GGML_OP_MUL_MAT graph built once with libggml-base (a plain CPU buffer, no
  repack) and run with ggml_graph_compute_with_ctx(ctx, graph, threads) from libggml-cpu:
  for >= 2 tokens and these types ggml_compute_forward_mul_mat converts the activations to the
  vec_dot type and calls llamafile_sgemm. The graph includes that conversion, and so does the
  kquant side (kquant.matmul.tinyblas.matmul: activations quantized, then the Numba kernel).
- kquant: tinyblas.matmul on the same number of Numba threads.
Every result is checked bit for bit against ggml's. The libraries come from kquant.reference
($KQUANT_LIBGGML, $KQUANT_LIBGGML_CPU or llama-cpp-python). Gflop/s = 2 rows k tokens / time;
ratio = ggml time / kquant time (above 1: kquant faster).
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numba  # noqa: E402
import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

import kquant  # noqa: E402
from kquant.matmul import tinyblas  # noqa: E402


def make_weights(t: T, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal((rows, k)).astype(np.float32)
    if t == T.F32:
        return w.view(np.uint8)
    if t == T.F16:
        return w.astype(np.float16).view(np.uint8)
    return np.ascontiguousarray(kquant.quantize(w, t.name)).view(np.uint8)


class GGMLMulMat:
    """A mul_mat graph of ggml built once, computed on demand."""

    def __init__(self, g, wb: np.ndarray, t: T, k: int, x: np.ndarray):
        b = self.base = g.base
        self.cpu = g.cpu
        rows, n = wb.shape[0], x.shape[0]
        size = wb.nbytes + x.nbytes * 3 + rows * n * 8 + (64 << 20)
        self.ctx = b.ggml_init(g._params(size, None, False))
        tw = b.ggml_new_tensor_2d(self.ctx, int(t), k, rows)
        tx = b.ggml_new_tensor_2d(self.ctx, 0, k, n)
        ctypes.memmove(b.ggml_get_data(tw), wb.ctypes.data, wb.nbytes)
        ctypes.memmove(b.ggml_get_data(tx), x.ctypes.data, x.nbytes)
        self.res = b.ggml_mul_mat(self.ctx, tw, tx)
        self.graph = b.ggml_new_graph(self.ctx)
        b.ggml_build_forward_expand(self.graph, self.res)
        self.shape = (n, rows)

    def __call__(self, threads: int) -> None:
        self.cpu.ggml_graph_compute_with_ctx(self.ctx, self.graph, threads)

    def result(self) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        ctypes.memmove(out.ctypes.data, self.base.ggml_get_data(self.res), out.nbytes)
        return out

    def close(self) -> None:
        self.base.ggml_free(self.ctx)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", nargs="+", default=[t.name for t in tinyblas.TYPES])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    from kquant.reference.libggml import GGMLCompute
    g = GGMLCompute()
    rng = np.random.default_rng(0)
    rows, k, n = args.rows, args.k, args.tokens
    flop = 2.0 * rows * k * n
    print(f"{rows} x {k} weights, {n} tokens; best of {args.repeats}; "
          f"Numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads available")
    print(f"{'type':6} {'thr':>3} {'ggml ms':>9} {'kquant ms':>10} {'ggml Gf/s':>10} "
          f"{'kq Gf/s':>8} {'ratio':>6}  bits")
    for name in args.types:
        t = T[name]
        if not tinyblas.applies(t, rows, k, n):
            print(f"{name:6} tinyBLAS does not take {rows} x {k} by {n} tokens")
            continue
        wb = make_weights(t, rows, k, rng)
        x = rng.standard_normal((n, k)).astype(np.float32)
        ref = GGMLMulMat(g, wb, t, k, x)
        try:
            for threads in args.threads:
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                y = tinyblas.matmul(wb, t, x)    # compile / warm
                ref(threads)
                same = np.array_equal(y.view(np.uint32), ref.result().view(np.uint32))
                tg, tk = [], []
                for _ in range(args.repeats):
                    s = time.perf_counter()
                    ref(threads)
                    tg.append(time.perf_counter() - s)
                    s = time.perf_counter()
                    tinyblas.matmul(wb, t, x)
                    tk.append(time.perf_counter() - s)
                bg, bk = min(tg), min(tk)
                print(f"{name:6} {threads:>3} {bg * 1e3:9.1f} {bk * 1e3:10.1f} "
                      f"{flop / bg / 1e9:10.1f} {flop / bk / 1e9:8.1f} {bg / bk:6.2f}  "
                      f"{'identical' if same else 'DIFFERENT'}")
        finally:
            ref.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
