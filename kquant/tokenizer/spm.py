"""SentencePiece BPE: llama.cpp's llm_tokenizer_spm_session.

llama.cpp merges over a whole text fragment at once: every adjacent pair of symbols whose
concatenation is a token is a candidate, the best score merges first (the leftmost among equal
scores), until no candidate is left; symbols that are not tokens become byte tokens.

A merged symbol is always a token, so no symbol can ever span two adjacent characters a, b when
no token contains "ab".  The text is cut at every such place and each piece merged on its own
(the merges of one piece never affect another's, and their order within a piece is the same), so
pieces can be cached: for ordinary text they are about words.
"""
from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .merge import merge_symbols, symbol_ids
from .unicode import codepoints

_CACHE_LIMIT = 1 << 20


class SPM:
    def __init__(self, tokens: list[str], token_to_id: dict[str, int], scores: list[float]):
        self.token_to_id = token_to_id
        self.scores = scores
        pairs = set()
        for t in tokens:
            for a, b in zip(t, t[1:]):
                pairs.add((ord(a) << 21) | ord(b))
        self.pairs = np.array(sorted(pairs), dtype=np.int64)
        self.cache: dict[str, tuple[int, ...]] = {}

    def tokenize(self, text: str, out: list[int]) -> None:
        """Append the tokens of `text` (already prefixed and with spaces escaped) to `out`."""
        n = len(text)
        if n == 0:
            return
        cache = self.cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        cuts = [0]
        if n > 1 and self.pairs.size:
            cp = codepoints(text)
            code = (cp[:-1] << 21) | cp[1:]
            idx = np.searchsorted(self.pairs, code)
            idx[idx == self.pairs.size] = 0
            cuts += (np.flatnonzero(self.pairs[idx] != code) + 1).tolist()
        elif n > 1:
            cuts += range(1, n)
        cuts.append(n)
        for i in range(len(cuts) - 1):
            piece = text[cuts[i]:cuts[i + 1]]
            ids = cache.get(piece)
            if ids is None:
                ids = cache[piece] = self.piece(piece)
            out.extend(ids)

    def piece(self, text: str) -> tuple[int, ...]:
        t2id = self.token_to_id
        scores = self.scores
        syms = list(text)

        def priority(a, b):  # the best score first
            tid = t2id.get(a + b)
            return None if tid is None else -scores[tid]

        merge_symbols(syms, priority)
        return symbol_ids(syms, t2id, _byte_tokens)


def _byte_tokens(t2id: dict[str, int], s: str, out: list[int]) -> None:
    """Resegment: a symbol that is not a token is a single character; as bytes."""
    for b in s.encode("utf-8"):
        tid = t2id.get(f"<0x{b:02X}>")
        if tid is None:
            tid = t2id.get(chr(b) if b < 128 else chr(0xDC00 + b))
        if tid is None:
            raise ModelError(f"cannot tokenize {s!r}: the vocabulary has no token for byte 0x{b:02X}")
        out.append(tid)
