"""Where the runtime computes: numpy on the CPU or CuPy on an NVIDIA GPU, and how many threads.

The forward pass is written once against an array module; this picks it. Thread counts go to
both Numba and the BLAS numpy was built with (OpenBLAS in the numpy wheels), which has no
Python API for it, so its setter is looked up among the loaded shared libraries.
"""
from __future__ import annotations

import ctypes
import os
import time
from typing import Any

import numpy as np

from ..errors import ModelError

DEVICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: all mean "no GPU"
        return False


def resolve_device(device: str) -> str:
    """'auto' becomes 'cuda' when CuPy sees a GPU, else 'cpu'."""
    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise ModelError("--device cuda needs CuPy and an NVIDIA GPU: pip install 'kquant[gpu]'")
    return device


def array_module(device: str) -> Any:
    device = resolve_device(device)
    if device == "cuda":
        import cupy
        return cupy
    return np


def to_host(a: Any) -> np.ndarray:
    """A numpy array of a numpy or CuPy array."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def _blas_setters() -> list[Any]:
    """The set-num-threads functions of the BLAS libraries loaded in this process."""
    setters = []
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "blas" in line.lower() and ".so" in line}
    except OSError:
        return setters
    for lib in sorted(libs):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads",
                     "MKL_Set_Num_Threads", "bli_thread_set_num_threads"):
            fn = getattr(handle, name, None)
            if fn is not None:
                setters.append(fn)
                break
    return setters


def usable_cpus() -> set[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU (busy, total) clock ticks since boot, from Linux's /proc/stat."""
    times = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return times


def busy_cpus(cpus: set[int], interval: float = 0.1) -> float:
    """How many of `cpus` other work keeps busy, in CPUs (0.0 .. len(cpus)), sampled over
    `interval` seconds while this process sleeps; 0.0 where /proc/stat cannot be read."""
    try:
        before = _cpu_times()
        time.sleep(interval)
        after = _cpu_times()
    except (OSError, ValueError):
        return 0.0
    busy = 0.0
    for c in cpus:
        if c in before and c in after and after[c][1] > before[c][1]:
            busy += (after[c][0] - before[c][0]) / (after[c][1] - before[c][1])
    return min(busy, float(len(cpus)))


def default_threads() -> int:
    """The CPUs this process may use less those other processes keep busy right now, at least
    one. Numba's parallel loops join all their threads at the end of each loop, so one thread
    that must wait for a core holds up the others: on this project's 2-CPU machine with a
    process spinning on each CPU, generation on 2 threads ran 7x slower than on one
    (tools/bench_busy.py); one thread per idle CPU avoids that and costs nothing on a quiet
    machine."""
    cpus = usable_cpus()
    return max(1, len(cpus) - int(busy_cpus(cpus) + 0.5))


def set_threads(n: int | None) -> int:
    """Use n threads (default: `default_threads()`) for Numba's kernels and for the runtime's
    products (kquant.runtime.gemm), which run BLAS single-threaded on fixed tiles so that no
    value depends on n."""
    import numba

    from .gemm import set_pool_threads

    if n is None or n <= 0:
        n = default_threads()
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    set_blas_threads(1)
    set_pool_threads(n)
    return n


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory the forward pass frees for the next allocation
    instead of handing it back to the kernel. A pass allocates and frees hundreds of MB of
    arrays (a batch's logits alone are 200 MB on a 49k vocabulary); big ones are mmapped and
    unmapped each time, and on a virtual machine that returns freed pages to its host (free
    page reporting, as on this project's machines), touching fresh pages again costs ~3 us per
    4 KiB: 0.3-0.5 s per 200 MB, ~12% of kquant-perplexity's time on SmolLM2 F16. llama.cpp
    allocates its buffers once, so never pays it. With mmap off and trimming off, freed blocks
    stay in the heap and are reused warm; the process keeps its peak size, as llama.cpp's does.
    (Big allocations from other threads fall back to the main heap.) Returns whether it took
    effect (False where the C library is not glibc). For the commands' processes, not for
    programs that import kquant as a library."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    # the largest threshold mallopt takes is INT_MAX
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok)


def set_blas_threads(n: int) -> None:
    """The thread count of numpy's BLAS (OpenBLAS has no Python API for it)."""
    np.zeros(1) @ np.zeros(1)  # make sure numpy's BLAS is loaded before looking for it
    for setter in _blas_setters():
        setter(ctypes.c_int(n))
