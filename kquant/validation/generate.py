"""Generation: a model, its KV cache and llama.cpp's sampler, fed tokens and drawing tokens one at
a time. `kquant-generate` is the command over it (one prompt, or a chat).

The sampler is llama.cpp's default chain (kquant.validation.sampling): --temp 0 picks the first
token of highest logit, as llama.cpp's does; otherwise the same seed, options and logits draw
the same tokens as llama.cpp. Every token the context takes in (the prompt's too) goes to the
sampler's repeat-penalty history, as llama-completion does.
"""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from ..errors import ModelError
from ..runtime import Segment, Transformer
from ..runtime.device import to_host
from .sampling import Sampler

__all__ = ["Decoder", "Sampler", "generate"]


class Decoder:
    """One sequence's state: `feed` puts tokens into the KV cache (in physical batches of
    n_ubatch, as llama.cpp's prompt processing) and keeps the last one's logits; `draw` samples
    the next token from them. Times what it does as llama.cpp's perf counters: prompt eval
    (batches of more than one token) and eval (one token at a time)."""

    def __init__(self, model: Transformer, sampler: Sampler, n_ctx: int, n_ubatch: int = 512):
        self.model, self.sampler, self.n_ctx, self.n_ubatch = model, sampler, n_ctx, n_ubatch
        self.cache = model.new_cache(n_ctx)
        self.logits = None
        self.pending: int | None = None  # drawn, not yet in the cache (the last reply's last token)
        self.full = False  # generation stopped because the context was full
        self.t_prompt = self.t_eval = 0.0
        self.n_prompt = self.n_eval = 0

    @property
    def n_past(self) -> int:
        return self.cache.n

    def room(self) -> int:
        return self.n_ctx - self.cache.n

    def feed(self, tokens) -> None:
        tokens = np.asarray(tokens, np.int64).ravel()
        if tokens.size > self.room():
            raise ModelError(f"{tokens.size} tokens do not fit in the context ({self.room()} of {self.n_ctx} left)")
        t0 = time.perf_counter()
        for a in range(0, tokens.size, self.n_ubatch):
            part = tokens[a:a + self.n_ubatch]
            last = [len(part) - 1] if a + self.n_ubatch >= tokens.size else []
            self.logits = self.model.forward([Segment(part, self.cache)], logit_rows=last)
        for t in tokens.tolist():
            self.sampler.accept(t)
        dt = time.perf_counter() - t0
        if tokens.size > 1:
            self.t_prompt, self.n_prompt = self.t_prompt + dt, self.n_prompt + int(tokens.size)
        elif tokens.size == 1:
            self.t_eval, self.n_eval = self.t_eval + dt, self.n_eval + 1

    def feed_pending(self) -> None:
        """Put the last drawn token into the cache, as llama.cpp decodes a sampled token (an
        end-of-generation one too) before the next input."""
        if self.pending is not None:
            tok, self.pending = self.pending, None
            self.feed([tok])

    def draw(self) -> int:
        if self.logits is None:
            raise ModelError("nothing to continue from: the context is empty")
        return self.sampler(to_host(self.logits)[0])


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
    dec = start(model, prompt, n_predict, sampler, n_ctx, n_ubatch)
    yield from continue_(dec, n_predict, stop)


def start(model: Transformer, prompt, n_predict: int, sampler: Sampler, n_ctx: int | None = None,
          n_ubatch: int = 512) -> Decoder:
    """A Decoder with `prompt` fed."""
    prompt = np.asarray(prompt, np.int64)
    if prompt.size == 0:
        raise ModelError("the prompt is empty (and the model adds no BOS)")
    if n_ctx is None:
        n_ctx = prompt.size + (n_predict if n_predict >= 0 else 4096)
    if prompt.size >= n_ctx:
        raise ModelError(f"the prompt is {prompt.size} tokens, the context {n_ctx}: nothing left to generate")
    dec = Decoder(model, sampler, n_ctx, n_ubatch)
    dec.feed(prompt)
    return dec


def continue_(dec: Decoder, n_predict: int, stop: frozenset[int] = frozenset()) -> Iterator[int]:
    """Draw and feed back up to n_predict tokens (< 0: until the context is full); a token of
    `stop` ends it, not yielded. The last token drawn is left in `dec.pending`; `dec.full`
    says the context filled up."""
    n = 0
    while n_predict < 0 or n < n_predict:
        tok = dec.pending = dec.draw()
        if tok in stop:
            return
        yield tok
        n += 1
        if dec.room() <= 0:
            dec.full = True
            return
        if 0 <= n_predict <= n:
            return
        dec.feed_pending()
