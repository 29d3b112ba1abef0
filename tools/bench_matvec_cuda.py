"""Speed of kquant's CUDA kernels that multiply straight from ggml blocks (kquant.matmul.cuda).

    python tools/bench_matvec_cuda.py [--types Q4_K Q8_0 ...] [--repeats 50] [--tokens 512]

For each type: y = W x for W of 4096 x 4096 and 8192 x 8192 (the token-generation case),
timed with CUDA events over `--repeats` back-to-back launches after a warm-up (which
compiles the kernels), best of 3 such runs. Printed per size: GPU microseconds per product,
the effective bandwidth (bytes of W read / GPU time) and its fraction of the device's copy
bandwidth (a large device-to-device copy, counted as bytes read + bytes written, the peak a
kernel that streams memory can expect), and the wall time of one call from Python (Numba's
launch overhead included). Then Y = X W^T for `--tokens` tokens at 4096 x 4096 (the
prefill case, the tiled kernel): GPU milliseconds and TFLOP/s (2 rows cols tokens / time).

Weights are random rows quantized by kquant (256 distinct rows, repeated to the full height:
the kernels' speed does not depend on the values), and every product is checked against
`dequantize(W) @ x` on the distinct rows before it is timed.

Needs an NVIDIA GPU (numba.cuda). `NUMBA_ENABLE_CUDASIM=1 python tools/bench_matvec_cuda.py
--small` runs the same code paths with tiny shapes on Numba's CUDA simulator (its timings
are meaningless: it only checks that the script works).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kquant  # noqa: E402
from kquant.codecs import get_codec  # noqa: E402

TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
         "F16", "BF16", "F32"]
DISTINCT_ROWS = 256


def _gpu_or_exit(small: bool):
    """numba.cuda and a description of the device, or exit with a message."""
    simulator = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    try:
        from numba import cuda
        available = cuda.is_available()
    except Exception as e:                                  # noqa: BLE001
        available, cuda = False, None
        reason = f"{type(e).__name__}: {e}"
    else:
        reason = "numba.cuda.is_available() is False"
    if not available:
        sys.exit(f"bench_matvec_cuda: no CUDA GPU ({reason}). Run it on a machine with an "
                 "NVIDIA GPU and its driver; `NUMBA_ENABLE_CUDASIM=1 ... --small` only "
                 "exercises the code on Numba's simulator.")
    if simulator:
        if not small:
            sys.exit("bench_matvec_cuda: NUMBA_ENABLE_CUDASIM=1 is Numba's CUDA simulator "
                     "(Python, no GPU): use --small, its timings are meaningless")
        return cuda, "Numba CUDA simulator (timings meaningless)", True
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    free, total = cuda.current_context().get_memory_info()
    desc = (f"{name}, compute capability {dev.compute_capability[0]}.{dev.compute_capability[1]},"
            f" {dev.MULTIPROCESSOR_COUNT} SMs, {total / 2**30:.0f} GiB")
    return cuda, desc, False


class Timer:
    """Time per call of fn, best of `runs` batches of `repeats` back-to-back calls.

    `gpu(fn)`: device time. Numba spends tens of microseconds of Python per launch, longer
    than a 4096 x 4096 matvec runs, so launches issued back to back would leave the GPU idle
    between them and the events would time the host. The batch is therefore queued behind a
    single-thread spin kernel that outlasts the issuing; the start event is recorded after
    the spin, so the launches run without gaps between the events.
    `call(fn)`: wall-clock time per call as a Python caller sees it (synchronized at the end).
    The simulator's events do not time: both are wall clock there.
    """

    def __init__(self, cuda, simulator: bool, runs: int = 3):
        self.cuda = cuda
        self.simulator = simulator
        self.runs = runs
        self._spin = None
        self._spin_rate = None                     # spin iterations per second

    def _batch_wall(self, fn, repeats: int) -> float:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.cuda.synchronize()
        return time.perf_counter() - t0

    def call(self, fn, repeats: int) -> float:
        fn()                                        # warm-up: compiles on first use
        self.cuda.synchronize()
        return max(min(self._batch_wall(fn, repeats) for _ in range(self.runs)) / repeats, 1e-12)

    def _spinner(self):
        if self._spin is None:
            from numba import float32
            cuda = self.cuda

            @cuda.jit
            def spin(out, n):
                acc = float32(0.0)
                for _ in range(n):
                    acc = acc * float32(0.999) + float32(1.0)
                out[0] = acc

            self._spin_out = cuda.device_array(1, np.float32)
            self._spin = spin
            n = 1 << 20
            for _ in range(2):                      # compile, then calibrate
                start, stop = cuda.event(), cuda.event()
                start.record()
                spin[1, 1](self._spin_out, n)
                stop.record()
                stop.synchronize()
            self._spin_rate = n / max(cuda.event_elapsed_time(start, stop) / 1e3, 1e-6)
        return self._spin

    def gpu(self, fn, repeats: int) -> float:
        if self.simulator:
            return self.call(fn, repeats)
        cuda = self.cuda
        spin = self._spinner()
        fn()
        cuda.synchronize()
        issue = self._batch_wall(fn, repeats)      # an upper bound of the time to issue them
        n = int(self._spin_rate * (2 * issue + 2e-3))
        best = float("inf")
        for _ in range(self.runs):
            start, stop = cuda.event(), cuda.event()
            spin[1, 1](self._spin_out, n)
            start.record()
            for _ in range(repeats):
                fn()
            stop.record()
            stop.synchronize()
            best = min(best, cuda.event_elapsed_time(start, stop) / 1e3 / repeats)
        return max(best, 1e-12)


def copy_bandwidth(cuda, timer: Timer, nbytes: int, repeats: int) -> float:
    """Bytes moved per second (read + written) by a device-to-device copy of nbytes."""
    n = nbytes // 4
    src = cuda.to_device(np.arange(n, dtype=np.float32))
    dst = cuda.device_array(n, np.float32)
    t = timer.gpu(lambda: dst.copy_to_device(src), repeats)
    assert np.array_equal(dst[:16].copy_to_host(), np.arange(16, dtype=np.float32))
    return 2 * n * 4 / t


def make_weights(name: str, rows: int, cols: int, seed: int = 0):
    """(quantized rows, rows x row_bytes) and the float64 dequantization of the distinct rows."""
    rng = np.random.default_rng(seed)
    distinct = min(rows, DISTINCT_ROWS)
    w = (rng.standard_t(5, (distinct, cols)) * rng.uniform(0.05, 2.0, (distinct, 1)))
    q = kquant.quantize(w.astype(np.float32), name)
    full = np.tile(q, (-(-rows // distinct), 1))[:rows]
    return np.ascontiguousarray(full), kquant.dequantize(q, name).astype(np.float64)


def check(got: np.ndarray, Wd: np.ndarray, X: np.ndarray, what: str) -> float:
    """Max error relative to sum |w x| on the distinct rows; exits if past the float32 bound."""
    X64 = X.astype(np.float64)
    d = Wd.shape[0]
    ref = X64 @ Wd.T
    mag = np.abs(X64) @ np.abs(Wd).T
    err = np.abs(got[:, :d].astype(np.float64) - ref)
    bound = (Wd.shape[1] + 1) * 2.0 ** -24 * mag * 1.0001 + 1e-30
    if not np.all(err <= bound):
        sys.exit(f"bench_matvec_cuda: {what}: wrong result (max error / float32 bound "
                 f"{np.max(err / bound):.3g})")
    return float(np.max(err / np.maximum(mag, 1e-30)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="+", default=TYPES, metavar="TYPE")
    ap.add_argument("--sizes", nargs="+", type=int, default=None, metavar="N",
                    help="square matvec sizes (default 4096 8192)")
    ap.add_argument("--tokens", type=int, default=None, help="matmul tokens (default 512)")
    ap.add_argument("--matmul-size", type=int, default=None,
                    help="rows = cols of the matmul (default 4096)")
    ap.add_argument("--repeats", type=int, default=None, help="launches per timing (default 50)")
    ap.add_argument("--copy-mib", type=int, default=None,
                    help="size of the copy that measures bandwidth (default 1024 MiB)")
    ap.add_argument("--tsv", default=None, metavar="FILE",
                    help="append one summary row per type (check<TAB>result<TAB>detail) to FILE "
                         "(tools/gpu_check.sh gathers them)")
    ap.add_argument("--small", action="store_true",
                    help="tiny shapes, one timing run of one launch: checks that the script "
                         "runs (for the simulator)")
    args = ap.parse_args(argv)

    cuda, device, simulator = _gpu_or_exit(args.small)
    from kquant.matmul import cuda as kc

    if args.small:
        shapes = [(4, 256), (6, 512)]
        mm_shape, tokens, repeats, copy_bytes = (4, 256), 9, 1, 1 << 20
    else:
        shapes = [(n, n) for n in (args.sizes or [4096, 8192])]
        m = args.matmul_size or 4096
        mm_shape, tokens, repeats, copy_bytes = (m, m), 512, 50, 1 << 30
    tokens = args.tokens or tokens
    repeats = args.repeats or repeats
    copy_bytes = (args.copy_mib << 20) if args.copy_mib else copy_bytes
    types = [get_codec(t).name for t in args.types]
    for t in types:
        if t not in kc.SUPPORTED_TYPES:
            sys.exit(f"bench_matvec_cuda: no CUDA kernel for {t}")

    timer = Timer(cuda, simulator, runs=1 if args.small else 3)
    bw = copy_bandwidth(cuda, timer, copy_bytes, repeats)
    print(f"# kquant CUDA kernels on {device}")
    print(f"# device-to-device copy of {copy_bytes / 2**20:.0f} MiB: {bw / 1e9:.1f} GB/s "
          f"(read + write); matvec bandwidth = bytes of W / time; best of {timer.runs} x "
          f"{repeats} launches")
    head = "| type | bits/value |"
    rule = "|---|---:|"
    for r, c in shapes:
        head += f" {r}x{c} GPU us | GB/s | of copy | per call us |"
        rule += "---:|---:|---:|---:|"
    head += f" matmul {mm_shape[0]}x{mm_shape[1]} x {tokens} tok ms | TFLOP/s |"
    rule += "---:|---:|"
    print(head)
    print(rule)

    summary = [("device copy", "ok", f"{bw / 1e9:.1f} GB/s ({device})")]
    worst = 0.0
    for name in types:
        codec = get_codec(name)
        line = f"| {name} | {8 * codec.type_size / codec.block_size:.2f} |"
        detail = []
        for rows, cols in shapes:
            q, Wd = make_weights(name, rows, cols)
            dw = kc.to_device(q, name)
            x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
            dx = cuda.to_device(x)
            dy = cuda.device_array(rows, np.float32)
            kc.matvec(dw, name, dx, out=dy)
            worst = max(worst, check(dy.copy_to_host()[None, :], Wd, x[None, :],
                                     f"{name} matvec {rows}x{cols}"))
            fn = lambda: kc.matvec(dw, name, dx, out=dy)  # noqa: E731
            t = timer.gpu(fn, repeats)
            gbs = dw.nbytes / t
            line += (f" {t * 1e6:.1f} | {gbs / 1e9:.0f} | {gbs / bw:.0%} |"
                     f" {timer.call(fn, repeats) * 1e6:.1f} |")
            detail.append(f"{rows}x{cols} {gbs / 1e9:.0f} GB/s = {gbs / bw:.0%} of copy")
        rows, cols = mm_shape
        q, Wd = make_weights(name, rows, cols, seed=2)
        dw = kc.to_device(q, name)
        X = np.random.default_rng(3).standard_normal((tokens, cols)).astype(np.float32)
        dX = cuda.to_device(X)
        dY = cuda.device_array((tokens, rows), np.float32)
        kc.matmul(dw, name, dX, out=dY)
        worst = max(worst, check(dY.copy_to_host(), Wd, X, f"{name} matmul"))
        t = timer.gpu(lambda: kc.matmul(dw, name, dX, out=dY), max(1, repeats // 10))
        line += f" {t * 1e3:.3f} | {2 * rows * cols * tokens / t / 1e12:.2f} |"
        detail.append(f"matmul x{tokens} {2 * rows * cols * tokens / t / 1e12:.2f} TFLOP/s")
        summary.append((f"matvec {name}", "ok", "; ".join(detail)))
        print(line, flush=True)
    print(f"# results checked against dequantize(W) @ x: max error {worst:.2e} of sum |w x|")
    if simulator:
        print("# (simulator: the timings above are meaningless)")
    if args.tsv:
        with open(args.tsv, "a") as f:
            for row in summary:
                f.write("\t".join(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
