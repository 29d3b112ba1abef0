#!/usr/bin/env python3
"""kquant's codecs against ggml's own `ggml_quantize_chunk`, side by side in one process.

For every type, with and without an importance matrix, single-threaded and on all cores,
prints the throughput of both (millions of values per second), the ratio kquant/ggml, and
how kquant scales from 1 to N threads. ggml's multi-threaded figure splits the rows into
one chunk per thread and calls ggml_quantize_chunk on each from a thread pool (ctypes drops
the GIL), which is how llama-quantize parallelises a tensor.

Timing: each measurement alternates kquant and ggml runs and keeps the best of --repeats,
since this kind of machine's clock wanders by 2x between runs. Every kquant result is also
compared with ggml's bytes.

    python tools/bench_codecs.py                 # all types, 1 and all threads
    python tools/bench_codecs.py --types Q4_K Q6_K --width 4096 --seconds 0.3
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numba  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402

import kquant  # noqa: E402
from kquant.reference.libggml import GGML  # noqa: E402

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
         "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M",
         "F16", "BF16"]


def ggml_quantize_mt(ggml: GGML, x: np.ndarray, qtype, imatrix, pool: ThreadPoolExecutor | None,
                     n_threads: int) -> np.ndarray:
    if pool is None or n_threads == 1:
        return ggml.quantize(x, qtype, imatrix)
    chunks = np.array_split(np.arange(x.shape[0]), n_threads)
    parts = pool.map(lambda rows: ggml.quantize(x[rows[0]:rows[-1] + 1], qtype, imatrix), chunks)
    return np.concatenate(list(parts))


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(ggml, x, qtype, imatrix, n_threads, pool, repeats):
    """(kquant seconds, ggml seconds, bytes equal) for one configuration, interleaved."""
    k_best = g_best = float("inf")
    same = True
    for _ in range(repeats):
        t = time.perf_counter()
        a = kquant.quantize(x, qtype, imatrix, n_threads=n_threads)
        k_best = min(k_best, time.perf_counter() - t)
        t = time.perf_counter()
        b = ggml_quantize_mt(ggml, x, qtype, imatrix, pool, n_threads)
        g_best = min(g_best, time.perf_counter() - t)
        same = same and np.array_equal(a, b)
    return k_best, g_best, same


def rows_for(qtype, imatrix, width, seconds, max_rows, rng) -> int:
    """Enough rows that one single-threaded kquant run takes about `seconds`."""
    probe = rng.standard_normal((16, width)).astype(np.float32)
    kquant.quantize(probe, qtype, imatrix, n_threads=1)  # compile
    dt = best_of(lambda: kquant.quantize(probe, qtype, imatrix, n_threads=1), 3)
    return int(min(max_rows, max(16, seconds / max(dt, 1e-9) * 16)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--width", type=int, default=4096, help="values per row (default 4096)")
    ap.add_argument("--seconds", type=float, default=0.25, help="target length of one run")
    ap.add_argument("--max-rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS,
                    help="the 'all cores' thread count (default: all)")
    args = ap.parse_args()

    ggml = GGML()
    rng = np.random.default_rng(0)
    n = args.threads
    pool = ThreadPoolExecutor(n) if n > 1 else None
    imatrix = (rng.random(args.width) * rng.exponential(1.0, args.width)).astype(np.float32)
    print(f"# kquant {kquant.__version__} vs ggml ({ggml.path.name}), {os.cpu_count()} cores, "
          f"rows of {args.width}, best of {args.repeats}; Mv/s = million values per second")
    print(f"| type | imatrix | kquant 1t | ggml 1t | ratio 1t | kquant {n}t | ggml {n}t "
          f"| ratio {n}t | kquant {n}t/1t | bytes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    worst_ratio, worst_scaling, all_same = float("inf"), float("inf"), True
    for name in args.types:
        qtype = GGMLQuantizationType[name]
        codec = kquant.get_codec(qtype)
        modes = (None, imatrix) if codec.uses_imatrix else (None,)
        for weights in modes[1:] if codec.requires_imatrix else modes:
            rows = rows_for(qtype, weights, args.width, args.seconds, args.max_rows, rng)
            rows = max(n, rows - rows % n)
            x = rng.standard_normal((rows, args.width)).astype(np.float32)
            k1, g1, same1 = measure(ggml, x, qtype, weights, 1, None, args.repeats)
            kn, gn, samen = measure(ggml, x, qtype, weights, n, pool, args.repeats)
            mv = x.size / 1e6
            ratio1, ration, scaling = g1 / k1, gn / kn, k1 / kn
            same = same1 and samen
            all_same &= same
            worst_ratio = min(worst_ratio, ratio1)
            if rows >= 64 * n:
                worst_scaling = min(worst_scaling, scaling / n)
            print(f"| {name} | {'yes' if weights is not None else 'no'} | {mv / k1:.1f} | "
                  f"{mv / g1:.1f} | {ratio1:.2f}x | {mv / kn:.1f} | {mv / gn:.1f} | "
                  f"{ration:.2f}x | {scaling:.2f} | {'identical' if same else 'DIFFERENT'} |",
                  flush=True)
    print(f"\nworst single-thread ratio {worst_ratio:.2f}x; worst scaling "
          f"{worst_scaling:.2f} of ideal on {n} threads; bytes "
          f"{'identical everywhere' if all_same else 'DIFFER somewhere'}")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
