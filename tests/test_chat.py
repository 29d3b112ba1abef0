"""kquant.validation.chat against llama.cpp: its built-in formatter (llama_chat_apply_template),
the expected outputs of its tests/test-chat-template.cpp, and llama-cpp-python's Jinja2 formatter.

The templates are the ones of the architectures kquant runs (tests/data/chat_templates/README.md).
"""
from __future__ import annotations

import ctypes
import json
from datetime import datetime
from pathlib import Path

import pytest

from kquant.errors import ModelError
from kquant.tokenizer import Tokenizer
from kquant.validation.chat import CHATML_TEMPLATE_SRC, ChatMessage, ChatTemplate

DATA = Path(__file__).parent / "data" / "chat_templates"
NOW = datetime(2026, 12, 8, 0, 30)

# name: (file, bos text, eos text, add_bos) as the models' GGUFs have them
MODELS = {
    "smollm2": ("HuggingFaceTB-SmolLM2-135M-Instruct.jinja", "<|im_start|>", "<|im_end|>", False),
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", "<|endoftext|>", "<|im_end|>", False),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", "<|endoftext|>", "<|im_end|>", False),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", True),
    "llama3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", True),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>", True),
}


def _m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


SYS, USER, ASSISTANT = _m("system", "You are a helpful assistant."), _m("user", "Hello!"), _m("assistant", "Hi there.")
CONVERSATIONS = {
    "system+user": [SYS, USER],
    "user": [USER],
    "multi-turn": [SYS, USER, ASSISTANT, _m("user", "And then?")],
    "multi-turn, no system": [USER, ASSISTANT, _m("user", "And then?")],
    "unicode": [_m("system", "Tu es un assistant 🤖"), _m("user", "Ça va ? 日本語, ünïcödé — “quotes”")],
    "empty": [_m("system", ""), _m("user", "")],
    "newlines": [_m("system", "line 1\nline 2\n"), _m("user", "  a\n\nb  \n")],
}


def template(model: str, add_bos: bool | None = None, now: datetime | None = NOW) -> ChatTemplate:
    file, bos, eos, default_add_bos = MODELS[model]
    return ChatTemplate((DATA / file).read_text(), bos, eos, default_add_bos if add_bos is None else add_bos,
                        False, now=now)


def builtin(llama_cpp, tmpl: str, messages: list[dict], add_ass: bool) -> str:
    """llama.cpp's built-in formatter: llama_chat_apply_template(tmpl, chat, n, add_ass, buf, len)."""
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    size = 4096
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(tmpl.encode(), chat, len(messages), add_ass, buf, size)
    assert 0 <= n <= size, f"llama_chat_apply_template returned {n}"
    return buf.raw[:n].decode("utf-8")


# 1. llama.cpp's built-in formatter, where it is defined to match the template

@pytest.mark.parametrize("add_ass", [True, False])
@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("model", ["smollm2", "qwen2.5", "qwen3"])
def test_chatml_templates_match_builtin_formatter(llama_cpp, model, conv, add_ass):
    messages = CONVERSATIONS[conv]
    if model != "qwen3" and messages[0]["role"] != "system":
        # SmolLM2's and Qwen2.5's templates add their default system prompt; the chatml formatter does not
        tmpl = template(model)
        default = tmpl.apply([USER], False).split("<|im_start|>user")[0]
        assert default.startswith("<|im_start|>system\nYou are ") and default.endswith("<|im_end|>\n")
        assert tmpl.apply(messages, add_ass) == default + builtin(llama_cpp, tmpl.source, messages, add_ass)
        return
    # Qwen3's conversations here end on a user turn: its think block is only for the last replies
    tmpl = template(model)
    assert tmpl.apply(messages, add_ass) == builtin(llama_cpp, tmpl.source, messages, add_ass)


