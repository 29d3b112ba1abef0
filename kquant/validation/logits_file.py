"""llama-perplexity's logits file (--kl-divergence-base): the base model's log-probabilities.

With a logits file (`--kl-divergence-base F` of a base model), the same pass also saves, for every
scored token, the base model's log-probabilities compressed to uint16 in llama-perplexity's own
format (byte for byte the same layout, so either tool reads the other's file):

    "_logits_"  int32 n_ctx  int32 n_vocab  int32 n_chunk  int32 tokens[n_chunk * n_ctx]
    per chunk, per scored token (n_ctx - 1 - n_ctx/2 of them), nv = 2 * ((n_vocab + 1) / 2) + 4
    uint16 values:  float32 scale, float32 min_log_prob, n_vocab uint16 q (+ 1 zero pad if odd)
    log p[i] = scale * q[i] + min_log_prob   (logits below max - 16 stored as q = 0)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numba import njit, prange

from ..errors import ModelError
from ..files.atomic import check_writable, commit, temporary_beside

F32 = np.float32
LOGITS_MAGIC = b"_logits_"
HEADER_BYTES = 8 + 3 * 4


@njit(parallel=True, cache=True)
def compress_log_probs(logits, targets, out16, out32):
    """log_softmax(n_vocab, logits, log_prob, tok) for every row: writes the row's compressed
    log-probabilities into out16[r] (out32 is the float32 view of the same memory, for the scale
    and minimum), returns the float32 nll of the target as llama.cpp computes it in this mode."""
    rows, n = logits.shape
    nll = np.empty(rows, np.float64)
    for r in prange(rows):
        row = logits[r]
        mx = row[0]
        mn = row[0]
        for i in range(1, n):
            mx = max(mx, row[i])
            mn = min(mn, row[i])
        mn = max(mn, F32(mx - F32(16.0)))
        s = 0.0
        for i in range(n):
            s += np.exp(F32(row[i] - mx))
        lse = F32(np.log(s))
        min_log_prob = F32(F32(mn - mx) - lse)
        scale = F32(F32(mx - mn) / F32(65535.0))
        out32[r, 0] = scale
        out32[r, 1] = min_log_prob
        if scale != F32(0.0):
            inv = F32(F32(1.0) / scale)
            for i in range(n):
                if row[i] > mn:
                    # nearest_int: + 1.5 * 2^23 in float32 rounds to the nearest, ties to even
                    out16[r, 4 + i] = np.uint16(np.rint(F32(inv * F32(row[i] - mn))))
                else:
                    out16[r, 4 + i] = 0
        else:
            for i in range(n):
                out16[r, 4 + i] = 0
        for i in range(4 + n, out16.shape[1]):
            out16[r, i] = 0
        nll[r] = F32(F32(mx + lse) - row[targets[r]])
    return nll


def row_values(n_vocab: int) -> int:
    """uint16 values per token in a logits file: scale and minimum (2 floats), then n_vocab
    values, padded to an even count."""
    return 2 * ((n_vocab + 1) // 2) + 4


@dataclass
class BaseLogits:
    """A logits file of llama-perplexity's format (--kl-divergence-base), memory-mapped."""

    path: str
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray  # int32 (n_chunk * n_ctx,)
    log_probs: np.ndarray  # uint16 (n_chunk, n_ctx - 1 - n_ctx/2, row_values(n_vocab))

    @property
    def n_scored(self) -> int:
        return self.n_ctx - 1 - self.n_ctx // 2

    @classmethod
    def open(cls, path: str | Path) -> "BaseLogits":
        p = Path(path)
        try:
            size = p.stat().st_size
            with open(p, "rb") as f:
                head = f.read(HEADER_BYTES)
        except OSError as e:
            raise ModelError(f"failed to open {path} ({e.strerror})") from None
        if len(head) < 8 or head[:8] != LOGITS_MAGIC:
            raise ModelError(f"{path} does not look like a file containing log-probabilities")
        if len(head) < HEADER_BYTES:
            raise ModelError(f"failed reading n_vocab, n_chunk from {path}")
        n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(head, "<i4", 3, 8))
        if n_ctx < 3 or n_vocab <= 0 or n_chunk <= 0:
            raise ModelError(f"{path}: invalid header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk})")
        nv = row_values(n_vocab)
        n_scored = n_ctx - 1 - n_ctx // 2
        tok_bytes = 4 * n_ctx * n_chunk
        want = HEADER_BYTES + tok_bytes + 2 * n_chunk * n_scored * nv
        if size < HEADER_BYTES + tok_bytes:
            raise ModelError(f"failed reading evaluation tokens from {path}")
        if size != want:
            have = (size - HEADER_BYTES - tok_bytes) // (2 * n_scored * nv)
            raise ModelError(f"{path}: {size} bytes where {n_chunk} chunks of n_ctx {n_ctx} and n_vocab "
                             f"{n_vocab} take {want}" + (f" (log-probs for only {have} chunks: truncated?)"
                                                         if size < want else ""))
        tokens = np.fromfile(p, "<i4", n_ctx * n_chunk, offset=HEADER_BYTES).astype(np.int32)
        log_probs = np.memmap(p, np.dtype("<u2"), "r", HEADER_BYTES + tok_bytes, (n_chunk, n_scored, nv))
        return cls(str(p), n_ctx, n_vocab, n_chunk, tokens, log_probs)


class LogitsWriter:
    """Writes a logits file as llama-perplexity does, to a temporary file renamed into place
    by `close()` (a failed run leaves no partial file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_writable(self.path)
        try:
            self._tmp = temporary_beside(self.path)
        except OSError as e:
            raise ModelError(f"failed to open {path} for writing ({e.strerror})") from None
        self._f: BinaryIO = open(self._tmp, "wb")
        self.bytes = 0

    def write(self, data: bytes | np.ndarray) -> None:
        b = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
        self._f.write(b)
        self.bytes += len(b)

    def header(self, n_ctx: int, n_vocab: int, n_chunk: int, tokens: np.ndarray) -> None:
        self.write(LOGITS_MAGIC)
        self.write(np.array([n_ctx, n_vocab, n_chunk], "<i4"))
        self.write(np.asarray(tokens[:n_chunk * n_ctx], "<i4"))

    def close(self) -> None:
        self._f.close()
        commit(self._tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)
