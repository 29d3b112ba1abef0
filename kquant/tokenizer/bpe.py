"""Byte-level BPE: llama.cpp's llm_tokenizer_bpe_session, one pre-tokenized word at a time."""
from __future__ import annotations

import numpy as np

from . import pretokenize
from .merge import merge_symbols, symbol_ids
from .unicode import byte_encode, codepoints, flags_of

_CACHE_LIMIT = 1 << 20


class BPE:
    """Merges by rank (lowest first, then leftmost), as llm_tokenizer_bpe_session.

    Results are cached per pre-tokenized word: a word's tokens depend on that word only.
    """

    def __init__(self, token_to_id: dict[str, int], merges: list[str], steps, ignore_merges: bool):
        self.token_to_id = token_to_id
        self.steps = steps
        self.ignore_merges = ignore_merges
        ranks: dict[tuple[str, str], int] = {}
        for i, m in enumerate(merges):
            pos = m.find(" ", 1)
            pair = (m[:pos], m[pos + 1:]) if pos >= 0 else ("", "")
            ranks.setdefault(pair, i)
        self.ranks = ranks
        self.cache: dict[str, tuple[int, ...]] = {}

    def tokenize(self, text: str, out: list[int]) -> None:
        """Append the tokens of one raw text fragment to `out`."""
        cp = codepoints(text)
        lengths = pretokenize.split(cp, flags_of(cp), self.steps)
        cache = self.cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        start = 0
        for end in np.cumsum(lengths).tolist():
            word = text[start:end]
            start = end
            ids = cache.get(word)
            if ids is None:
                ids = cache[word] = self.word(byte_encode(word))
            out.extend(ids)

    def word(self, word: str) -> tuple[int, ...]:
        """The tokens of one byte-encoded word."""
        t2id = self.token_to_id
        if self.ignore_merges:
            tid = t2id.get(word)
            if tid is not None:
                return (tid,)
        syms = list(word)
        ranks = self.ranks
        merge_symbols(syms, lambda a, b: ranks.get((a, b)))
        return symbol_ids(syms, t2id, _byte_tokens)


def _byte_tokens(t2id: dict[str, int], s: str, out: list[int]) -> None:
    """A symbol with no token: each of its bytes as a one-byte token, where there is one."""
    for b in s.encode("utf-8", "surrogateescape"):
        tid = t2id.get(chr(b) if b < 128 else chr(0xDC00 + b))
        if tid is not None:
            out.append(tid)
