"""A chat with the model, turn by turn, as llama-completion's conversation mode (-cnv) runs it.

The messages are rendered with the GGUF's chat template (kquant.validation.chat); each turn
feeds only the text its message adds to the rendering (llama.cpp's common_chat_format_single),
after the reply's end-of-generation token, which the KV cache keeps as llama.cpp's does. The
sampler starts again from its seed at each user turn (llama.cpp's common_sampler_reset).

    conv = Conversation(decoder, template, tokenizer)
    conv.begin(system="You are terse.", prompt="Hi")   # the first prompt, fed at once
    for tok in conv.reply(n_predict=-1): ...            # the assistant's tokens, streamed
    conv.say("And then?"); conv.reply(...)               # the next turns
"""
from __future__ import annotations

from typing import Iterator

from ..errors import ModelError
from .generate import Decoder, continue_


class ContextFull(ModelError):
    """A turn does not fit in what is left of the context."""


class Conversation:
    def __init__(self, decoder: Decoder, template, tokenizer):
        self.dec, self.template, self.tok = decoder, template, tokenizer
        self.messages: list[dict] = []
        self._reply: list[bytes] = []

    def begin(self, system: str = "", prompt: str = "") -> None:
        """The first input: the system prompt and first user message if given (llama.cpp
        renders them together, with the assistant's header when there is a user message), with
        the model's BOS; with neither, the BOS alone (if the model adds one)."""
        if system:
            self.messages.append({"role": "system", "content": system})
        if prompt:
            self.messages.append({"role": "user", "content": prompt})
        text = self.template.apply(self.messages, add_generation_prompt=bool(prompt)) if self.messages else ""
        ids = self.tok.tokenize(text, add_special=True, parse_special=True)
        self._feed(ids)

    def say(self, text: str) -> None:
        """A user turn: what its message adds to the rendered chat, after the last reply's
        final token (an end-of-turn token when -n cut the reply short, as llama-completion
        inserts one after an interrupted reply)."""
        delta = self.template.format_single(self.messages, {"role": "user", "content": text}, True)
        self.messages.append({"role": "user", "content": text})
        ids = self.tok.tokenize(delta, add_special=False, parse_special=True)
        pending = self.dec.pending
        self.dec.feed_pending()
        if pending is not None and pending not in self.tok.eog_ids:
            eot = self.tok.special_ids.get("eot")
            eot = eot if eot is not None else self.tok.eos_id
            if eot is not None:
                self._feed([eot])
        self.dec.sampler.reset()
        self._feed(ids)

    def reply(self, n_predict: int = -1) -> Iterator[int]:
        """The assistant's tokens until an end-of-generation token, -n tokens or a full context;
        the reply's text joins the messages (for the next turn's rendering)."""
        self._reply = []
        try:
            for t in continue_(self.dec, n_predict, self.tok.eog_ids):
                self._reply.append(self.tok.token_to_piece(t))
                yield t
        finally:
            content = b"".join(self._reply).decode("utf-8", "replace")
            self.messages.append({"role": "assistant", "content": content})

    def _feed(self, ids) -> None:
        if len(ids) == 0:
            return
        if len(ids) >= self.dec.room():
            raise ContextFull(f"the context is full ({self.dec.n_ctx} tokens): {len(ids)} more do not fit")
        self.dec.feed(ids)
