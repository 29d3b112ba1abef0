"""Tokenization identical to llama.cpp's `llama_tokenize`, from a model's GGUF tokenizer metadata.

    tok = Tokenizer.from_source(load_gguf("model.gguf"))     # or load_hf_model(folder)
    ids = tok.tokenize(text)                                  # np.int32, == llama_tokenize(vocab, text, True, False)

A port of llama.cpp's src/llama-vocab.cpp (vocabulary loading: token attributes, special token
ids and their defaults, the add-BOS/EOS rules, the special-token fixups; `tokenizer_st_partition`;
the SPM and BPE sessions; token_to_piece, detokenize) and src/unicode.cpp (the pre-tokenizers).
Supported: tokenizer model "llama" (SentencePiece) and "gpt2" (byte-level BPE) with the
pre-tokenizers in `BPE_PRE_TOKENIZERS`; anything else is a ModelError.

Speed: BPE results are cached per pre-tokenized word and SPM results per piece (see spm.py), the
pre-tokenizers are Numba kernels (compiled once, a few seconds, then cached on disk): about 0.5 s
for the 1.3 MB wiki.test.raw, faster than llama.cpp itself.

Where this could differ from llama.cpp (not seen on any vocabulary or text tested):
- special tokens of equal byte length are ordered by llama.cpp's std::sort (not stable), here by
  id; it only matters where two such tokens overlap in the text;
- FIM tokens found by their text (no tokenizer.ggml.fim_*_token_id) become control tokens: in
  llama.cpp the first of each kind in hash order, here all of them;
- code points assigned after Unicode 15.1 (llama.cpp's table) are "undefined" in llama.cpp, but
  get their category here with a Python whose unicodedata is newer (3.14: Unicode 16.0).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from ..errors import ModelError
from . import pretokenize
from .bpe import BPE
from .spm import SPM
from .unicode import UNICODE_TO_BYTE

__all__ = ["Tokenizer", "BPE_PRE_TOKENIZERS"]

# llama_token_type (GGUF tokenizer.ggml.token_type) -> llama_token_attr
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
_TYPE_TO_ATTR = {0: ATTR_UNDEFINED, 1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL,
                 4: ATTR_USER_DEFINED, 5: ATTR_UNUSED, 6: ATTR_BYTE}


def _pre(steps: str, clean_spaces: bool = True, ignore_merges: bool = False, add_bos: bool = False,
         no_bos: bool = False) -> dict:
    return dict(steps=pretokenize.PRE_TYPE_STEPS[steps], clean_spaces=clean_spaces,
                ignore_merges=ignore_merges, add_bos=add_bos, no_bos=no_bos)


def _pres(names: str, **kw) -> dict:
    return {n: _pre(**kw) for n in names.split()}


# tokenizer.ggml.pre -> how llama.cpp's llama_vocab::impl::load and llm_tokenizer_bpe set it up
BPE_PRE_TOKENIZERS: dict[str, dict] = {
    **_pres("default", steps="default"),
    **_pres("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
            steps="llama3", ignore_merges=True, add_bos=True),
    **_pres("falcon", steps="falcon"),
    **_pres("mpt olmo jais exaone4 gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 "
            "mellum modern-bert jina-v1-en jina-v2-code roberta-bpe", steps="gpt2"),
    **_pres("trillion granite-docling", steps="gpt2", clean_spaces=False),
    **_pres("starcoder refact codeshell exaone minerva-7b mellum2", steps="starcoder"),
    **_pres("command-r smollm", steps="starcoder", clean_spaces=False),
    **_pres("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open grok-2", steps="qwen2",
            clean_spaces=False),
    **_pres("stablelm2 megrez", steps="qwen2"),
    **_pres("qwen35", steps="qwen35", clean_spaces=False),
    **_pres("gpt-4o llama4 kanana2 talkie minimax-m2", steps="gpt4o", clean_spaces=False),
    **_pres("tekken", steps="tekken", clean_spaces=False, ignore_merges=True, add_bos=True),
    **_pres("dbrx smaug-bpe", steps="llama3"),
    **_pres("chatglm-bpe", steps="llama3", no_bos=True),
    **_pres("glm4 glm5", steps="llama3", no_bos=True, ignore_merges=True),
    **_pres("laguna", steps="laguna", clean_spaces=False),
    **_pres("bloom gpt3-finnish", steps="bloom"),
    **_pres("poro-chat", steps="bloom", clean_spaces=False),
    **_pres("viking", steps="viking", clean_spaces=False),
}

# tokens llama.cpp treats as control tokens by their text (llama_vocab::impl::load)
_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~["])
_FIM_TEXTS = {
    "fim_pre": ["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"],
    "fim_suf": ["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"],
    "fim_mid": ["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"],
    "fim_pad": ["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    "fim_rep": ["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"],
    "fim_sep": ["<|file_sep|>"],
}
_EOT_TEXTS = ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"]

# special token ids read from the metadata, in llama.cpp's order (the deprecated keys last)
_SPECIAL_KEYS = [("bos", "bos"), ("eos", "eos"), ("eot", "eot"), ("eom", "eom"), ("unk", "unknown"),
                 ("sep", "seperator"), ("pad", "padding"), ("mask", "mask"),
                 ("fim_pre", "fim_pre"), ("fim_suf", "fim_suf"), ("fim_mid", "fim_mid"),
                 ("fim_pad", "fim_pad"), ("fim_rep", "fim_rep"), ("fim_sep", "fim_sep"),
                 ("fim_pre", "prefix"), ("fim_suf", "suffix"), ("fim_mid", "middle")]

_C_SPACE = " \t\n\v\f\r"  # C isspace


class Tokenizer:
    """A model's tokenizer, as llama.cpp loads it from the GGUF metadata."""

    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool

    @classmethod
    def from_source(cls, source) -> "Tokenizer":
        """From a kquant.files.source.ModelSource (a GGUF file or a Hugging Face folder)."""
        return cls.from_metadata(source.get)

    @classmethod
    def from_metadata(cls, get: Callable[[str], Any] | dict) -> "Tokenizer":
        """From GGUF metadata: a dict or a `get(key)` returning None for a missing key."""
        if isinstance(get, dict):
            get = get.get
        return cls(get)

    def __init__(self, get: Callable[[str], Any]):
        def meta(key: str, default: Any = None) -> Any:
            v = get("tokenizer.ggml." + key)
            return default if v is None else v

        model = meta("model")
        if model is None:
            raise ModelError("the model has no tokenizer (no tokenizer.ggml.model in its metadata)")
        pre = meta("pre")
        ids = {k: None for k, _ in _SPECIAL_KEYS}
        if model == "llama":
            self.kind = "spm"
            ids.update(bos=1, eos=2, unk=0)
            self.add_space_prefix, self.clean_spaces, add_bos = True, False, True
        elif model == "gpt2":
            self.kind = "bpe"
            if get("tokenizer.ggml.merges") is None:
                raise ModelError("the model's BPE tokenizer has no merges (tokenizer.ggml.merges)")
            ids.update(bos=11, eos=11)
            pre_name = "default" if not pre else pre
            setup = BPE_PRE_TOKENIZERS.get(pre_name)
            if setup is None:
                raise ModelError(f"unsupported pre-tokenizer {pre_name!r} (tokenizer.ggml.pre); kquant's "
                                 f"tokenizer supports: {', '.join(sorted(BPE_PRE_TOKENIZERS))}")
            self.add_space_prefix, self.clean_spaces, add_bos = False, setup["clean_spaces"], setup["add_bos"]
            if setup["no_bos"]:
                ids["bos"] = None
        else:
            raise ModelError(f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); kquant's "
                             "tokenizer supports 'llama' (SentencePiece) and 'gpt2' (BPE)")
        self.model = model
        self.pre = pre
        add_eos = False
        self.add_space_prefix = bool(meta("add_space_prefix", self.add_space_prefix))

        tokens = meta("tokens")
        if tokens is None:
            raise ModelError("the model has no vocabulary (tokenizer.ggml.tokens)")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        n = len(tokens)
        scores = meta("scores")
        scores = [float(s) for s in scores] if scores is not None else [0.0] * n
        types = meta("token_type")
        attrs = ([_TYPE_TO_ATTR.get(int(t), ATTR_UNDEFINED) for t in types[:n]] if types is not None
                 else [ATTR_NORMAL] * n)
        if len(scores) < n or len(attrs) < n:
            raise ModelError("tokenizer.ggml.scores / token_type are shorter than the vocabulary")
        t2id = {t: i for i, t in enumerate(tokens)}
        self.tokens, self.scores, self.attrs, self.token_to_id = tokens, scores, attrs, t2id
        self.n_vocab = n

        # special token ids: defaults out of range are disabled, then the metadata's (if in range)
        for name, key in _SPECIAL_KEYS:
            if ids[name] is not None and ids[name] >= n:
                ids[name] = None
            v = get(f"tokenizer.ggml.{key}_token_id")
            if v is not None and 0 <= int(v) < n:
                ids[name] = int(v)
        v = meta("add_bos_token")
        add_bos = bool(v) if v is not None else add_bos
        v = meta("add_eos_token")
        add_eos = bool(v) if v is not None else add_eos

        # control-looking tokens by their text (eot, eom, fim, end-of-generation)
        if ids["eot"] is None:
            for text in _EOT_TEXTS:
                if text in t2id:
                    ids["eot"] = t2id[text]  # all of these are end-of-generation texts too
                    break
        if ids["eom"] is None and "<|eom_id|>" in t2id:
            ids["eom"] = t2id["<|eom_id|>"]
        for name, texts in _FIM_TEXTS.items():
            if ids[name] is None:
                found = [t2id[t] for t in texts if t in t2id]
                for tid in found:  # llama.cpp takes the first in hash order; all, here
                    attrs[tid] |= ATTR_CONTROL
                if found:
                    ids[name] = found[0]
        for t, tid in t2id.items():
            if attrs[tid] & ATTR_CONTROL and not attrs[tid] & ATTR_UNUSED and "unused" in t:
                attrs[tid] |= ATTR_UNUSED
        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for text in _EOG_TEXTS:
            tid = t2id.get(text)
            if tid is not None:
                eog.add(tid)
                attrs[tid] |= ATTR_CONTROL
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            if text in t2id:
                attrs[t2id[text]] = ATTR_USER_DEFINED
        eog |= {ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None}
        eog_texts = {tokens[i]: i for i in eog if 0 <= i < n}
        has = eog_texts.__contains__
        if (has("<|end|>") and ((has("<|return|>") and (has("<|call|>") or has("<|calls|>")))
                                or ((has("<|call|>") or has("<|calls|>")) and has("<|flush|>")))):
            eog.discard(eog_texts["<|end|>"])
            attrs[eog_texts["<|end|>"]] = ATTR_USER_DEFINED
        if has("</s>") and (has("<|tool_response>") or has("<|plamo:eos|>")):
            eog.discard(eog_texts["</s>"])
            attrs[eog_texts["</s>"]] = ATTR_NORMAL
        self.eog_ids = frozenset(eog)

        # special tokens cache: longest text first (llama.cpp's std::sort; this sort is stable)
        special = [i for i in range(n) if attrs[i] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
        special.sort(key=lambda i: -len(tokens[i].encode("utf-8", "surrogateescape")))
        self._pieces_attrs = list(attrs)  # attributes as the piece cache is built
        self._piece_cache: dict[int, bytes] = {}

        # per-token attributes set by model / tokenizer / architecture name
        name = (get("general.name") or "").lower()
        arch = get("general.architecture") or ""
        if any(s in (pre or "") for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
                any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
            if "<mask>" in t2id:
                attrs[t2id["<mask>"]] |= ATTR_LSTRIP
        elif "phi-3" in name or "phi3" in name:
            for tid in special:
                attrs[tid] |= ATTR_RSTRIP
            if "</s>" in t2id:
                attrs[t2id["</s>"]] |= ATTR_RSTRIP
            for text in ("<unk>", "<s>", "<|endoftext|>"):
                if text in t2id:
                    attrs[t2id[text]] &= ~ATTR_RSTRIP
        elif "modern-bert" in name:
            if "[MASK]" in t2id:
                attrs[t2id["[MASK]"]] |= ATTR_LSTRIP
        self._special = [(tid, tokens[tid], attrs[tid]) for tid in special]

        self.special_ids = ids
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.unk_id = ids["unk"]
        self.add_bos, self.add_eos = add_bos, add_eos
        if self.kind == "spm":
            self._model = SPM(tokens, t2id, scores)
        else:
            self._model = BPE(t2id, list(get("tokenizer.ggml.merges")), setup["steps"],
                              setup["ignore_merges"])

    # ----------------------------------------------------------------------------------------
    # tokenize

    def _partition(self, text: str, parse_special: bool) -> list:
        """llama.cpp's tokenizer_st_partition: raw text as (start, end) pieces, tokens as ints."""
        frags: list = [(0, len(text))]
        for tid, tt, attr in self._special:
            if not parse_special and attr & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue
            if tt not in text:
                continue
            lstrip = attr & ATTR_LSTRIP
            rstrip = attr & ATTR_RSTRIP
            size = len(tt)
            new: list = []
            for frag in frags:
                if isinstance(frag, int):
                    new.append(frag)
                    continue
                off, end = frag
                while True:
                    m = text.find(tt, off, end)
                    if m < 0:
                        new.append((off, end))
                        break
                    if m > off:
                        left_end = m
                        if lstrip:
                            while left_end > off and text[left_end - 1] in _C_SPACE:
                                left_end -= 1
                        if left_end > off:
                            new.append((off, left_end))
                    new.append(tid)
                    off = m + size
                    if off >= end:
                        break
                    if rstrip:
                        while off < end and text[off] in _C_SPACE:
                            off += 1
                        if off >= end:
                            break
            frags = new
        return frags

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        """The token ids of `text`: llama_tokenize(vocab, text, add_special, parse_special)."""
        out: list[int] = []
        frags = self._partition(text, parse_special) if text else []
        model = self._model
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise ModelError("the tokenizer adds a BOS token but the model has none")
            out.append(self.bos_id)
        if self.kind == "spm":
            prev_special = True  # prefix with a space if the first fragment is text
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                piece = text[frag[0]:frag[1]]
                if self.add_space_prefix and prev_special:
                    piece = " " + piece
                model.tokenize(piece.replace(" ", "\u2581"), out)
                prev_special = False
        else:
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    model.tokenize(text[frag[0]:frag[1]], out)
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise ModelError("the tokenizer adds an EOS token but the model has none")
            out.append(self.eos_id)
        return np.array(out, dtype=np.int32)

    # ----------------------------------------------------------------------------------------
    # detokenize

    def _piece(self, token: int) -> bytes:
        """llama.cpp's token_to_piece cache entry (special=True)."""
        piece = self._piece_cache.get(token)
        if piece is not None:
            return piece
        text = self.tokens[token]
        attr = self._pieces_attrs[token]
        raw = text.encode("utf-8", "surrogateescape")
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            piece = raw
        elif attr & ATTR_NORMAL:
            if self.kind == "spm":
                piece = raw.replace("\u2581".encode(), b" ")
            else:
                piece = _decode_byte_level(text)
        elif attr & ATTR_BYTE:
            piece = bytes([_strtol_hex(text[3:5]) & 0xFF])
        else:
            piece = b""
        self._piece_cache[token] = piece
        return piece

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        """llama_token_to_piece(vocab, token, lstrip=0, special): the bytes the token stands for
        (control and unknown tokens: nothing, unless `special`)."""
        token = int(token)
        if not 0 <= token < self.n_vocab:
            raise IndexError(f"token id {token} out of range (vocabulary of {self.n_vocab})")
        if not special and self.attrs[token] & (ATTR_UNKNOWN | ATTR_CONTROL):
            return b""
        return self._piece(token)

    def detokenize_bytes(self, ids: Iterable[int], remove_special: bool = False,
                         unparse_special: bool = False) -> bytes:
        """llama_detokenize(vocab, ids, remove_special, unparse_special), as bytes."""
        ids = [int(t) for t in ids]
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts = []
        for t in ids:
            p = self.token_to_piece(t, unparse_special)
            if remove_space and p[:1] == b" ":
                p = p[1:]
            remove_space = False
            parts.append(p)
        text = b"".join(parts)
        return _clean_spaces(text) if self.clean_spaces else text

    def detokenize(self, ids: Iterable[int], remove_special: bool = False, unparse_special: bool = False) -> str:
        """The text of `ids` (llama_detokenize; invalid UTF-8 replaced by U+FFFD)."""
        return self.detokenize_bytes(ids, remove_special, unparse_special).decode("utf-8", "replace")

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos}, add_eos={self.add_eos})")


