"""kquant-generate -cnv against llama.cpp: a two-turn chat with SmolLM2-135M-Instruct, --exact
and greedy, prints the replies llama.cpp gives to the same turns (llama-cpp-python fed the
tokens llama-completion feeds: the rendered first prompt with BOS, each reply's end-of-turn
token, then only the text the next user message adds to the rendering)."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest

from kquant.cli.generate import main as generate_main

SYSTEM = "You are a helpful assistant."
TURNS = ["What is the capital of France?", "And what is the capital of Italy?"]


def _llama_chat(llama_cpp, path, template, tok, n_predict):
    """llama.cpp's replies, greedy, turn by turn (llama-completion's token stream)."""
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False, flash_attn=True, logits_all=True)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
    feed = llm.tokenize(template.apply(messages, add_generation_prompt=True).encode(), add_bos=True, special=True)
    replies = []
    for turn in range(len(TURNS)):
        llm.eval(feed)
        reply = []
        while len(reply) < n_predict:
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if t in tok.eog_ids:
                llm.eval([t])  # the end-of-turn token stays in the context
                break
            reply.append(t)
            llm.eval([t])
        replies.append(reply)
        text = b"".join(tok.token_to_piece(t) for t in reply).decode()
        messages.append({"role": "assistant", "content": text})
        if turn + 1 < len(TURNS):
            new = {"role": "user", "content": TURNS[turn + 1]}
            delta = template.format_single(messages, new, True)
            messages.append(new)
            feed = llm.tokenize(delta.encode(), add_bos=False, special=True)
    return replies


def test_chat_is_llama_cpps(smollm2_gguf, llama_cpp, capsysbinary, monkeypatch):
    from kquant.models import open_model
    from kquant.tokenizer import Tokenizer
    from kquant.validation.chat import ChatTemplate

    source = open_model(smollm2_gguf, "f32")
    tok = Tokenizer.from_source(source)
    template = ChatTemplate.from_source(source, tok)
    replies = _llama_chat(llama_cpp, smollm2_gguf, template, tok, 48)
    assert all(replies) and len(replies[0]) < 48  # each reply ended with its end-of-turn token
    monkeypatch.setattr(sys, "stdin", io.StringIO(TURNS[1] + "\n"))
    assert generate_main(["-m", str(smollm2_gguf), "-cnv", "-sys", SYSTEM, "-p", TURNS[0], "--temp", "0",
                          "-n", "48", "--exact", "-t", "2", "--device", "cpu", "-c", "512"]) == 0
    out = capsysbinary.readouterr().out
    text = [b"".join(tok.token_to_piece(t) for t in r) for r in replies]
    assert out == b"> " + TURNS[0].encode() + b"\n" + text[0] + b"\n\n> " + text[1] + b"\n\n> \n"


def test_single_turn_answers_and_exits(smollm2_gguf, capsysbinary, monkeypatch):
    """-st with -p: one reply, stdin never read."""
    class NoInput(io.StringIO):
        def readline(self, *a):
            raise AssertionError("stdin read")

    monkeypatch.setattr(sys, "stdin", NoInput())
    assert generate_main(["-m", str(smollm2_gguf), "-cnv", "-st", "-p", "Hi", "--temp", "0", "-n", "8",
                          "--device", "cpu"]) == 0
    out = capsysbinary.readouterr().out
    assert out.startswith(b"> Hi\n") and out.endswith(b"\n") and len(out) > len(b"> Hi\n\n")


@pytest.mark.parametrize("stdin", ["", "\n"], ids=["eof", "empty-line"])
def test_chat_ends_on_end_of_input(smollm2_gguf, capsysbinary, monkeypatch, stdin):
    """Without -p the chat waits for a message; end of input or an empty message ends it."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert generate_main(["-m", str(smollm2_gguf), "-cnv", "--temp", "0", "-n", "8", "--device", "cpu"]) == 0
    cap = capsysbinary.readouterr()
    assert cap.out == b"\n> \n" and b"eval time" in cap.err
