"""kquant-generate: text generation with kquant's runtime and KV cache.

    kquant-generate -m MODEL -p PROMPT [-n 64] [--temp 0] [--top-k 40] [--top-p 0.95]
                    [--min-p 0.05] [--seed S] [-c N] [-t N] [--device auto|cpu|cuda]

The prompt is tokenized as llama.cpp's llama-simple does (BOS when the model adds one, special
tokens parsed), run through the model once, then one token at a time is chosen and fed back
through the KV cache, its text streamed to stdout, until -n tokens or an end-of-generation token.
--temp 0 is greedy (the first token of highest logit, as llama.cpp's greedy sampler picks);
otherwise llama.cpp's default sampler chain: top-k, top-p, min-p, temperature, then a draw from
the distribution (numpy's generator seeded with --seed: the same seed gives the same text, not
llama.cpp's draw).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..errors import ModelError
from . import run_command

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


def generate(model: Any, prompt: np.ndarray, n_predict: int, sampler: Sampler, n_ctx: int | None = None,
             stop: frozenset[int] = frozenset(), n_ubatch: int = 512) -> Iterator[int]:
    """The tokens that follow `prompt` (ids, BOS included if wanted), one at a time: the prompt
    runs in physical batches of n_ubatch tokens, then each chosen token through the KV cache.
    Stops after n_predict tokens (< 0: until the context is full) or at a token of `stop`,
    which is not yielded."""
    from ..runtime import Segment
    from ..runtime.device import to_host

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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kquant-generate", description=(
        "Generate text from a prompt with kquant's runtime (greedy or sampled), streaming it to stdout."))
    ap.add_argument("-m", "--model", required=True, help="GGUF file or Hugging Face model folder")
    ap.add_argument("-p", "--prompt", required=True, help="the prompt")
    ap.add_argument("-n", "--n-predict", type=int, default=64,
                    help="tokens to generate (default 64, -1: until the context is full)")
    ap.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: greedy)")
    ap.add_argument("--top-k", type=int, default=40, help="top-k sampling (default 40, 0: off)")
    ap.add_argument("--top-p", type=float, default=0.95, help="top-p sampling (default 0.95, 1.0: off)")
    ap.add_argument("--min-p", type=float, default=0.05, help="min-p sampling (default 0.05, 0.0: off)")
    ap.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: random)")
    ap.add_argument("-c", "--ctx-size", type=int, default=0,
                    help="context size (default: prompt + n-predict, or 4096 with -n -1)")
    ap.add_argument("--no-display-prompt", action="store_true", help="do not print the prompt")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where the forward pass runs (default: cuda when a GPU is present)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run_command("kquant-generate", lambda: _run(ns), "interrupted")


def _run(ns: argparse.Namespace) -> int:
    from ..models import open_model
    from ..runtime import Transformer, resolve_device, set_threads
    from ..tokenizer import Tokenizer

    if ns.temp > 0 and not 0 < ns.top_p <= 1:
        raise ModelError("--top-p must be in (0, 1]")
    device = resolve_device(ns.device)
    set_threads(ns.threads)
    source = open_model(ns.model, "f32")
    tokenizer = Tokenizer.from_source(source)
    prompt = tokenizer.tokenize(ns.prompt, add_special=True, parse_special=True)
    model = Transformer(source, device, progress=False)
    n_ctx = ns.ctx_size if ns.ctx_size > 0 else None
    sampler = Sampler(ns.temp, ns.top_k, ns.top_p, ns.min_p, ns.seed)
    out = sys.stdout.buffer
    if not ns.no_display_prompt:
        out.write(ns.prompt.encode("utf-8", "surrogateescape"))
        out.flush()
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for tok in generate(model, prompt, ns.n_predict, sampler, n_ctx, tokenizer.eog_ids):
        if t_first is None:
            t_first = time.perf_counter()
        out.write(tokenizer.token_to_piece(tok))
        out.flush()
        n += 1
    t1 = time.perf_counter()
    out.write(b"\n")
    out.flush()
    t_first = t_first or t1
    gen = f", {n - 1} more in {t1 - t_first:.2f} s ({(n - 1) / max(t1 - t_first, 1e-9):.1f} tokens/s)" if n > 1 else ""
    print(f"kquant-generate: prompt {len(prompt)} tokens, first token after {t_first - t0:.2f} s{gen}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
