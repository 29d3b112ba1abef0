"""The codecs' rows on several threads.

Every codec kernel is a plain `@njit(nogil=True)` function over the rows it is handed; this
runs it on contiguous slices of the rows from a pool of Python threads, one slice a thread
(Numba's thread count: `kquant.codecs.api.numba_threads` or `kquant.runtime.set_threads` set
it). Rows are independent, so the bytes are the same for any thread count.

Why not Numba's `prange`: a `parallel=True` kernel is compiled twice, the second time as a
gufunc through the parfor passes, which costs 2-3 s a kernel on this project's 2-vCPU machine
and was 40% of a user's first `kquant-quantize` (tools/coldstart.py: 27 s with prange, 16 s
without, an empty Numba cache). The codecs' rows take microseconds to milliseconds each, so
slicing them by hand runs as fast.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numba

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # the calling thread takes a slice too: one worker fewer than Numba's threads
            workers = max(1, numba.config.NUMBA_NUM_THREADS - 1)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kquant-rows")
        return _pool


def for_row_slices(n_rows: int, work: Callable[[int, int], None], threads: int | None = None) -> None:
    """work(a, b) for contiguous slices [a, b) that cover range(n_rows), on up to `threads`
    threads (default: Numba's thread count), the calling thread taking the first slice. The
    first exception any slice raises is raised here, once every slice has stopped."""
    n = min(threads or numba.get_num_threads(), n_rows)
    if n <= 1:
        if n_rows > 0:
            work(0, n_rows)
        return
    bounds = [n_rows * i // n for i in range(n + 1)]
    futures = [_executor().submit(work, bounds[i], bounds[i + 1]) for i in range(1, n)]
    error: BaseException | None = None
    try:
        work(bounds[0], bounds[1])
    except BaseException as e:  # noqa: BLE001 - re-raised below, after the other slices
        error = e
    for f in futures:
        try:
            f.result()
        except BaseException as e:  # noqa: BLE001
            error = error or e
    if error is not None:
        raise error