def _strtol_hex(s: str) -> int:
    v = 0
    for c in s:
        d = "0123456789abcdef".find(c.lower())
        if d < 0:
            break
        v = v * 16 + d
    return v


def _decode_byte_level(text: str) -> bytes:
    """llama.cpp's llama_decode_text: byte-level characters back to their bytes."""
    out = bytearray()
    for c in text:
        b = UNICODE_TO_BYTE.get(c)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + c.encode("utf-8", "surrogateescape").hex().encode() \
                + text.encode("utf-8", "surrogateescape") + b"]"
    return bytes(out)


def _clean_spaces(data: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces passes of llama_vocab::impl::detokenize."""
    text = bytearray(data)
    total = len(text)
    sp, ap = ord(" "), ord("'")
    # " ?", " !", " .", " ,"
    n = total
    total = 1 if n else 0
    for i in range(1, n):
        x = text[i]
        if text[i - 1] == sp and x in b"?!.,":
            total -= 1
        text[total] = x
        total += 1
    # " ' " -> "'"
    n = total
    total = 1 if n else 0
    i = 1
    while i < n:
        x = text[i]
        if x == ap and i + 1 < n and text[i - 1] == sp and text[i + 1] == sp:
            total -= 1
            i += 1
            text[i] = 0
        text[total] = x
        total += 1
        i += 1
    # " 's", " 'm", " 're", " 've"
    n = total
    total = 1 if n else 0
    for i in range(1, n):
        x = text[i]
        if text[i - 1] == sp and x == ap and i + 1 < n:
            x1 = text[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < n:
                x2 = text[i + 2]
                if (x1, x2) in ((ord("r"), ord("e")), (ord("v"), ord("e"))):
                    total -= 1
        text[total] = x
        total += 1
    return bytes(text[:total])
