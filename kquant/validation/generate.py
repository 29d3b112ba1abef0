"""Generation: llama.cpp's sampler chain and the token-by-token loop over the KV cache.

--temp 0 is greedy (the first token of highest logit, as llama.cpp's greedy sampler picks);
otherwise llama.cpp's default sampler chain: top-k, top-p, min-p, temperature, then a draw from
the distribution (numpy's generator seeded with `seed`: the same seed gives the same text, not
llama.cpp's draw). `kquant-generate` is the command over it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import ModelError
from ..runtime import Segment, Transformer
from ..runtime.device import to_host

F32 = np.float32


@dataclass
class Sampler:
    """llama.cpp's common sampler chain, the parts these options reach (penalties, DRY, typical-p
    and XTC are off by default there too)."""

    temp: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, F32)
        if self.temp <= 0:
            return int(np.argmax(logits))  # the first of equal maxima, as llama.cpp's greedy sampler
        ids = np.arange(logits.size)
        vals = logits
        if 0 < self.top_k < vals.size:  # top-k: the k highest logits
            keep = np.argpartition(-vals, self.top_k - 1)[:self.top_k]
            ids, vals = ids[keep], vals[keep]
        order = np.argsort(-vals, kind="stable")
        ids, vals = ids[order], vals[order]
        if self.top_p < 1.0:  # top-p: the smallest prefix whose probability reaches p
            p = np.exp((vals - vals[0]).astype(np.float64))
            p /= p.sum()
            cum = np.cumsum(p.astype(F32), dtype=F32)
            n = int(np.searchsorted(cum >= F32(self.top_p), True)) + 1
            ids, vals = ids[:n], vals[:n]
        if self.min_p > 0:  # min-p: tokens at least min_p times as probable as the best
            keep = vals >= vals[0] + F32(np.log(F32(self.min_p)))
            ids, vals = ids[keep], vals[keep]
        vals = vals / F32(self.temp)
        p = np.exp((vals - vals.max()).astype(np.float64))
        return int(ids[self.rng.choice(ids.size, p=p / p.sum())])


def generate(model: Transformer, prompt: np.ndarray, n_predict: int, sampler: Sampler, n_ctx: int | None = None,
             stop: frozenset[int] = frozenset(), n_ubatch: int = 512) -> Iterator[int]:
    """The tokens that follow `prompt` (ids, BOS included if wanted), one at a time: the prompt
    runs in physical batches of n_ubatch tokens, then each chosen token through the KV cache.
    Stops after n_predict tokens (< 0: until the context is full) or at a token of `stop`,
    which is not yielded.

    With `model.exact`, each step is llama.cpp's CPU computation to the bit; a step of one
    token over more than 256 cells takes ggml's split-KV flash attention, which depends on the
    thread count: `model.exact_threads` (kquant-generate sets it from -t), else the runtime's
    (Transformer.emulated_threads)."""
    prompt = np.asarray(prompt, np.int64)
    if prompt.size == 0:
        raise ModelError("the prompt is empty (and the model adds no BOS)")
    if n_ctx is None:
        n_ctx = prompt.size + (n_predict if n_predict >= 0 else 4096)
    if prompt.size >= n_ctx:
        raise ModelError(f"the prompt is {prompt.size} tokens, the context {n_ctx}: nothing left to generate")
    cache = model.new_cache(n_ctx)
    logits = None
    for a in range(0, prompt.size, n_ubatch):
        part = prompt[a:a + n_ubatch]
        last = [len(part) - 1] if a + n_ubatch >= prompt.size else []
        logits = model.forward([Segment(part, cache)], logit_rows=last)
    n = 0
    while n_predict < 0 or n < n_predict:
        tok = sampler(to_host(logits)[0])
        if tok in stop:
            return
        yield tok
        n += 1
        if cache.n >= n_ctx or (0 <= n_predict <= n):
            return
        logits = model.forward([Segment(np.array([tok], np.int64), cache)], logit_rows=[0])
