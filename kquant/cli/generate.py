r"""kquant-generate: text generation with kquant's runtime and KV cache, as llama.cpp's llama-cli /
llama-completion (kquant.validation.generate, .conversation).

    kquant-generate -m MODEL (-p PROMPT | -f FILE) [-n -1] [-c 0] [--temp 0.8] [--top-k 40]
                    [--top-p 0.95] [--min-p 0.05] [--repeat-penalty 1.0] [--repeat-last-n 64]
                    [-s SEED] [-t N] [--device auto|cpu|cuda] [--exact]
    kquant-generate -m MODEL -cnv [-sys SYSTEM] [-p FIRST_MESSAGE] [-st]

Without -cnv the prompt is tokenized as llama.cpp does (BOS when the model adds one, special
tokens parsed, escapes such as \n processed unless --no-escape), run through the model once,
then one token at a time is drawn and fed back through the KV cache, its text streamed to
stdout, until -n tokens, an end-of-generation token or a full context (-c, default the model's
training context), which ends it with a line saying so.
With -cnv (--conversation) the GGUF's chat template renders the messages (llama.cpp's chatml
when the model has none); after each reply a "> " asks for the next user message on stdin
(a line; end it with \ to go on to the next line; an empty input or end of file ends the chat).
Sampling is llama.cpp's default chain in its order (penalties, top-k, top-p, min-p,
temperature, then a draw): the same logits, options and seed draw the same tokens as
llama.cpp; --temp 0 is greedy (the first token of highest logit, as llama.cpp picks).
At the end the timings are printed as llama.cpp prints them (prompt eval and eval rates).
--exact computes every step in llama.cpp's CPU float order (x86 AVX2 build); past 256 cells of
context the generated tokens' attention depends on llama.cpp's thread count, and --exact -t N
reproduces llama.cpp run with N threads.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time

import numpy as np

from ..errors import ModelError
from ..runtime.kernels import COMPILING, forward_compiled
from . import add_runtime_args, run_command, stdout_line_open


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kquant-generate", description=(
        "Generate text from a prompt, or chat (-cnv), with kquant's runtime, streaming it to stdout; "
        "llama-cli's options and defaults."))
    ap.add_argument("-m", "--model", required=True, help="GGUF file or Hugging Face model folder")
    ap.add_argument("-p", "--prompt", default=None,
                    help="the prompt (with -cnv: the first user message; for a system message use -sys)")
    ap.add_argument("-f", "--file", default=None,
                    help="a file holding the prompt (UTF-8; one final newline is dropped, as llama.cpp)")
    ap.add_argument("-e", "--escape", action=argparse.BooleanOptionalAction, default=True,
                    help="process escapes (\\n, \\r, \\t, \\', \\\", \\\\, \\xHH) in the prompt and chat input "
                         "(default: on, as llama.cpp)")
    ap.add_argument("-cnv", "--conversation", action="store_true",
                    help="chat: apply the model's chat template (tokenizer.chat_template; chatml when it has "
                         "none) and read the user's messages from stdin after each reply. Unlike "
                         "llama-completion, not on by default")
    ap.add_argument("-no-cnv", "--no-conversation", dest="conversation", action="store_false",
                    help="plain completion of the prompt (the default)")
    ap.add_argument("-sys", "--system-prompt", default="", help="system message for -cnv")
    ap.add_argument("-sysf", "--system-prompt-file", default=None, help="a file holding the system message")
    ap.add_argument("--chat-template-file", metavar="FILE", default=None,
                    help="a Jinja chat template for -cnv instead of the model's")
    ap.add_argument("-st", "--single-turn", action="store_true",
                    help="-cnv for one turn only: answer -p (or the first message read) and exit")
    ap.add_argument("-n", "--n-predict", "--predict", type=int, default=-1,
                    help="tokens to generate per reply (default -1: until an end-of-generation token or "
                         "the context is full)")
    ap.add_argument("-c", "--ctx-size", type=int, default=0,
                    help="context size: generation stops when it is full (default 0: the model's "
                         "training context, as llama-cli)")
    ap.add_argument("--temp", "--temperature", type=float, default=0.8,
                    help="temperature (default 0.8; 0: greedy)")
    ap.add_argument("--top-k", type=int, default=40, help="top-k sampling (default 40, 0: off)")
    ap.add_argument("--top-p", type=float, default=0.95, help="top-p sampling (default 0.95, 1.0: off)")
    ap.add_argument("--min-p", type=float, default=0.05, help="min-p sampling (default 0.05, 0.0: off)")
    ap.add_argument("--repeat-penalty", type=float, default=1.0,
                    help="penalize repeated tokens (default 1.0: off)")
    ap.add_argument("--repeat-last-n", type=int, default=64,
                    help="last n tokens the penalties look at (default 64, 0: off)")
    ap.add_argument("--presence-penalty", type=float, default=0.0, help="presence penalty (default 0.0: off)")
    ap.add_argument("--frequency-penalty", type=float, default=0.0, help="frequency penalty (default 0.0: off)")
    ap.add_argument("-s", "--seed", type=int, default=-1,
                    help="random seed (default -1: a random one, printed so the run can be repeated)")
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
    for name, value in (("--temp", ns.temp), ("--top-p", ns.top_p), ("--min-p", ns.min_p),
                        ("--presence-penalty", ns.presence_penalty), ("--frequency-penalty", ns.frequency_penalty)):
        if not math.isfinite(value):
            raise ModelError(f"{name} must be a number, not {value}")
    if ns.temp > 0 and not 0 < ns.top_p <= 1:
        raise ModelError(f"--top-p must be in (0, 1], not {ns.top_p}")
    if ns.temp > 0 and not 0 <= ns.min_p <= 1:
        raise ModelError(f"--min-p must be in [0, 1], not {ns.min_p}")
    if not (math.isfinite(ns.repeat_penalty) and ns.repeat_penalty > 0):
        raise ModelError(f"--repeat-penalty must be a number above 0, not {ns.repeat_penalty}")
    if ns.repeat_last_n < 0:
        raise ModelError(f"--repeat-last-n must be 0 (off) or above, not {ns.repeat_last_n}")
    if ns.ctx_size < 0:
        raise ModelError(f"-c must be 0 (the model's training context) or above, not {ns.ctx_size}")
    if not -1 <= ns.seed <= 0xFFFFFFFF:
        raise ModelError(f"--seed must be -1 (random) or in 0..4294967295, not {ns.seed}")


_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)", re.S)
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"'": b"'", b'"': b'"', b"\\": b"\\"}


def process_escapes(text: str, what: str) -> str:
    """llama.cpp's string_process_escapes: \\n \\r \\t \\' \\" \\\\ and \\xHH become their characters,
    any other backslash stays."""
    def one(m: re.Match) -> bytes:
        e = m.group(1)
        if len(e) == 3:
            return bytes([int(e[1:], 16)])
        return _ESCAPES.get(e, m.group(0))
    try:
        return _ESCAPE.sub(one, _utf8(text, what)).decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{what} is not valid UTF-8 text after its \\x escapes") from None


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")  # argv bytes that were not UTF-8 come as surrogates
    except UnicodeEncodeError:
        raise ModelError(f"{what} is not valid UTF-8 text") from None


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ModelError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{what} {path} is not UTF-8 text") from None
    return text[:-1] if text.endswith("\n") else text


def _prompt(ns: argparse.Namespace) -> str:
    if ns.prompt is not None and ns.file is not None:
        raise ModelError("give the prompt with -p or -f, not both")
    text = _read_text(ns.file, "the prompt file") if ns.file is not None else ns.prompt
    if text is None:
        if not ns.conversation:
            raise ModelError("no prompt: give -p PROMPT or -f FILE (or -cnv to chat)")
        return ""
    _utf8(text, "the prompt")
    return process_escapes(text, "the prompt") if ns.escape else text


def _context(ns: argparse.Namespace, source, n_prompt: int) -> tuple[int, int | None]:
    """The cells the generation may use (-c, else the model's training context, as llama-cli),
    never more than the prompt and -n need (a chat may use them all); and the training context."""
    train = source.get(f"{source.arch}.context_length")
    train = int(train) if isinstance(train, (int, float)) and train > 0 else None
    limit = ns.ctx_size if ns.ctx_size > 0 else train or n_prompt + max(ns.n_predict, 4096)
    if train is not None and limit > train:
        print(f"kquant-generate: warning: the model was trained on only {train} tokens of context "
              f"({limit} asked for)", file=sys.stderr)
    if n_prompt >= limit:
        raise ModelError(f"the prompt is {n_prompt} tokens, the context {limit} (-c): nothing left to generate")
    if ns.conversation or ns.n_predict < 0:
        return limit, train
    return min(limit, n_prompt + max(ns.n_predict, 1)), train


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run_command("kquant-generate", lambda: _run(ns), "interrupted")


class _Out:
    """stdout as bytes, flushed after each write (the text streams), remembering whether a
    line is open (so an error line starts on its own)."""

    def __init__(self):
        self.buf = sys.stdout.buffer

    def write(self, data: bytes) -> None:
        if data:
            self.buf.write(data)
            self.buf.flush()
            stdout_line_open(not data.endswith(b"\n"))


def _run(ns: argparse.Namespace) -> int:
    from ..models import open_model
    from ..runtime import Transformer, keep_freed_memory, resolve_device, set_threads
    from ..tokenizer import Tokenizer
    from ..validation.generate import Decoder, Sampler

    _check_sampling(ns)
    prompt_text = _prompt(ns)
    system = _read_text(ns.system_prompt_file, "the system prompt file") if ns.system_prompt_file else ns.system_prompt
    device = resolve_device(ns.device)
    if ns.exact and device != "cpu":
        raise ModelError("--exact reproduces llama.cpp's CPU backend: use --device cpu")
    threads = set_threads(ns.threads)
    keep_freed_memory()
    t_load = time.perf_counter()
    source = open_model(ns.model, "f32")
    tokenizer = Tokenizer.from_source(source)
    template = None
    if ns.conversation:
        from ..validation.chat import ChatTemplate
        template = ChatTemplate.from_source(source, tokenizer)
        if ns.chat_template_file:
            template = ChatTemplate(_read_text(ns.chat_template_file, "the chat template file"), template.bos_token,
                                    template.eos_token, template.add_bos, template.add_eos)
        prompt = []
    else:
        prompt = tokenizer.tokenize(prompt_text, add_special=True, parse_special=True)
    n_ctx, n_ctx_train = _context(ns, source, len(prompt))
    model = Transformer(source, device, progress=False)
    model.exact = ns.exact
    if device == "cpu" and not forward_compiled():
        print(COMPILING, file=sys.stderr)
    # the llama.cpp thread count --exact reproduces: -t as given (set_threads caps the threads
    # kquant runs to the CPUs), else the runtime's
    model.exact_threads = ns.threads if ns.threads is not None and ns.threads > 0 else threads
    sampler = Sampler(ns.temp, ns.top_k, ns.top_p, ns.min_p, ns.seed, ns.repeat_penalty, ns.repeat_last_n,
                      ns.frequency_penalty, ns.presence_penalty)
    if ns.temp > 0:
        print(f"kquant-generate: sampler seed: {sampler.seed}", file=sys.stderr)
    _warm_up(model, tokenizer)
    dec = Decoder(model, sampler, n_ctx)
    t_load = time.perf_counter() - t_load
    out = _Out()
    t0 = time.perf_counter()
    if template is not None:
        full = _chat(ns, dec, template, tokenizer, prompt_text, system, out)
    else:
        full = _complete(ns, dec, tokenizer, prompt, prompt_text, out)
    _print_timings(dec, t_load, time.perf_counter() - t0)
    if full:
        which = "-c" if ns.ctx_size > 0 else f"the model's training context, {n_ctx_train}"
        print(f"kquant-generate: stopped: the context is full ({n_ctx} tokens, {which})", file=sys.stderr)
    return 0


def _warm_up(model, tokenizer) -> None:
    """A throwaway pass of two tokens and one more, as llama.cpp warms up before it times: the
    kernels load (or compile) now, counted in the load time, not the prompt's."""
    from ..runtime import Segment
    cache = model.new_cache(4)
    tok = tokenizer.bos_id if tokenizer.bos_id is not None else 0
    model.forward([Segment(np.array([tok, tok], np.int64), cache)], logit_rows=[1])
    model.forward([Segment(np.array([tok], np.int64), cache)], logit_rows=[0])


def _complete(ns, dec, tokenizer, prompt, prompt_text: str, out: _Out) -> bool:
    """Plain completion; True when it stopped because the context was full."""
    from ..validation.generate import continue_
    if not ns.no_display_prompt:
        out.write(prompt_text.encode("utf-8"))
    if len(prompt) == 0:
        raise ModelError("the prompt is empty (and the model adds no BOS)")
    dec.feed(prompt)
    for tok in continue_(dec, ns.n_predict, tokenizer.eog_ids):
        out.write(tokenizer.token_to_piece(tok))
    out.write(b"\n")
    return dec.full


def _chat(ns, dec, template, tokenizer, prompt_text: str, system: str, out: _Out) -> bool:
    """The -cnv loop; True when it stopped because the context was full."""
    from ..validation.conversation import ContextFull, Conversation
    conv = Conversation(dec, template, tokenizer)
    try:
        conv.begin(system=system, prompt=prompt_text)
        if prompt_text:
            out.write(b"> " + prompt_text.encode("utf-8") + b"\n")
            if _reply(ns, conv, out):
                return True
        if ns.single_turn and prompt_text:
            return False
        while True:
            text = _read_message(ns, out)
            if text is None:
                return False
            conv.say(text)
            if _reply(ns, conv, out) or ns.single_turn:
                return dec.full
    except ContextFull as e:
        print(f"kquant-generate: {e}", file=sys.stderr)
        return True


def _reply(ns, conv, out: _Out) -> bool:
    for tok in conv.reply(ns.n_predict):
        out.write(conv.tok.token_to_piece(tok))
    out.write(b"\n")
    return conv.dec.full


def _read_message(ns, out: _Out) -> str | None:
    """One user message from stdin after "> " (a line ending in \\ goes on to the next); None
    at end of input or on an empty message."""
    out.write(b"\n> ")
    lines = []
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        line = line[:-1] if line.endswith("\n") else line
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        break
    text = "\n".join(lines)
    if not text:
        out.write(b"\n")
        return None
    return process_escapes(text, "the message") if ns.escape else text


def _print_timings(dec, t_load: float, t_total: float) -> None:
    """llama.cpp's llama_perf_context_print lines."""
    def rate(t, n):
        return f"({1e3 * t / max(n, 1):8.2f} ms per token, {n / t if t > 0 else 0.0:8.2f} tokens per second)"
    err = sys.stderr
    print(f"kquant-generate:        load time = {1e3 * t_load:10.2f} ms", file=err)
    print(f"kquant-generate: prompt eval time = {1e3 * dec.t_prompt:10.2f} ms / {dec.n_prompt:5d} tokens "
          f"{rate(dec.t_prompt, dec.n_prompt)}", file=err)
    print(f"kquant-generate:        eval time = {1e3 * dec.t_eval:10.2f} ms / {dec.n_eval:5d} runs   "
          f"{rate(dec.t_eval, dec.n_eval)}", file=err)
    print(f"kquant-generate:       total time = {1e3 * t_total:10.2f} ms / {dec.n_prompt + dec.n_eval:5d} tokens",
          file=err)


if __name__ == "__main__":
    sys.exit(main())