@pytest.mark.parametrize("add_ass", [True, False])
@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("model", ["llama3.1", "llama3.2"])
def test_llama3_templates_match_builtin_formatter_past_the_preamble(llama_cpp, model, conv, add_ass):
    """The llama3 formatter writes the system message alone; the templates always write a system
    turn that starts with their knowledge and today's date (date_string, llama.cpp's extra context)
    and stands empty without a system message. Past that preamble the two agree."""
    messages = CONVERSATIONS[conv]
    tmpl = template(model)
    ours, theirs = tmpl.apply(messages, add_ass), builtin(llama_cpp, tmpl.source, messages, add_ass)
    header = "<|start_header_id|>system<|end_header_id|>\n\n"
    preamble = header + "Cutting Knowledge Date: December 2023\nToday Date: 08 Dec 2026\n\n"
    if messages[0]["role"] == "system":
        assert theirs.startswith(header)
        assert ours == preamble + theirs[len(header):]
    else:
        assert ours == preamble + "<|eot_id|>" + theirs


@pytest.mark.parametrize("add_ass", [True, False])
@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_mistral_nemo_matches_builtin_formatter(llama_cpp, conv, add_ass):
    """mistral-v3-tekken: the formatter writes the system message into the first [INST], the template
    into the last one: they agree unless a system message comes with several user turns. Neither
    has a generation prompt."""
    messages = CONVERSATIONS[conv]
    tmpl = template("mistral-nemo")
    ours, theirs = tmpl.apply(messages, add_ass), builtin(llama_cpp, tmpl.source, messages, add_ass)
    if conv == "multi-turn":
        assert ours == "[INST]Hello![/INST]Hi there.</s>[INST]You are a helpful assistant.\n\nAnd then?[/INST]"
        assert theirs == "[INST]You are a helpful assistant.\n\nHello![/INST]Hi there.</s>[INST]And then?[/INST]"
    else:
        assert ours == theirs


# 2. llama-cpp-python's Jinja2ChatFormatter, every template

@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("model", MODELS)
def test_templates_match_llama_cpp_python_jinja2_formatter(llama_cpp, model, conv, add_generation_prompt):
    """Rendered alike, given llama.cpp's extra context (date_string, enable_thinking); the formatter
    keeps the template's leading BOS, which llama.cpp drops when the tokenizer adds one."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    file, bos, eos, _ = MODELS[model]
    messages = CONVERSATIONS[conv]
    now = datetime.now()
    reference = Jinja2ChatFormatter((DATA / file).read_text(), eos_token=eos, bos_token=bos,
                                    add_generation_prompt=add_generation_prompt)
    expected = reference(messages=messages, date_string=now.strftime("%d %b %Y"), enable_thinking=True).prompt
    assert template(model, add_bos=False, now=now).apply(messages, add_generation_prompt) == expected
    with_bos = template(model, add_bos=True, now=now).apply(messages, add_generation_prompt)
    assert with_bos == (expected[len(bos):] if expected.startswith(bos) else expected)


@pytest.mark.parametrize("model", MODELS)
def test_replies_with_think_blocks_match_jinja2_formatter(llama_cpp, model):
    """A conversation ending on an assistant reply (Qwen3 writes its think block there)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    file, bos, eos, _ = MODELS[model]
    messages = [SYS, USER, _m("assistant", "<think>\nhmm\n</think>\n\nHi there.")]
    reference = Jinja2ChatFormatter((DATA / file).read_text(), eos_token=eos, bos_token=bos,
                                    add_generation_prompt=False)
    expected = reference(messages=messages, date_string="08 Dec 2026", enable_thinking=True).prompt
    assert template(model, add_bos=False).apply(messages, False) == expected


def test_qwen3_reply_keeps_its_think_block_only_when_last():
    tmpl = template("qwen3")
    reply = _m("assistant", "<think>\nhmm\n</think>\n\nHi there.")
    assert tmpl.apply([USER, reply], False).endswith(
        "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHi there.<|im_end|>\n")
    assert "<think>" not in tmpl.apply([USER, reply, _m("user", "ok")], True)
    # llama.cpp passes enable_thinking=true: no empty think block after the generation prompt
    assert tmpl.apply([USER], True).endswith("<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")


