"""kquant-generate: text generation with kquant's runtime and KV cache (kquant.validation.generate).

    kquant-generate -m MODEL -p PROMPT [-n 64] [--temp 0] [--top-k 40] [--top-p 0.95]
                    [--min-p 0.05] [--seed S] [-c N] [-t N] [--device auto|cpu|cuda] [--exact]

The prompt is tokenized as llama.cpp's llama-simple does (BOS when the model adds one, special
tokens parsed), run through the model once, then one token at a time is chosen and fed back
through the KV cache, its text streamed to stdout, until -n tokens or an end-of-generation token.
--temp 0 is greedy (the first token of highest logit, as llama.cpp's greedy sampler picks);
otherwise llama.cpp's default sampler chain: top-k, top-p, min-p, temperature, then a draw from
the distribution (numpy's generator seeded with --seed: the same seed gives the same text, not
llama.cpp's draw).
--exact computes every step in llama.cpp's CPU float order (x86 AVX2 build); past 256 cells of
context the generated tokens' attention depends on llama.cpp's thread count, and --exact -t N
reproduces llama.cpp run with N threads.
"""
from __future__ import annotations

import argparse
import sys
import time

import math

from ..errors import ModelError
from ..runtime.kernels import COMPILING, forward_compiled
from . import add_runtime_args, run_command, stdout_line_open


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
    ap.add_argument("-s", "--seed", type=int, default=None, help="random seed (default -1: random)")
    ap.add_argument("-c", "--ctx-size", type=int, default=0,
                    help="context size: generation stops when it is full (default 0: the model's "
                         "training context, as llama-cli)")
    ap.add_argument("--no-display-prompt", action="store_true", help="do not print the prompt")
    ap.add_argument("--exact", action="store_true",
                    help="compute in llama.cpp's CPU float order (its x86 AVX2 build), as "
                         "kquant-perplexity --exact (CPU only). Once more than 256 cells of the "
                         "context are in use, llama.cpp's flash attention splits a generated "
                         "token's keys between its threads, so its logits depend on its thread "
                         "count: --exact -t N reproduces llama.cpp run with N threads (-t N, "
                         "n_threads=N), even if N is more than this machine's CPUs; give -t, as "
                         "the default thread count depends on the machine's load")
    add_runtime_args(ap, progress=False)
    return ap


def _check_sampling(ns: argparse.Namespace) -> None:
    for name, value in (("--temp", ns.temp), ("--top-p", ns.top_p), ("--min-p", ns.min_p)):
        if not math.isfinite(value):
            raise ModelError(f"{name} must be a number, not {value}")
    if ns.temp > 0 and not 0 < ns.top_p <= 1:
        raise ModelError(f"--top-p must be in (0, 1], not {ns.top_p}")
    if ns.temp > 0 and not 0 <= ns.min_p <= 1:
        raise ModelError(f"--min-p must be in [0, 1], not {ns.min_p}")
    if ns.ctx_size < 0:
        raise ModelError(f"-c must be 0 (the model's training context) or above, not {ns.ctx_size}")


def _context(ns: argparse.Namespace, source, n_prompt: int) -> tuple[int, int | None]:
    """The cells the generation may use (-c, else the model's training context, as llama-cli),
    never more than the prompt and -n need; and the training context."""
    train = source.get(f"{source.arch}.context_length")
    train = int(train) if isinstance(train, (int, float)) and train > 0 else None
    limit = ns.ctx_size if ns.ctx_size > 0 else train or n_prompt + max(ns.n_predict, 4096)
    if train is not None and limit > train:
        print(f"kquant-generate: warning: the model was trained on only {train} tokens of context "
              f"({limit} asked for)", file=sys.stderr)
    if n_prompt >= limit:
        raise ModelError(f"the prompt is {n_prompt} tokens, the context {limit} (-c): nothing left to generate")
    return (min(limit, n_prompt + max(ns.n_predict, 1)) if ns.n_predict >= 0 else limit), train


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run_command("kquant-generate", lambda: _run(ns), "interrupted")


def _run(ns: argparse.Namespace) -> int:
    from ..models import open_model
    from ..runtime import Transformer, keep_freed_memory, resolve_device, set_threads
    from ..tokenizer import Tokenizer
    from ..validation.generate import Sampler, generate

    _check_sampling(ns)
    try:
        prompt_text = ns.prompt.encode("utf-8")  # argv bytes that were not UTF-8 come as surrogates
    except UnicodeEncodeError:
        raise ModelError("the prompt is not valid UTF-8 text") from None
    device = resolve_device(ns.device)
    if ns.exact and device != "cpu":
        raise ModelError("--exact reproduces llama.cpp's CPU backend: use --device cpu")
    threads = set_threads(ns.threads)
    keep_freed_memory()
    source = open_model(ns.model, "f32")
    tokenizer = Tokenizer.from_source(source)
    prompt = tokenizer.tokenize(ns.prompt, add_special=True, parse_special=True)
    n_ctx, n_ctx_train = _context(ns, source, len(prompt))
    model = Transformer(source, device, progress=False)
    model.exact = ns.exact
    if device == "cpu" and not forward_compiled():
        print(COMPILING, file=sys.stderr)
    # the llama.cpp thread count --exact reproduces: -t as given (set_threads caps the threads
    # kquant runs to the CPUs), else the runtime's
    model.exact_threads = ns.threads if ns.threads is not None and ns.threads > 0 else threads
    seed = ns.seed if ns.seed is not None and ns.seed >= 0 else None  # -1: random, as llama.cpp
    sampler = Sampler(ns.temp, ns.top_k, ns.top_p, ns.min_p, seed)
    out = sys.stdout.buffer
    if not ns.no_display_prompt:
        out.write(prompt_text)
        out.flush()
        stdout_line_open(bool(prompt_text))
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for tok in generate(model, prompt, ns.n_predict, sampler, n_ctx, tokenizer.eog_ids):
        if t_first is None:
            t_first = time.perf_counter()
        out.write(tokenizer.token_to_piece(tok))
        out.flush()
        stdout_line_open(True)
        n += 1
    t1 = time.perf_counter()
    out.write(b"\n")
    out.flush()
    stdout_line_open(False)
    if len(prompt) + n >= n_ctx and (ns.n_predict < 0 or n < ns.n_predict):
        which = "-c" if ns.ctx_size > 0 else f"the model's training context, {n_ctx_train}"
        print(f"kquant-generate: stopped: the context is full ({n_ctx} tokens, {which})", file=sys.stderr)
    t_first = t_first or t1
    gen = f", {n - 1} more in {t1 - t_first:.2f} s ({(n - 1) / max(t1 - t_first, 1e-9):.1f} tokens/s)" if n > 1 else ""
    print(f"kquant-generate: prompt {len(prompt)} tokens, first token after {t_first - t0:.2f} s{gen}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
