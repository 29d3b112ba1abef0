"""Chat templates as llama.cpp renders them with --jinja (`llama-cli -cnv`, llama-completion).

A model's `tokenizer.chat_template` (a Jinja template) turns a conversation into the prompt text.
llama.cpp (common/chat.cpp) renders it with its own Jinja engine (common/jinja/); kquant renders it
with the `jinja2` package, set up the same way:

- the template: the model's, or llama.cpp's ChatML fallback when the model has none (or "chatml");
  two string patches llama.cpp applies to GPT-OSS and Mistral tool templates;
- whitespace: trim_blocks and lstrip_blocks on, a single trailing newline of the template dropped
  (llama.cpp's lexer defaults, the same as Hugging Face transformers);
- globals: raise_exception, strftime_now (local time), range, dict, namespace, tojson (a filter
  too, JSON without ASCII escaping); `{% generation %}` tags ignored; loop controls on;
- variables: messages, bos_token and eos_token (the tokens' text), enable_thinking=True (llama.cpp's
  default), add_generation_prompt only when true (not defined otherwise), and llama.cpp's extra
  context datetime ("%b %d %Y") and date_string ("%d %b %Y"), today in local time: Llama 3.1's
  template prints date_string instead of its built-in "26 Jul 2024";
- messages: {"role", "content"} dicts; "developer" becomes "system"; a template that ignores the
  system message gets it merged into the next message (content + "\\n" + content) as llama.cpp does;
  a template that only reads typed content gets [{"type": "text", "text": ...}];
- the result: a leading bos_token dropped when the tokenizer adds BOS itself, a trailing eos_token
  when it adds EOS (llama.cpp tokenizes the prompt with add_special).

Messages are `ChatMessage`s or plain dicts with "role" and "content" strings.

Where this differs from llama.cpp: template capabilities are found by rendering probe conversations
and looking at the output (llama.cpp tracks which values the template reads), which agrees for
templates that print what they read; templates llama.cpp hands to a dedicated handler (GPT-OSS,
Ministral 3, Kimi, DeepSeek V3.2, Gemma 4, ...) are rendered plainly, without that handler's message
rewriting; and the two Jinja engines may differ on corner cases of the language itself.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ModelError

# common/chat.cpp CHATML_TEMPLATE_SRC: what llama.cpp renders for a model without a template.
CHATML_TEMPLATE_SRC = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\n' -}}\n"
    "{%- endif -%}"
)

# common_chat_templates_init's two temporary patches: lines that would raise on llama.cpp's inputs.
_PATCHES = (
    (("<|channel|>", "in message.content or"),
     "{%- if \"<|channel|>analysis<|message|>\" in message.content or "
     "\"<|channel|>final<|message|>\" in message.content %}"),
    (("[TOOL_CALLS]", "if (message['content'] is none or"),
     "{%- if (message['content'] is none or message['content'] == '' or "
     "message['content']|length == 0) and (message['tool_calls'] is not defined or "
     "message['tool_calls'] is none or message['tool_calls']|length == 0) %}"),
)

# StepFun's marker: llama.cpp trims message contents for it (issue #24181).
_STEPFUN_MARKER = "You have access to the following functions in JSONSchema format"
_C_SPACE = " \t\n\v\f\r"  # std::isspace in the C locale


@dataclass
class ChatMessage:
    """One turn of a conversation: role ("system", "user", "assistant", ...) and its text."""

    role: str
    content: str


class _TemplateRaised(Exception):
    """raise_exception() called by the template (kept apart from jinja2's own errors)."""


class _IgnoreGeneration(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' marker): llama.cpp ignores the tags."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Iterable[str] | None = None, sort_keys: bool = False) -> str:
    """llama.cpp's tojson: JSON with ", " / ": " (or "," / ": " when indented), no HTML escaping."""
    seps = tuple(separators) if separators is not None else None
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=seps, sort_keys=sort_keys)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(exc: Exception) -> ModelError:
    """The jinja2 / template failure as one line naming its cause."""
    if isinstance(exc, _TemplateRaised):
        return ModelError(f"the chat template raised an exception: {_one_line(exc)}")
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return ModelError(f"the chat template has a syntax error (line {exc.lineno}): {_one_line(exc.message)}")
    return ModelError(f"the chat template failed ({type(exc).__name__}): {_one_line(exc)}")


def _patched(source: str) -> str:
    """The template llama.cpp renders: ChatML when there is none, its two patches applied."""
    if not source or source == "chatml":
        return CHATML_TEMPLATE_SRC
    for (needle, marker), line in _PATCHES:
        if needle in source and marker in source:
            source = source.replace(line, "{%- if false %}")
    return source


def _as_dicts(messages: Iterable[ChatMessage | Mapping[str, Any]]) -> list[dict]:
    out = []
    for m in messages:
        role, content = (m.role, m.content) if isinstance(m, ChatMessage) else (m["role"], m["content"])
        if not isinstance(role, str) or not isinstance(content, str):
            raise ModelError(f"a chat message needs a string role and content, not {role!r}: {content!r}")
        out.append({"role": role, "content": content})
    return out


def _token_text(tokenizer, token: int | None) -> str:
    """common_token_to_piece(vocab, token, special=true), "" for a missing token."""
    if token is None:
        return ""
    return tokenizer.token_to_piece(token, special=True).decode("utf-8", "replace")


class ChatTemplate:
    """A model's chat template, rendered as llama.cpp's common_chat_templates_apply (jinja path)."""

    def __init__(self, source_text: str, bos_token: str, eos_token: str, add_bos: bool, add_eos: bool,
                 *, now: datetime | None = None):
        """`source_text`: the template ("" or "chatml": llama.cpp's ChatML); `bos_token`/`eos_token`:
        their text; `add_bos`/`add_eos`: whether the tokenizer adds them (the rendered text then drops
        its own); `now`: the time strftime_now and date_string show (default: the current local time)."""
        self.source = _patched(source_text or "")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.now = now
        self._template = self._compile(self.source)
        self.supports_system_role = self._probe_system_role()
        self.typed_content_only = self._probe_typed_content_only()

    @classmethod
    def from_source(cls, source, tokenizer=None) -> "ChatTemplate":
        """From a model (kquant.models.open_model's result; anything with `get(key)`), as
        common_chat_templates_init: its tokenizer.chat_template (ChatML if none), the BOS and EOS
        tokens' text and whether the tokenizer adds them."""
        if tokenizer is None:
            from ..tokenizer import Tokenizer
            tokenizer = Tokenizer.from_source(source)
        text = source.get("tokenizer.chat_template")
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return cls(text or "", _token_text(tokenizer, tokenizer.bos_id), _token_text(tokenizer, tokenizer.eos_id),
                   tokenizer.add_bos, tokenizer.add_eos)

    # rendering

    @staticmethod
    def _compile(source: str) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols, _IgnoreGeneration])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, tojson=_tojson)
        try:
            return env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise _error(exc) from None

    def _time(self) -> datetime:
        return self.now if self.now is not None else datetime.now()

    def _render(self, variables: dict) -> str:
        """The template's text for these variables; any failure is a ModelError."""
        try:
            return self._template.render(strftime_now=lambda fmt: self._time().strftime(fmt), **variables)
        except Exception as exc:  # jinja2 raises many kinds (undefined, type, security, ...)
            raise _error(exc) from None

    def _context(self, messages: list[dict], add_generation_prompt: bool) -> dict:
        """common_chat_template_direct_apply_impl's variables plus common_chat_extra_context."""
        now = self._time()
        ctx = {"messages": messages, "bos_token": self.bos_token, "eos_token": self.eos_token,
               "enable_thinking": True, "datetime": now.strftime("%b %d %Y"), "date_string": now.strftime("%d %b %Y")}
        if add_generation_prompt:  # llama.cpp leaves it undefined otherwise
            ctx["add_generation_prompt"] = True
        return ctx

    def _probe(self, messages: list[dict], marker: str) -> bool:
        """Whether rendering these messages (as llama.cpp's capability probes: empty BOS/EOS, a
        generation prompt) succeeds and prints `marker`."""
        try:
            out = self._template.render(messages=messages, bos_token="", eos_token="", add_generation_prompt=True,
                                        strftime_now=lambda fmt: self._time().strftime(fmt))
        except Exception:  # a probe failing is an answer, as in llama.cpp's caps_get
            return False
        return marker in out

    def _probe_system_role(self) -> bool:
        """caps.supports_system_role: whether the template uses a system message's content."""
        return self._probe([{"role": "system", "content": "System message"},
                            {"role": "user", "content": "User message"}], "System message")

    def _probe_typed_content_only(self) -> bool:
        """Only typed content ([{"type": "text", "text": ...}]) works: llama.cpp converts strings."""
        marker = "STRING_MARKER"
        if self._probe([{"role": "user", "content": marker}], marker):
            return False
        return self._probe([{"role": "user", "content": [{"type": "text", "text": marker}]}], marker)

    def _normalized(self, messages: list[dict]) -> list[dict]:
        """common_chat_templates_apply_jinja's workarounds for plain messages."""
        if _STEPFUN_MARKER in self.source:
            messages = [dict(m, content=m["content"].strip(_C_SPACE)) for m in messages]
        if self.typed_content_only:
            messages = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in messages]
        if "<|channel|>" not in self.source:
            messages = [dict(m, role="system") if m["role"] == "developer" else m for m in messages]
        if not self.supports_system_role and messages and messages[0]["role"] == "system":
            messages = self._merge_system(messages)
        return messages

    @staticmethod
    def _merge_system(messages: list[dict]) -> list[dict]:
        """workaround::system_message_not_supported: the system text goes before the next message's."""
        if len(messages) == 1:
            return []
        first, second = messages[0], messages[1]
        return [dict(second, content=f"{first['content']}\n{second['content']}")] + messages[2:]

    def apply(self, messages: Iterable[ChatMessage | Mapping[str, Any]], add_generation_prompt: bool) -> str:
        """The prompt of common_chat_templates_apply(...).prompt, use_jinja, for a plain chat."""
        text = self._render(self._context(self._normalized(_as_dicts(messages)), add_generation_prompt))
        if self.add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        if self.add_eos and self.eos_token and text.endswith(self.eos_token):
            text = text[:-len(self.eos_token)]
        return text

    def format_single(self, past: Iterable[ChatMessage | Mapping[str, Any]],
                      new_message: ChatMessage | Mapping[str, Any], add_generation_prompt: bool) -> str:
        """common_chat_format_single: the text to append to the prompt for `new_message`, the
        conversation's rendering past the rendering of `past` (without generation prompt). A '\\n'
        the past rendering ends with comes first when a generation prompt is asked for: llama-cli's
        model stops on the end-of-turn token, before that newline. The cut is in UTF-8 bytes, as
        llama.cpp's; a template that re-renders the past differently (Qwen3 drops the last reply's
        think block) can cut mid-character, and such bytes come back as surrogate escapes."""
        past = _as_dicts(past)
        before = self.apply(past, False).encode("utf-8") if past else b""
        after = self.apply(past + _as_dicts([new_message]), add_generation_prompt).encode("utf-8")
        lead = b"\n" if add_generation_prompt and before.endswith(b"\n") else b""
        return (lead + after[len(before):]).decode("utf-8", "surrogateescape")

    def __repr__(self) -> str:
        first = re.sub(r"\s+", " ", self.source[:40])
        return f"ChatTemplate({first!r}..., bos={self.bos_token!r}, eos={self.eos_token!r})"
