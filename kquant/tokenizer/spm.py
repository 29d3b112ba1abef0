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

from heapq import heapify, heappop, heappush

import numpy as np

from ..errors import ModelError
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
        n = len(syms)
        if n > 1:
            heap = []
            for i in range(n - 1):
                tid = t2id.get(syms[i] + syms[i + 1])
                if tid is not None:
                    heap.append((-scores[tid], i, i + 1, 2))
            heapify(heap)
            nxt = list(range(1, n + 1))
            nxt[-1] = -1
            prv = list(range(-1, n - 1))
            while heap:
                _, left, right, size = heappop(heap)
                a = syms[left]
                b = syms[right]
                if not a or not b or len(a) + len(b) != size:
                    continue  # outdated
                merged = a + b
                syms[left] = merged
                syms[right] = ""
                after = nxt[right]
                nxt[left] = after
                if after >= 0:
                    prv[after] = left
                before = prv[left]
                if before >= 0:
                    tid = t2id.get(syms[before] + merged)
                    if tid is not None:
                        heappush(heap, (-scores[tid], before, left, len(syms[before]) + size))
                if after >= 0:
                    tid = t2id.get(merged + syms[after])
                    if tid is not None:
                        heappush(heap, (-scores[tid], left, after, size + len(syms[after])))
        out = []
        for s in syms:
            if not s:
                continue
            tid = t2id.get(s)
            if tid is not None:
                out.append(tid)
                continue
            # resegment: a symbol that is not a token is a single character; as bytes
            for b in s.encode("utf-8"):
                tid = t2id.get(f"<0x{b:02X}>")
                if tid is None:
                    tid = t2id.get(chr(b) if b < 128 else chr(0xDC00 + b))
                if tid is None:
                    raise ModelError(f"cannot tokenize {s!r}: the vocabulary has no token for byte 0x{b:02X}")
                out.append(tid)
        return tuple(out)
