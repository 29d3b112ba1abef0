"""kquant-perplexity --cluster: llama-perplexity's default mode on a Dask cluster (kquant.cluster).

A task is one of llama-perplexity's batches (n_seq chunks): the worker runs them through its
own copy of the model and returns each chunk's scored NLLs; the driver adds them up in chunk
order and prints the running perplexity as llama-perplexity does, so every figure is the
single-process run's.
"""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from ..cluster import Cluster, ModelSpec, worker_model, worker_task
from ..runtime.chunks import run_chunks
from .common import check_vocab
from .perplexity import Layout, chunk_nlls


def perplexity_task(index: int, spec: ModelSpec, n_threads: int | None, tokens: np.ndarray, n_chunk: int,
                    lay: Layout, n_vocab: int) -> tuple[list[np.ndarray], float]:
    """On a worker: the NLLs of the chunks of `tokens` (the task's alone), and the seconds taken."""
    with worker_task(index, n_threads):
        model = worker_model(spec)
        check_vocab(model, n_vocab)
        t0 = time.perf_counter()
        nlls: list[np.ndarray] = []
        for i, logits, _ in run_chunks(model, tokens, n_chunk, lay.n_ctx, lay.n_seq, lay.n_batch, lay.n_par,
                                       lay.first, lay.n_ctx, lay.bos):
            nlls.extend(chunk_nlls(model, tokens, i, logits, lay))
        return nlls, time.perf_counter() - t0


def perplexity_on_cluster(cluster: Cluster, spec: ModelSpec, tokens: np.ndarray, n_chunk: int, lay: Layout,
                          n_vocab: int) -> Iterator[tuple[int, list[np.ndarray], float]]:
    """perplexity()'s batches from the workers, in order: (first chunk, NLLs per chunk, seconds)."""
    starts = range(0, n_chunk, lay.n_seq)
    tasks = [(k, spec, cluster.worker_threads, tokens[c0 * lay.n_ctx:(c0 + min(lay.n_seq, n_chunk - c0)) * lay.n_ctx],
              min(lay.n_seq, n_chunk - c0), lay, n_vocab) for k, c0 in enumerate(starts)]
    results = cluster.ordered(perplexity_task, tasks)
    try:
        for c0, (nlls, seconds) in zip(starts, results):
            yield c0, nlls, seconds
    finally:
        results.close()