# 3. llama.cpp's own expectations (tests/test-chat-template.cpp, ported by port_llama_cpp_cases.py)

LLAMA_CPP_CASES = json.loads((DATA / "llama_cpp_cases.json").read_text())


@pytest.mark.parametrize("case", [c for c in LLAMA_CPP_CASES["cases"] if c["supported_with_jinja"]],
                         ids=lambda c: c["name"][:60])
def test_llama_cpp_test_chat_template_cases(case):
    """format_using_common: no model (add_bos/add_eos false), a generation prompt; the expected jinja
    output where it differs from the built-in formatter's (system merged into the first user turn
    by templates without a system role, for one)."""
    messages = LLAMA_CPP_CASES["conversation"] + [_m(r, c) for r, c in case["extra_conversation"]]
    tmpl = ChatTemplate(case["template_str"], case["bos_token"], case["eos_token"], False, False)
    assert tmpl.apply(messages, True) == (case["expected_output_jinja"] or case["expected_output"])


def test_llama_cpp_cases_cover_our_architectures():
    names = [c["name"] for c in LLAMA_CPP_CASES["cases"]]
    assert any(n.startswith("Mistral-Nemo-Instruct-2407") for n in names)
    assert any(n == "Llama-3" for n in names) and any("OpenHermes" in n for n in names)  # llama3, chatml
    nemo = next(c for c in LLAMA_CPP_CASES["cases"] if c["name"].startswith("Mistral-Nemo"))
    ours = (DATA / MODELS["mistral-nemo"][0]).read_text()
    # the very template of our Nemo file: llama.cpp expects its system prompt in the last [INST] with
    # jinja, in the first with its built-in formatter ("modified to have system prompt at start")
    assert nemo["template_str"] == ours
    assert nemo["expected_output_jinja"].endswith("[INST]You are a helpful assistant\n\nAnother question[/INST]")


# 4. format_single: what llama-cli appends turn by turn

def _session(tmpl: ChatTemplate, messages: list[dict]) -> list[str]:
    """llama-cli -cnv's chat_add_and_format: a generation prompt after user turns only."""
    return [tmpl.format_single(messages[:i], m, m["role"] == "user") for i, m in enumerate(messages)]


SESSION = [SYS, USER, ASSISTANT, _m("user", "And then?"), _m("assistant", "Then this."), _m("user", "Bye.")]


def test_format_single_chatml_session_literal():
    pieces = _session(template("smollm2"), SESSION[:4])
    assert pieces == [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        # the past's last '\n' repeated: llama-cli -sys without -p feeds both pieces, a blank line between
        "\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>assistant\nHi there.<|im_end|>\n",
        "\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n",
    ]


def test_format_single_llama3_session_literal():
    pieces = _session(template("llama3.1"), SESSION[:4])
    assert pieces[0] == ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                         "Today Date: 08 Dec 2026\n\nYou are a helpful assistant.<|eot_id|>")  # BOS: the tokenizer's
    assert pieces[1] == "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>" \
                        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert pieces[3] == "<|start_header_id|>user<|end_header_id|>\n\nAnd then?<|eot_id|>" \
                        "<|start_header_id|>assistant<|end_header_id|>\n\n"


END_OF_TURN = {"smollm2": "<|im_end|>", "qwen2.5": "<|im_end|>", "llama3.1": "<|eot_id|>", "llama3.2": "<|eot_id|>",
               "mistral-nemo": "</s>"}


@pytest.mark.parametrize("model", END_OF_TURN)
def test_format_single_session_adds_up_to_apply(model):
    """What llama-cli -cnv -sys S -p P feeds: the first turns rendered whole (common_chat_templates_apply),
    each reply as the model wrote it (its text, then the end-of-turn token it stopped on), each later
    user turn's format_single. That is the whole conversation's rendering exactly: the '\n' a user
    piece starts with is the one the template writes after the end-of-turn token."""
    tmpl = template(model)
    messages = SESSION if model != "mistral-nemo" else SESSION[1:]  # Nemo: system only with the last turn
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    fed = tmpl.apply(messages[:first_user + 1], True)
    for i in range(first_user + 1, len(messages)):
        m = messages[i]
        if m["role"] == "assistant":
            fed += m["content"] + END_OF_TURN[model]
        else:
            fed += tmpl.format_single(messages[:i], m, True)
    assert fed == tmpl.apply(messages, True)


