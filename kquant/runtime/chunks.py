"""Text through the model the way llama.cpp's tools run it: the one loop under llama-imatrix's
and llama-perplexity's ports (kquant.calibration.imatrix, kquant.validation).

The tokens are cut into chunks of n_ctx; n_batch / n_ctx chunks run side by side as sequences of
one batch, each batch of n_batch positions split into llama.cpp's physical batches (ubatches),
and the logits of the positions that are scored come back per sequence. `NllTotals` is the
running perplexity both tools print, with llama.cpp's `+/-` formula.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator

import numpy as np

from .device import to_host
from .forward import Segment, Transformer

N_UBATCH = 512  # llama.cpp's default physical batch

Observe = Callable[[str, Any], None]


def chunk_sequences(tokens: np.ndarray, start: int, n_seq: int, n_ctx: int,
                    bos: int | None) -> list[np.ndarray]:
    """The next n_seq chunks from `start`, each with its first token replaced by BOS when the
    model adds one (as llama-perplexity and llama-imatrix do)."""
    seqs = []
    for seq in range(n_seq):
        toks = tokens[start + seq * n_ctx:start + (seq + 1) * n_ctx].copy()
        if bos is not None:
            toks[0] = bos
        seqs.append(toks)
    return seqs


def ubatches(segments: list[tuple[int, np.ndarray]], n_ubatch: int,
             n_stream: int) -> list[list[tuple[int, np.ndarray]]]:
    """Split a batch of (sequence, tokens), all of one length, into llama.cpp's physical
    batches. One sequence per context (n_stream 1): consecutive pieces of n_ubatch tokens
    (split_simple). Several: every sequence advances by the same max(1, n_ubatch // n_seqs)
    tokens per ubatch (split_equal), so a short last ubatch may fall under the 16 rows the
    imatrix collects from, exactly as in llama-imatrix."""
    length = len(segments[0][1])
    step = n_ubatch if n_stream == 1 else max(1, n_ubatch // len(segments))
    return [[(seq, toks[a:a + step]) for seq, toks in segments] for a in range(0, length, step)]


def run_sequences(model: Transformer, caches: list, seqs: list[np.ndarray], n_batch: int, n_ubatch: int,
                  n_stream: int, lo: int, hi: int, observe: Observe | None = None,
                  observe_output: bool = False,
                  after_forward: Callable[[], None] | None = None) -> list[np.ndarray]:
    """Run sequences of equal length from position 0 as llama.cpp's batches of n_batch positions
    (every sequence in each), each split into physical batches; returns per sequence the logits
    of positions lo .. hi - 1 (float32, on the host). `observe` sees every weight's input
    (the imatrix callback), `after_forward` runs after each physical batch."""
    for c in caches[:len(seqs)]:
        c.clear()
    out: list[list[np.ndarray]] = [[] for _ in seqs]
    length = len(seqs[0])
    for b0 in range(0, length, n_batch):
        segs = [(s, toks[b0:b0 + n_batch]) for s, toks in enumerate(seqs)]
        for ub in ubatches(segs, n_ubatch, n_stream):
            rows: list[int] = []
            counts = []
            r = 0
            for s, toks in ub:
                p0 = caches[s].n
                a, b = max(lo, p0), min(hi, p0 + len(toks))
                if b > a:
                    rows.extend(range(r + a - p0, r + b - p0))
                counts.append(max(0, b - a))
                r += len(toks)
            logits = model.forward([Segment(toks, caches[s]) for s, toks in ub], observe,
                                   logit_rows=rows, observe_output=observe_output)
            if after_forward is not None:
                after_forward()
            if rows:
                logits = to_host(logits)
                r = 0
                for (s, _), n in zip(ub, counts):
                    if n:
                        out[s].append(logits[r:r + n])
                    r += n
    return [np.ascontiguousarray(np.concatenate(o), dtype=np.float32) if o else np.empty((0, 0), np.float32)
            for o in out]


class NllTotals:
    """Running sums of the scored tokens' negative log-likelihoods, as llama.cpp keeps them."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.nll2 = 0.0
        self.count = 0

    def add(self, v: np.ndarray) -> float:
        """Add one chunk's values; returns the perplexity so far (what `[i]x.xxxx,` prints)."""
        self.nll += float(v.sum())
        self.nll2 += float((v * v).sum())
        self.count += len(v)
        return math.exp(self.nll / self.count)

    def estimate(self) -> tuple[float, float | None]:
        """`Final estimate: PPL = exp(mean) +/- ppl * sqrt(var / (count - 1))`; no uncertainty
        where llama.cpp's variance is not positive."""
        mean, mean2 = self.nll / self.count, self.nll2 / self.count
        ppl = math.exp(mean)
        var = mean2 - mean * mean
        return ppl, (math.sqrt(var / (self.count - 1)) * ppl if var > 0 and self.count > 1 else None)


def run_chunks(model: Transformer, tokens: np.ndarray, n_chunk: int, n_ctx: int, n_seq: int, n_batch: int,
               n_stream: int, lo: int, hi: int, bos: int | None, observe: Observe | None = None,
               observe_output: bool = False, after_forward: Callable[[], None] | None = None,
               ) -> Iterator[tuple[int, list[np.ndarray], float]]:
    """The first n_chunk chunks of `tokens`, n_seq at a time: yields (index of the batch's first
    chunk, per chunk the logits of positions lo .. hi - 1, seconds the batch took)."""
    caches = [model.new_cache(n_ctx) for _ in range(min(n_seq, n_chunk))]
    n_ubatch = min(N_UBATCH, n_batch)
    for i in range(0, n_chunk, n_seq):
        t0 = time.perf_counter()
        seqs = chunk_sequences(tokens, i * n_ctx, min(n_seq, n_chunk - i), n_ctx, bos)
        logits = run_sequences(model, caches, seqs, n_batch, n_ubatch, n_stream, lo, hi, observe,
                               observe_output, after_forward)
        yield i, logits, time.perf_counter() - t0
