"""kquant-imatrix (and --method gptq's calibration) on a Dask cluster (kquant.cluster).

A task is one of llama-imatrix's batches (n_seq chunks); with Hessians, a fixed run of batches
(`hessian_batches`: the float64 Hessians are large to send, so a task sums several). The run of
batches a task covers depends only on the chunk count, never on the workers. Each worker runs
its batches through its own copy of the model with a fresh collector and returns the partial
sums (float32, as llama-imatrix sums them within a batch), the token counts, the partial
Hessians and the scored tokens' NLLs. The driver adds the partials in chunk order, in float64,
onto what --in-file loaded: the same result for any number of workers and any finishing order,
within float32 rounding of the single-process run (whose sums are float32 throughout), with
equal counts and equal per-chunk perplexities.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..cluster import Cluster, ModelSpec, worker_model, worker_task
from ..errors import ModelError
from ..runtime.chunks import NllTotals, run_chunks
from .hessian import HessianCollector, Hessians
from .imatrix import ChunkLayout, Collector, ImatrixParams, ImatrixResult, _result, chunk_layout, chunk_nlls
from .imatrix_file import Imatrix, ImatrixEntry

# with Hessians, the batches are shared out as at most this many tasks (one set of Hessians each)
HESSIAN_TASKS = 16


@dataclass
class Partial:
    """One task's sums: per matrix the float32 column sums and counts, per chunk the NLLs."""

    n_chunks: int
    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    nll: list[np.ndarray]
    hessians: Hessians | None


def calibration_task(index: int, spec: ModelSpec, n_threads: int | None, params: ImatrixParams,
                     lay: ChunkLayout, bos: int | None, hessians: bool) -> Partial:
    """On a worker: the layout's chunks (its tokens are the task's alone) through the model."""
    with worker_task(index, n_threads):
        model = worker_model(spec)
        quiet = replace(params, output_frequency=0, save_frequency=0)
        collector = (HessianCollector(quiet, Imatrix(), Hessians(), model.xp) if hessians
                     else Collector(quiet, Imatrix(), model.xp))
        nll: list[np.ndarray] = []
        for i, logits, _ in run_chunks(model, lay.tokens, lay.n_chunk, lay.n_ctx, lay.n_seq, lay.n_batch, lay.n_seq,
                                       lay.lo, lay.hi, bos, collector.observe, params.process_output,
                                       collector.flush):
            if params.compute_ppl:
                nll.extend(chunk_nlls(model, lay, i, logits))
        im = collector.snapshot()
        return Partial(lay.n_chunk, _shared_sums(im), {k: e.counts for k, e in im.entries.items()}, nll,
                       collector.hessians if hessians else None)


def _shared_sums(im: Imatrix) -> dict[str, np.ndarray]:
    """The entries' sums, matrices of one input (Q/K/V, gate/up: equal sums) as one array:
    pickling sends an object once, so a result crosses the network with 4 vectors a block, not 7."""
    out: dict[str, np.ndarray] = {}
    prev = None
    for name, e in im.entries.items():
        if prev is not None and prev.shape == e.sums.shape and np.array_equal(prev, e.sums):
            out[name] = prev
        else:
            out[name] = prev = e.sums
    return out


class ClusterCollector(Collector):
    """The driver's collector: adds the workers' partials in chunk order (float64 sums), and
    saves every `output_frequency` chunks as Collector does."""

    def __init__(self, params: ImatrixParams, imatrix: Imatrix, hessians: bool = False):
        super().__init__(params, imatrix)
        self._sums64 = {k: e.sums.astype(np.float64) for k, e in imatrix.entries.items()}
        self.hessians = Hessians() if hessians else None

    def add(self, part: Partial) -> None:
        for name, sums in part.sums.items():
            counts = part.counts[name]
            e = self.im.entries.get(name)
            if e is None:
                self._sums64[name] = np.zeros(sums.size, np.float64)
                e = self.im.entries[name] = ImatrixEntry(sums, np.zeros(counts.size, np.int64))
            if e.sums.size != sums.size:
                raise ModelError(f"inconsistent size for {name} ({e.sums.size} vs {sums.size}): the imatrix "
                                 "loaded with --in-file is not for this model")
            if e.counts.size == 1 and counts.size > 1:  # broadcast, when loading an old imatrix
                e.counts = np.full(counts.size, e.counts[0], np.int64)
            acc = self._sums64[name]
            acc += sums
            e.sums = acc.astype(np.float32)
            e.counts = e.counts + counts
        if self.hessians is not None and part.hessians is not None:
            _add_hessians(self.hessians, part.hessians)
        for e in list(self.im.entries.values()):
            for c in e.counts:
                self._maybe_save(int(c) // self.chunk_size)


def _add_hessians(total: Hessians, part: Hessians) -> None:
    for key, h in part.sums.items():
        if key in total.sums:
            total.sums[key] += h
            total.counts[key] += part.counts[key]
        else:
            total.sums[key] = h
            total.counts[key] = part.counts[key]
    for name, key in part.shared.items():
        if total.shared.setdefault(name, key) != key:
            raise ModelError(f"{name}: its input differs between the workers' batches")


def compute_on_cluster(cluster: Cluster, spec: ModelSpec, tokens: np.ndarray, params: ImatrixParams,
                       collector: ClusterCollector, bos: int | None, progress: bool = True,
                       log: Callable[[str], None] | None = None) -> ImatrixResult:
    """compute_imatrix's work shared out over the cluster's workers; the same result."""
    log = log or (lambda s: print(s, file=sys.stderr))
    lay = chunk_layout(tokens, params)
    log(f"computing over {lay.n_chunk} chunks, n_ctx={lay.n_ctx}, batch_size={lay.n_batch}, n_seq={lay.n_seq} "
        f"on {cluster.n_workers} workers")
    n_batches = math.ceil(lay.n_chunk / lay.n_seq)
    per_task = lay.n_seq * (math.ceil(n_batches / HESSIAN_TASKS) if collector.hessians is not None else 1)
    tasks = []
    for index, c0 in enumerate(range(0, lay.n_chunk, per_task)):
        n = min(per_task, lay.n_chunk - c0)
        part = replace(lay, tokens=lay.tokens[c0 * lay.n_ctx:(c0 + n) * lay.n_ctx], n_chunk=n)
        tasks.append((index, spec, cluster.worker_threads, params, part, bos, collector.hessians is not None))
    totals = NllTotals()
    chunk_ppl: list[float] = []
    start_time = time.perf_counter()
    bar = tqdm(total=lay.n_chunk, desc="imatrix", unit="chunk", disable=not progress, file=sys.stderr)
    try:
        for part in cluster.ordered(calibration_task, tasks):
            collector.add(part)
            chunk_ppl.extend(totals.add(v) for v in part.nll)
            if chunk_ppl:
                bar.set_postfix_str(f"ppl {chunk_ppl[-1]:.4f}")
            bar.update(part.n_chunks)
    finally:
        bar.close()
    return _result(collector, lay, totals, chunk_ppl, time.perf_counter() - start_time, params)