def test_format_single_without_system_on_nemo_is_prefix_stable():
    tmpl = template("mistral-nemo")
    pieces = _session(tmpl, SESSION[1:])
    assert pieces == ["[INST]Hello![/INST]", "Hi there.</s>", "[INST]And then?[/INST]", "Then this.</s>",
                      "[INST]Bye.[/INST]"]


def test_format_single_cuts_bytes_where_the_past_renders_differently():
    """Qwen3 writes the last reply's think block, then drops it once a user turn follows: the past's
    rendering is no prefix and llama.cpp's cut (a byte count) lands inside the new text."""
    tmpl = template("qwen3")
    past = [USER, _m("assistant", "Hi there.")]
    before = tmpl.apply(past, False).encode()
    after = tmpl.apply(past + [_m("user", "And then? " * 3)], True).encode()
    assert not after.startswith(before)
    assert tmpl.format_single(past, _m("user", "And then? " * 3), True) == "\n" + after[len(before):].decode()


def test_format_single_first_message_and_messages_as_dataclasses():
    tmpl = template("smollm2")
    assert tmpl.format_single([], ChatMessage("user", "hi"), True) == tmpl.apply([ChatMessage("user", "hi")], True)


# 5. from_source: the model's template, tokens and flags; ChatML without a template

def _source(**meta):
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": ["<|im_start|>", "<|im_end|>", "a", "b"],
            "tokenizer.ggml.token_type": [3, 3, 1, 1], "tokenizer.ggml.merges": [],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}
    base.update(meta)
    meta = {k: v for k, v in base.items() if v is not None}

    class Source:
        def get(self, key):
            return meta.get(key)
    return Source()


def test_from_source_reads_template_and_special_tokens():
    src = _source(**{"tokenizer.chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
                     "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    tmpl = ChatTemplate.from_source(src, Tokenizer.from_source(src))
    assert (tmpl.bos_token, tmpl.eos_token, tmpl.add_bos, tmpl.add_eos) == ("<|im_start|>", "<|im_end|>", True, True)
    assert tmpl.apply([USER], False) == "Hello!"  # BOS and EOS left to the tokenizer
    src = _source(**{"tokenizer.chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"})
    assert ChatTemplate.from_source(src).apply([USER], False) == "<|im_start|>Hello!<|im_end|>"


@pytest.mark.parametrize("text", [None, "", "chatml"])
def test_model_without_template_gets_llama_cpp_chatml(llama_cpp, text):
    tmpl = ChatTemplate.from_source(_source(**{"tokenizer.chat_template": text}))
    assert tmpl.source == CHATML_TEMPLATE_SRC
    for messages in CONVERSATIONS.values():
        for add in (True, False):
            assert tmpl.apply(messages, add) == builtin(llama_cpp, "chatml", messages, add)


def test_from_source_on_the_tiny_gguf(tiny_llama_f32):
    from kquant.models import open_model

    source = open_model(tiny_llama_f32)
    tmpl = ChatTemplate.from_source(source, Tokenizer.from_source(source))
    assert tmpl.source == CHATML_TEMPLATE_SRC  # the tiny model has no chat template
    assert (tmpl.bos_token, tmpl.eos_token, tmpl.add_bos) == ("<s>", "</s>", True)
    assert tmpl.apply([USER], True) == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"


def test_from_source_on_smollm2_as_llama_cpp_loads_it(llama_cpp):
    """The SmolLM2 GGUF: template, BOS/EOS text and add_bos as llama.cpp's vocabulary gives them, the
    committed template file its metadata, the prompt as llama-cpp-python's chat formatter writes it."""
    from conftest import _smollm2_path
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from kquant.models import open_model

    path = _smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 model not available")
    llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        bos, eos = (llama._model.token_get_text(t) for t in (llama.token_bos(), llama.token_eos()))
        add_bos, source_text = llama._model.add_bos_token(), llama.metadata["tokenizer.chat_template"]
    finally:
        llama.close()
    tmpl = ChatTemplate.from_source(open_model(path))
    assert (tmpl.source, tmpl.bos_token, tmpl.eos_token, tmpl.add_bos) == (source_text, bos, eos, add_bos)
    assert tmpl.source == (DATA / MODELS["smollm2"][0]).read_text()
    reference = Jinja2ChatFormatter(source_text, eos_token=eos, bos_token=bos)
    assert tmpl.apply([USER], True) == reference(messages=[USER]).prompt


# 6. template failures: one-line ModelErrors

def test_raise_exception_is_a_model_error():
    with pytest.raises(ModelError, match="raised an exception: After the optional system message, conversation "
                                         "roles must alternate") as e:
        template("mistral-nemo").apply([USER, USER], True)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("source, match", [
    ("{% for m in messages %}{{ m.content }}", "syntax error \\(line 1\\)"),
    ("{{ messages[0].content +\n\n }", "syntax error \\(line 3\\)"),
    ("{% frobnicate %}", "syntax error"),
])
def test_syntax_errors_are_model_errors(source, match):
    with pytest.raises(ModelError, match=match) as e:
        ChatTemplate(source, "", "", False, False)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match=match):
        ChatTemplate.from_source(_source(**{"tokenizer.chat_template": source}))


def test_render_errors_are_model_errors():
    with pytest.raises(ModelError, match="the chat template failed \\(TypeError\\)") as e:
        ChatTemplate("{{ messages[0].content + 1 }}", "", "", False, False).apply([USER], True)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="string role and content"):
        template("smollm2").apply([{"role": "user", "content": None}], True)


