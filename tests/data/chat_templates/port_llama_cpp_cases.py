"""Writes llama_cpp_cases.json: the test cases of llama.cpp's tests/test-chat-template.cpp
(main_automated_tests: the conversation and each template with its expected outputs).

    python tests/data/chat_templates/port_llama_cpp_cases.py LLAMA_CPP_DIR

The C++ aggregate initializers are read positionally, as the compiler does (the /* .field= */
comments are only comments); adjacent string literals join, U8C(...) is unwrapped.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

FIELDS = ("name", "template_str", "expected_output", "expected_output_jinja", "bos_token", "eos_token",
          "supported_with_jinja", "extra_conversation")
DEFAULTS = {"bos_token": "", "eos_token": "", "supported_with_jinja": True, "extra_conversation": []}
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}
TOKEN = re.compile(r'\s+|//[^\n]*|/\*.*?\*/|"((?:[^"\\]|\\.)*)"|([A-Za-z_][A-Za-z0-9_]*)|([{}(),])', re.S)


def tokens(text: str):
    pos = 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"unexpected {text[pos:pos + 20]!r}")
        pos = m.end()
        if m.group(1) is not None:
            yield ("str", re.sub(r"\\(.)", lambda e: ESCAPES[e.group(1)], m.group(1)))
        elif m.group(2):
            yield ("id", m.group(2))
        elif m.group(3):
            yield ("p", m.group(3))


def parse_value(toks: list, i: int):
    """One initializer: adjacent literals (optionally in U8C(...)), an identifier, or {...}."""
    kind, val = toks[i]
    if kind == "p" and val == "{":
        items, i = [], i + 1
        while toks[i] != ("p", "}"):
            item, i = parse_value(toks, i)
            items.append(item)
            if toks[i] == ("p", ","):
                i += 1
        return items, i + 1
    if kind == "id" and val == "U8C":
        value, i = parse_value(toks, i + 2)
        assert toks[i] == ("p", ")")
        return value, i + 1
    if kind == "id":
        return {"true": True, "false": False}.get(val, val), i + 1
    text = ""
    while i < len(toks) and toks[i][0] == "str":
        text += toks[i][1]
        i += 1
    return text, i


def main(llama_cpp: Path) -> None:
    src = (llama_cpp / "tests" / "test-chat-template.cpp").read_text()
    body = src[src.index("int main_automated_tests(void)"):]
    conv_src = body[body.index("conversation {") + len("conversation "):]
    conv, _ = parse_value(list(tokens(conv_src[:conv_src.index("};") + 1])), 0)
    cases_src = body[body.index("test_cases {") + len("test_cases "):]
    cases_src = cases_src[:cases_src.index("\n    };") + len("\n    }")]
    raw, _ = parse_value(list(tokens(cases_src)), 0)
    cases = [{**DEFAULTS, **dict(zip(FIELDS, values))} for values in raw]
    out = {"source": "llama.cpp tests/test-chat-template.cpp (llama-cpp-python 0.3.36 sdist)",
           "conversation": [{"role": r, "content": c} for r, c in conv], "cases": cases}
    target = Path(__file__).with_name("llama_cpp_cases.json")
    target.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases -> {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
