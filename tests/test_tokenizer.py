"""kquant.tokenizer against llama.cpp's own llama_tokenize / llama_token_to_piece / llama_detokenize
(through llama-cpp-python, the vocabulary loaded with vocab_only=True).

Models: the real SmolLM2-135M (byte-level BPE, pre-tokenizer "smollm"), the project's tiny model
data/tiny-llama (SentencePiece), and the seven Hugging Face fixtures of make_hf_fixtures.py (SPM with
added tokens, Phi-3's padded SPM, Llama-3 BPE, Qwen2/Qwen3 BPE, SmolLM BPE), the latter two kinds converted to GGUF by
kquant for llama.cpp (and read by kquant straight from their folders).  Texts: the whole shared
texts (wiki.test.raw and the calibration books), and strings made to hit the corner cases.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

from typing import Iterable

import numpy as np
import pytest
from gguf import GGUFValueType

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_hf_fixtures as fixtures  # noqa: E402
from conftest import _smollm2_path, llama_cpp_file  # noqa: E402
from kquant.files.gguf_read import load_gguf  # noqa: E402
from kquant.files.gguf_write import write_gguf  # noqa: E402
from kquant.files.hf import load_hf_model  # noqa: E402
from kquant.errors import ModelError
from kquant.files.source import KV, ModelSource  # noqa: E402
from kquant.tokenizer import BPE_PRE_TOKENIZERS, Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT_DIR = ROOT.parent / "shared" / "text"
TINY_LLAMA = ROOT / "data" / "tiny-llama"

TRICKY = [
    "", " ", "  ", "   ", "a", " a", "a ", "Hello world", " Hello world", "Hello world ",
    "   leading spaces", "trailing spaces   ", "multiple   spaces    between  words",
    "\n", "\n\n", "\n\n\n\n", "line one\nline two\n\nline four\n", "windows\r\nline\r\nends\r\n", "\r",
    "\ttab\t\tdouble tab\t", " \t \n \r\n  mixed \n\t whitespace  ", " " * 40 + "x", "x" + " " * 33,
    "\n" * 17 + "after newlines", "a\n \n b", "end with newline and spaces\n   ",
    "0", "12", "123", "1234", "12345678901234567890", "3.14159, 2,718,281 and 1e-10 or -42",
    "in 1999 there were 100000 people; 2024-01-31 12:34:56", "a1b2c3 ABC123 123abc",
    "I'm you're he's we'll they'd it's don't I've", "SHE'S WE'LL THEY'D I'M YOU'RE I'VE DON'T",
    "'s 't 're 've 'm 'll 'd", "''s '' ' '", "rock 'n' roll", "O'Neil's dog's toy",
    "café naïve résumé façade", "Ünïcödé ÀÉÎÕÜ ß ẞ", "Ελληνικά κείμενο", "Привет, мир!",
    "日本語のテキスト、中文字符。한국어 텍스트", "中文混合English混合", "👍🏽🎉🤖 ❤️ 🇫🇷 👨‍👩‍👧",
    "e\u0301 a\u0300 n\u0303 combining\u0327", "zero\u200bwidth\u200djoiner\ufeffbom",
    "\u00a0nbsp\u2003em space\u3000ideographic\u2028line sep\u2029para\x85nel",
    "مرحبا بالعالم", "नमस्ते दुनिया", "สวัสดีชาวโลก", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 ①②③ ½ ¾ Ⅻ",
    "\x00\x01\x07\x1b\x1f\x7f control", "new in Unicode 15: \U0001FAE8 \U00031350 \U0001E4D0",
    "\U0010FFFF\U000F0000 private use \ue000", "~!@#$%^&*()_+-=[]{}|;:',.<>/?`\\\"",
    "...!!!???,,,;;; --- ___ *** ///", "a.b,c!d?e", "wait... what?! no -- yes", "«quoted» “curly” ‘single’ — dash",
    "<s>", "</s>", "<unk>", "<s>Hello</s>", " <s> spaced </s> ", "<|endoftext|>",
    "text<|endoftext|>more", "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_start|>", "<|im_start", "<tool>call</tool> <tool> x<tool>y",
    "<tool_call>{\"a\": 1}</tool_call><think>hm</think>", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|reserved_special_token_0|>", "<0x0A><0xFF>", "▁already▁escaped ▁", "Ġspace Ċnewline",
    "<repo_name>kquant<file_sep>a.py", "x<|im_end|>", "  <|im_start|>  ",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! 1234567 ünïcödé 日本 🎉\n\t end",
]


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    files = sorted(TEXT_DIR.glob("*/*"))
    if not files:
        pytest.skip(f"shared texts not found under {TEXT_DIR}")
    return {f.name: f.read_text(encoding="utf-8") for f in files}


class Pair:
    """One model: kquant's tokenizer and llama.cpp's vocabulary."""

    def __init__(self, llama_cpp, source, gguf: Path):
        self.lc = llama_cpp
        self.tok = Tokenizer.from_source(source)
        self.llama = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llama.model)

    def ref(self, text: str, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        return np.array(self.llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special),
                        dtype=np.int32)

    def ref_piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(1024)
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        assert 0 <= n <= len(buf)
        return buf.raw[:n]

    def ref_detokenize(self, ids, remove_special: bool, unparse_special: bool) -> bytes:
        arr = (self.lc.llama_token * len(ids))(*ids)
        size = 64 + 64 * len(ids)
        buf = ctypes.create_string_buffer(size)
        n = self.lc.llama_detokenize(self.vocab, arr, len(ids), buf, size, remove_special, unparse_special)
        assert 0 <= n <= size
        return buf.raw[:n]


@pytest.fixture(scope="module")
def registry():
    """The models opened so far (llama.cpp's closed at the end, before the interpreter's exit)."""
    pairs: dict[str, Pair] = {}
    yield pairs
    for p in pairs.values():
        p.llama.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    if not fixtures.DEFAULT_TEXT.is_file():
        pytest.skip(f"training text {fixtures.DEFAULT_TEXT} (shared/) not available")
    return fixtures.build(tmp_path_factory.mktemp("hf-tok"))


@pytest.fixture(scope="module")
def smollm2_source():
    path = _smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 model not available")
    return load_gguf(path)


@pytest.fixture(scope="module")
def pair(request, llama_cpp, registry, tmp_path_factory) -> Pair:
    name = request.param
    if name not in registry:
        if name == "smollm2":
            src = request.getfixturevalue("smollm2_source")
            registry[name] = Pair(llama_cpp, src, Path(src.path))
        else:
            folder = TINY_LLAMA if name == "tiny-llama" else request.getfixturevalue("built")[name]
            gguf = tmp_path_factory.mktemp("tok") / f"{name}.gguf"
            write_gguf(load_hf_model(folder), gguf, progress=False)
            registry[name] = Pair(llama_cpp, load_hf_model(folder), gguf)
    return registry[name]


MODELS = ["smollm2", "tiny-llama", *fixtures.FIXTURES]


def _diff(got: np.ndarray, ref: np.ndarray, tok: Tokenizer) -> str:
    n = min(len(got), len(ref))
    k = next((i for i in range(n) if got[i] != ref[i]), n)
    return (f"{len(got)} vs {len(ref)} tokens, first difference at {k}: kquant {got[k:k + 6].tolist()} "
            f"llama.cpp {ref[k:k + 6].tolist()} near {tok.detokenize(ref[max(0, k - 6):k + 6])!r}")


@pytest.mark.parametrize("pair", MODELS, indirect=True)
def test_tricky_strings(pair):
    bad = []
    for text in TRICKY:
        for add_special in (True, False):
            for parse_special in (False, True):
                got = pair.tok.tokenize(text, add_special, parse_special)
                ref = pair.ref(text, add_special, parse_special)
                assert got.dtype == np.int32
                if not np.array_equal(got, ref):
                    bad.append(f"{text!r} add_special={add_special} parse_special={parse_special}: "
                               f"kquant {got.tolist()} llama.cpp {ref.tolist()}")
    assert not bad, "\n".join(bad[:10])


@pytest.mark.parametrize("pair", ["smollm2", "tiny-llama"], indirect=True)
def test_whole_texts(pair, texts):
    for name, text in texts.items():
        got = pair.tok.tokenize(text)
        ref = pair.ref(text)
        assert np.array_equal(got, ref), f"{name}: {_diff(got, ref, pair.tok)}"


@pytest.mark.parametrize("pair", list(fixtures.FIXTURES), indirect=True)
def test_fixture_texts(pair, texts):
    # a part of every text (wiki.test.raw has the widest range of characters)
    for name, text in texts.items():
        part = text[:300_000] if name == "wiki.test.raw" else text[50_000:80_000]
        got = pair.tok.tokenize(part)
        ref = pair.ref(part)
        assert np.array_equal(got, ref), f"{name}: {_diff(got, ref, pair.tok)}"


@pytest.mark.parametrize("pair", MODELS, indirect=True)
def test_vocabulary_and_specials(pair):
    tok, llama = pair.tok, pair.llama
    lc = pair.lc
    assert tok.n_vocab == llama.n_vocab()
    bos = lc.llama_vocab_bos(pair.vocab)
    eos = lc.llama_vocab_eos(pair.vocab)
    assert tok.bos_id == (None if bos < 0 else bos)
    assert tok.eos_id == (None if eos < 0 else eos)
    assert tok.add_bos == bool(lc.llama_vocab_get_add_bos(pair.vocab))
    assert tok.add_eos == bool(lc.llama_vocab_get_add_eos(pair.vocab))
    for t in range(tok.n_vocab):
        for special in (False, True):
            assert tok.token_to_piece(t, special) == pair.ref_piece(t, special), (t, special)
        assert tok.token_to_piece(t) == tok.token_to_piece(t, False)


@pytest.mark.parametrize("pair", MODELS, indirect=True)
def test_detokenize(pair):
    tok = pair.tok
    rng = np.random.default_rng(0)
    sequences = [tok.tokenize(t, add_special=True, parse_special=True).tolist() for t in TRICKY]
    sequences += [rng.integers(0, tok.n_vocab, n).tolist() for n in (1, 2, 5, 50, 300)]
    sequences += [[tok.bos_id or 0, tok.eos_id or 0], []]
    for ids in sequences:
        for remove_special in (False, True):
            for unparse_special in (False, True):
                ref = pair.ref_detokenize(ids, remove_special, unparse_special)
                assert tok.detokenize_bytes(ids, remove_special, unparse_special) == ref, ids
                assert tok.detokenize(ids, remove_special, unparse_special) == ref.decode("utf-8", "replace")
    # round trip
    text = "The quick brown fox, it's 12345 ünïcödé 日本 🎉!\n\tdone"
    assert tok.detokenize(tok.tokenize(text, add_special=False)) == text


def _variant(source: ModelSource, path: Path, changes: dict, tokens: dict[int, tuple[str, int]] | None = None):
    """`source`'s metadata (no tensors: llama.cpp's vocab_only needs none) with keys changed
    (None: removed) and tokens renamed (id -> (text, token type)); written to `path`."""
    changes = dict(changes)
    if tokens:
        texts = list(source.get("tokenizer.ggml.tokens"))
        types = list(source.get("tokenizer.ggml.token_type"))
        for tid, (text, ttype) in tokens.items():
            texts[tid], types[tid] = text, ttype
        changes["tokenizer.ggml.tokens"] = texts
        changes["tokenizer.ggml.token_type"] = types
    kv = []
    for k in source.kv:
        if k.key in changes:
            v = changes.pop(k.key)
            if v is not None:
                kv.append(KV(k.key, v, k.type, k.sub_type))
        else:
            kv.append(k)
    for key, v in changes.items():
        if v is not None:
            kv.append(KV(key, v, GGUFValueType.BOOL if isinstance(v, bool) else GGUFValueType.STRING))
    src = ModelSource(source.arch, kv, [])
    write_gguf(src, path, progress=False)
    return src


def _check_pair(p: Pair, texts: list[str], pieces: Iterable[int] = ()):
    tok = p.tok
    assert (tok.bos_id, tok.add_bos, tok.add_eos) == (
        None if p.lc.llama_vocab_bos(p.vocab) < 0 else p.lc.llama_vocab_bos(p.vocab),
        bool(p.lc.llama_vocab_get_add_bos(p.vocab)), bool(p.lc.llama_vocab_get_add_eos(p.vocab)))
    bad = []
    for text in texts:
        for add_special in (True, False):
            for parse_special in (False, True):
                got = tok.tokenize(text, add_special, parse_special)
                ref = p.ref(text, add_special, parse_special)
                if not np.array_equal(got, ref):
                    bad.append(f"{text[:80]!r} add_special={add_special} parse_special={parse_special}: "
                               f"{_diff(got, ref, tok)}")
    assert not bad, "\n".join(bad[:10])
    for t in pieces:
        for special in (False, True):
            assert tok.token_to_piece(t, special) == p.ref_piece(t, special), (t, special)
    for text in texts[:40]:
        ids = tok.tokenize(text, True, True).tolist()
        for flags in ((False, False), (True, True)):
            assert tok.detokenize_bytes(ids, *flags) == p.ref_detokenize(ids, *flags), text


# one pre-tokenizer name per distinct setup (splitters, merges, BOS, clean-up); every name of
# BPE_PRE_TOKENIZERS has been checked the same way (the SmolLM2 vocabulary, these texts)
PRE_REPRESENTATIVES = ["default", "gpt-2", "trillion", "starcoder", "smollm", "llama-bpe", "dbrx",
                       "chatglm-bpe", "glm4", "qwen2", "stablelm2", "qwen35", "falcon", "laguna",
                       "bloom", "poro-chat", "viking", "gpt-4o", "tekken"]


def _setup(name: str):
    return tuple(sorted((k, str(v)) for k, v in BPE_PRE_TOKENIZERS[name].items()))


def test_pre_representatives_cover_every_setup():
    assert {_setup(n) for n in PRE_REPRESENTATIVES} == {_setup(n) for n in BPE_PRE_TOKENIZERS}
    assert len({_setup(n) for n in PRE_REPRESENTATIVES}) == len(PRE_REPRESENTATIVES)


@pytest.mark.parametrize("pre", PRE_REPRESENTATIVES)
def test_pre_tokenizers(pre, llama_cpp, smollm2_source, texts, tmp_path):
    """Each pre-tokenizer over SmolLM2's vocabulary: the splitters, ignore_merges, add_bos."""
    src = _variant(smollm2_source, tmp_path / "v.gguf", {"tokenizer.ggml.pre": pre})
    p = Pair(llama_cpp, src, tmp_path / "v.gguf")
    try:
        _check_pair(p, TRICKY + [texts["wiki.test.raw"][:40_000]])
    finally:
        p.llama.close()


