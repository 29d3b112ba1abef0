"""Work spread over a Dask cluster: `--cluster ADDRESS` of kquant-imatrix, -quantize, -perplexity.

ADDRESS is a running Dask scheduler (`tcp://host:8786`) or `local:N`, a LocalCluster of N worker
processes on this machine. The work is cut into tasks whose results do not depend on where or
in what order they ran:

- calibration and perplexity: a task is one of llama.cpp's batches of chunks (or, for the
  float64 Hessians, a fixed run of batches), run on a worker that loads the model itself from
  a path every worker can read and keeps it for its next tasks. It returns its partial sums,
  counts and per-token NLLs; the driver adds them up in chunk order, so the result is the same
  for any number of workers and any order of completion.
- quantization: a task is one tensor; the driver writes the bytes in the file's order.

`Cluster.ordered` keeps a bounded window of tasks in flight and yields their results in
submission order: the driver's memory holds at most `window` results. A worker that dies is
replaced (a LocalCluster's nanny restarts it) and the scheduler runs its task again elsewhere;
an interrupt cancels everything in flight.

Design for a real multi-node run (what crosses the network): each worker reads the model from
shared storage (NFS, or a copy on every node at the same path) once; a calibration task sends
n_seq * n_ctx token ids (16 KB for 4 x 512 tokens) and gets back one float32 per input column of
every matrix input (Q/K/V and gate/up share theirs) plus the chunks' NLLs: for a 70B llama, 80
layers x (3 x 8192 + 28672) columns, 17 MB. A quantization task sends the tensor's name, target type and imatrix row (tens of KB) and
gets back the quantized bytes.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from .errors import ModelError

INSTALL_HINT = "pip install 'kquant[dist]' (Dask's dask[distributed])"
CONNECT_TIMEOUT_ENV = "KQUANT_CLUSTER_TIMEOUT"  # seconds to reach the scheduler and find a worker


def _timeout() -> float:
    return float(os.environ.get(CONNECT_TIMEOUT_ENV) or 20)


# Test hook: "INDEX:MARKER" makes the worker running task INDEX exit abruptly, once (the marker
# file records that it happened), to check that a lost worker's task is redone elsewhere.
DIE_ENV = "KQUANT_CLUSTER_DIE"


@dataclass
class Cluster:
    """A connected Dask client and what tasks need to know of the workers."""

    client: Any
    address: str
    n_workers: int
    worker_threads: int | None  # Numba threads per worker task (None: all the worker's cores)

    def ordered(self, fn: Callable, arg_lists: Iterable[tuple], window: int | None = None) -> Iterator[Any]:
        """fn(*args) for each args on the workers, results in submission order, with at most
        `window` tasks submitted and not yet consumed (default: two per worker)."""
        from distributed import KilledWorker

        window = window or 2 * self.n_workers
        pending: deque = deque()
        args_iter = iter(arg_lists)
        index = 0

        def submit_next() -> bool:
            nonlocal index
            args = next(args_iter, None)
            if args is None:
                return False
            key = f"{fn.__name__}-{index}-{os.urandom(4).hex()}"
            pending.append(self.client.submit(fn, *args, pure=False, key=key))
            index += 1
            return True

        try:
            while len(pending) < window and submit_next():
                pass
            while pending:
                future = pending[0]
                try:
                    result = future.result()
                except KilledWorker as e:
                    raise ModelError(f"the cluster's workers kept dying while running {fn.__name__} "
                                     f"({e}); see the workers' logs") from None
                pending.popleft()
                future.release()
                submit_next()
                yield result
        finally:
            for future in pending:
                future.cancel()


def _import_dask():
    try:
        import distributed
    except ImportError:
        raise ModelError(f"--cluster needs Dask: {INSTALL_HINT}") from None
    return distributed


def _dask_config(values: dict):
    import dask

    return dask.config.set(values)


def parse_local(address: str) -> int | None:
    """N of `local:N`, None for a scheduler address."""
    if not address.startswith("local:"):
        return None
    value = address[len("local:"):]
    if not value.isdigit() or int(value) < 1:
        raise ModelError(f"--cluster {address}: local:N needs a number of workers N >= 1")
    return int(value)


@contextmanager
def open_cluster(address: str, n_threads: int | None = None,
                 log: Callable[[str], None] | None = None) -> Iterator[Cluster]:
    """Connect to the scheduler at `address`, or start `local:N`; closed (a local one shut down,
    its scratch folder removed) on leaving, whatever happened."""
    n_local = parse_local(address)
    distributed = _import_dask()
    scratch = cluster = client = None
    settings = ExitStack()
    try:
        if n_local is not None:
            scratch = tempfile.mkdtemp(prefix="kquant-dask-")
            # every process's scratch files (a restarted worker's too) under our folder
            settings.enter_context(_dask_config({"temporary-directory": scratch}))
            cluster = distributed.LocalCluster(
                n_workers=n_local, threads_per_worker=1, processes=True, dashboard_address=None,
                local_directory=scratch, silence_logs=logging.ERROR)
            client = distributed.Client(cluster)
            threads = n_threads or max(1, (os.cpu_count() or 1) // n_local)
        else:
            try:
                client = distributed.Client(address, timeout=_timeout())
            except (OSError, TimeoutError, ValueError) as e:
                raise ModelError(f"cannot reach the Dask scheduler at {address}: {e}") from None
            threads = n_threads
        try:
            client.wait_for_workers(1, timeout=_timeout())
        except (OSError, TimeoutError) as e:
            raise ModelError(f"the Dask scheduler at {address} has no workers ({e})") from None
        n_workers = len(client.scheduler_info()["workers"])
        if log is not None:
            what = f"{n_workers} local worker processes" if n_local else f"{n_workers} workers at {address}"
            log(f"cluster: {what}, {threads or 'all their'} threads each")
        yield Cluster(client, address, n_workers, threads)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        settings.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def maybe_cluster(address: str | None, n_threads: int | None = None,
                  log: Callable[[str], None] | None = None) -> Iterator[Cluster | None]:
    """open_cluster(address), or None without an address."""
    if not address:
        yield None
        return
    with open_cluster(address, n_threads, log) as cluster:
        yield cluster


# --- on the workers -------------------------------------------------------------------------

_LOCK = threading.Lock()  # one task at a time per worker process: Numba's threads are per process
_CACHED: dict[str, Any] = {}


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load the model itself: a path it can read, where to run it."""

    path: str
    device: str
    exact: bool = False