# the context llama.cpp gives a template

def test_context_variables():
    src = ("{{ enable_thinking }}|{{ add_generation_prompt is defined }}|{{ date_string }}|{{ datetime }}|"
           "{{ strftime_now('%Y-%m-%d') }}|{{ {'k': 'é<'} | tojson }}|{{ tojson([1, 2], indent=1) }}|"
           "{% for i in range(3) %}{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %}|"
           "{% generation %}g{% endgeneration %}|{{ namespace(a=1).a }}")
    tmpl = ChatTemplate(src, "", "", False, False, now=NOW)
    assert tmpl.apply([USER], False) == 'True|False|08 Dec 2026|Dec 08 2026|2026-12-08|{"k": "é<"}|[\n 1,\n 2\n]|02|g|1'
    assert tmpl.apply([USER], True).startswith("True|True|")


def test_whitespace_control_as_hf_and_llama_cpp():
    src = "{% for m in messages %}\n    {% if true %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n"
    assert ChatTemplate(src, "", "", False, False).apply([USER, USER], False) == "[Hello!]\n[Hello!]\n"


def test_developer_role_becomes_system():
    tmpl = ChatTemplate("{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}", "", "", False, False)
    assert tmpl.apply([_m("developer", "d"), USER], False) == "system:d;user:Hello!;"


def test_templates_without_system_role_get_it_merged():
    src = "{% for m in messages %}{% if m.role != 'system' %}<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}"
    tmpl = ChatTemplate(src, "", "", False, False)
    assert not tmpl.supports_system_role
    assert tmpl.apply([SYS, USER], False) == "<user>You are a helpful assistant.\nHello!"
    assert tmpl.apply([SYS], False) == ""  # a lone system message is dropped


def test_typed_content_only_templates_get_text_parts():
    tmpl = ChatTemplate("{% for m in messages %}{{ m.content[0].text }}{% endfor %}", "", "", False, False)
    assert tmpl.typed_content_only
    assert tmpl.apply([USER], False) == "Hello!"
    assert not template("qwen3").typed_content_only and template("qwen3").supports_system_role