def test_special_token_fixups(llama_cpp, smollm2_source, tmp_path):
    """llama.cpp's token attribute fix-ups by text (end-of-generation and FIM tokens become
    control tokens, gpt-oss's channel tokens user-defined, <|end|> and </s> demoted) and the
    LSTRIP of jina-v2's <mask>."""
    renamed = {3: ("<|return|>", 3), 4: ("<|call|>", 3), 5: ("<|end|>", 3), 6: ("<|channel|>", 3),
               7: ("</s>", 3), 8: ("<|tool_response>", 3), 9: ("<mask>", 4), 10: ("<|message|>", 4),
               49151: ("<|fim_prefix|>", 1), 49150: ("<EOT>", 1), 49149: ("<|unused_0|>", 3),
               49148: ("<|eom_id|>", 4)}
    src = _variant(smollm2_source, tmp_path / "v.gguf", {"tokenizer.ggml.pre": "jina-v2-de"}, renamed)
    p = Pair(llama_cpp, src, tmp_path / "v.gguf")
    try:
        texts = ["a <|return|> b<|call|>c <|end|>\n<|channel|>x</s> y <|tool_response>",
                 "one  <mask> two\n\t<mask>three <mask>", "<|message|> <|fim_prefix|>def<EOT> <|unused_0|>",
                 "<|eom_id|><|end|></s>", *TRICKY]
        _check_pair(p, texts, pieces=[*renamed, 0, 1, 2, 100])
    finally:
        p.llama.close()