def worker_model(spec: ModelSpec) -> Any:
    """The worker's copy of the model for the forward pass (loaded at its first task, kept)."""
    def load():
        from .models import open_model
        from .runtime import Transformer

        model = Transformer(open_model(spec.path, "f32"), spec.device, False)
        model.exact = spec.exact
        return model

    return worker_cached(("forward", spec), load)


def worker_cached(key: Any, make: Callable[[], Any]) -> Any:
    """What `make` builds, kept for the worker's next tasks with the same key (one at a time:
    a worker holds one model)."""
    if _CACHED.get("key") != key:
        _CACHED.clear()
        _CACHED["value"] = make()
        _CACHED["key"] = key
    return _CACHED["value"]


@contextmanager
def worker_task(index: int, n_threads: int | None) -> Iterator[None]:
    """Runs a task's body alone in its worker process, with the cluster's thread count."""
    from .runtime import keep_freed_memory, set_threads

    with _LOCK:
        _maybe_die(index)
        keep_freed_memory()  # as the commands do: a Dask worker would hand freed pages back at once
        set_threads(n_threads)
        yield


def _maybe_die(index: int) -> None:
    spec = os.environ.get(DIE_ENV)
    if not spec:
        return
    at, marker = spec.split(":", 1)
    if int(at) == index and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
