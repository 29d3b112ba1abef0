"""kquant.matmul.repack against llama.cpp's repacked CPU matmul: speed (and a bit check).

    KQUANT_LIBGGML=.../libggml-base.so KQUANT_LIBGGML_CPU=.../libggml-cpu.so \
        python tools/bench_repack.py [--rows 2048] [--k 2048] [--tokens 512] [--types Q4_K Q4_0]

ggml's side is its whole MUL_MAT on the CPU backend with the weight in the CPU_REPACK buffer
(what llama-perplexity runs: activation quantization, gemm / gemv, its thread pool), on 1 and
2 threads; kquant's is `matmul_prepared` (activation quantization included, weight prepared
once) on as many Numba threads. Best of --repeat, interleaved.

ggml's side comes from `kquant.reference.repack.GGMLRepack` (the ctypes wrapper, also used by
tests/test_matmul_repack.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf import GGMLQuantizationType as T  # noqa: E402

from kquant.reference.repack import GGMLRepack  # noqa: E402


def heavy_tailed(rng: np.random.Generator, shape) -> np.ndarray:
    """Student-t (3 degrees of freedom) values: a few large ones, as in real weights."""
    return rng.standard_t(3, size=shape).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--types", nargs="+", default=["Q4_K", "Q4_0"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import numba

    import kquant
    from kquant.matmul import repack

    g = GGMLRepack()
    rng = np.random.default_rng(0)
    x = heavy_tailed(rng, (args.tokens, args.k))
    print(f"{args.rows} x {args.k} weight, {args.tokens} tokens; ms per call, best of "
          f"{args.repeat}")
    print("| type | threads | ggml ms | kquant ms | speed vs ggml | identical |")
    print("|---|---:|---:|---:|---:|---|")
    for name in args.types:
        qtype = T[name]
        wb = kquant.quantize(heavy_tailed(rng, (args.rows, args.k)), name)
        p = repack.prepare(wb, qtype)
        for threads in args.threads:
            numba.set_num_threads(threads)
            with g.session(wb, qtype, args.tokens, threads) as mm:
                ref = mm(x)
                ours = repack.matmul_prepared(p, x)
                same = np.array_equal(ref.view(np.uint32), ours.view(np.uint32))
                tg, tk = [], []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    mm(x)
                    tg.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    repack.matmul_prepared(p, x)
                    tk.append(time.perf_counter() - t0)
            a, k_ = min(tg) * 1e3, min(tk) * 1e3
            print(f"| {name} | {threads} | {a:.1f} | {k_:.1f} | {a / k_:.2f}x | {same} |")


if __name__ == "__main__":
    main()