@pytest.mark.parametrize("changes", [
    {"tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False,
     "tokenizer.ggml.add_eos_token": True},
    {"tokenizer.ggml.add_bos_token": None, "tokenizer.ggml.add_eos_token": None,
     "tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.scores": None},
], ids=["flags", "defaults"])
def test_spm_settings(changes, llama_cpp, tmp_path):
    """SentencePiece with the space prefix off and EOS added; and with llama.cpp's defaults."""
    src = _variant(load_hf_model(TINY_LLAMA), tmp_path / "v.gguf", changes)
    p = Pair(llama_cpp, src, tmp_path / "v.gguf")
    try:
        _check_pair(p, TRICKY)
    finally:
        p.llama.close()


def test_gemma_sized_spm_vocabulary(llama_cpp, texts, tmp_path):
    """SentencePiece over a 262,144-token vocabulary, Gemma's size (the one of llama.cpp's
    models/ggml-vocab-gemma-4.gguf: its tokens, scores and types, with Gemma's settings, no
    space prefix, BOS added), run as llama.cpp's SPM tokenizer: the same ids on the corner
    cases and a slice of every shared text."""
    from kquant.files.gguf_read import load_gguf as read

    path = llama_cpp_file("models/ggml-vocab-gemma-4.gguf")
    if path is None:
        pytest.skip("llama.cpp's ggml-vocab-gemma-4.gguf (llama-cpp-python sdist) not available")
    have = {kv.key: kv for kv in read(path).kv}
    kv = [KV("general.architecture", "llama", GGUFValueType.STRING),
          KV("tokenizer.ggml.model", "llama", GGUFValueType.STRING)]
    kv += [have[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type", "bos_token_id", "eos_token_id",
                                                 "unknown_token_id", "padding_token_id", "add_space_prefix",
                                                 "add_bos_token")]
    assert len(have["tokenizer.ggml.tokens"].value) == 262144
    src = ModelSource("llama", kv, [])
    write_gguf(src, tmp_path / "v.gguf", progress=False)
    p = Pair(llama_cpp, src, tmp_path / "v.gguf")
    try:
        _check_pair(p, TRICKY + [t[:100_000] for t in texts.values()], pieces=range(0, 262144, 997))
    finally:
        p.llama.close()


def _meta(**kw):
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "gpt-2"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def test_unsupported_models_are_clear_errors():
    with pytest.raises(ModelError, match="unsupported tokenizer model 'bert'"):
        Tokenizer.from_metadata(_meta(**{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(ModelError, match="unsupported pre-tokenizer 'deepseek-llm'"):
        Tokenizer.from_metadata(_meta(**{"tokenizer.ggml.pre": "deepseek-llm"}))
    with pytest.raises(ModelError, match="no tokenizer"):
        Tokenizer.from_metadata({})
    with pytest.raises(ModelError, match="no merges"):
        Tokenizer.from_metadata(_meta(**{"tokenizer.ggml.merges": None}))
    tok = Tokenizer.from_metadata(_meta())
    assert tok.tokenize("abba", add_special=False).tolist() == [2, 1, 0]
    assert tok.bos_id is None and not tok.add_bos  # BPE default id 11 is out of range
