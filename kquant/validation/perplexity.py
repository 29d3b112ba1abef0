"""Perplexity and KL divergence the way llama-perplexity computes them (tools/perplexity/perplexity.cpp).

Default mode (`perplexity`): the text is tokenized as llama.cpp tokenizes it (BOS first when the
model adds one), cut into chunks of n_ctx tokens, and n_batch / n_ctx chunks run as one batch of
sequences (each split into llama.cpp's physical batches), the first token of every chunk replaced
by BOS when the model adds one. Each chunk scores the second half of its window: the tokens at
positions n_ctx/2 + 1 .. n_ctx - 1, each predicted from everything before it in the chunk. The
running perplexity is printed after every chunk (`[1]x.xxxx,[2]...`) and the closing
`Final estimate: PPL = exp(mean nll) +/- ppl * sqrt(var(nll) / (count - 1))`.

With a logits file (`--kl-divergence-base F` of a base model), the same pass also saves, for every
scored token, the base model's log-probabilities compressed to uint16 in llama-perplexity's own
format (byte for byte the same layout, so either tool reads the other's file):

    "_logits_"  int32 n_ctx  int32 n_vocab  int32 n_chunk  int32 tokens[n_chunk * n_ctx]
    per chunk, per scored token (n_ctx - 1 - n_ctx/2 of them), nv = 2 * ((n_vocab + 1) / 2) + 4
    uint16 values:  float32 scale, float32 min_log_prob, n_vocab uint16 q (+ 1 zero pad if odd)
    log p[i] = scale * q[i] + min_log_prob   (logits below max - 16 stored as q = 0)

KL-divergence mode (`kl_divergence`) runs the file's tokens through the model under test and
compares with the stored base log-probabilities: per-chunk PPL(Q), ln(PPL(Q)/PPL(base)), KLD,
RMS Δp and top-token agreement, then llama-perplexity's statistics block.

Strided mode (`ppl_stride > 0`) is llama-perplexity's perplexity_v2, with its quirks: the window
is the context llama.cpp would create (padded to 256), and no BOS is put in front of a window.

The per-token arithmetic (float32 / double, glibc expf and logf, the uint16 rounding) is a port of
llama-perplexity's log_softmax functions, so the differences from llama.cpp come only from the
logits themselves.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from numba import njit, prange
from tqdm import tqdm

from ..calibration.imatrix import N_UBATCH, _ubatches, read_text
from ..runtime import Segment, Transformer
from ..runtime.device import to_host
from ..runtime.kernels import token_nll
from ..errors import ModelError

F32 = np.float32
LOGITS_MAGIC = b"_logits_"
HEADER_BYTES = 8 + 3 * 4

Log = Callable[[str], None]


def _stderr(s: str) -> None:
    print(s, file=sys.stderr)


def _nothing(s: str) -> None:
    pass


@dataclass
class PerplexityParams:
    """llama-perplexity's settings for its perplexity and KL-divergence modes, with its defaults."""

    n_ctx: int = 512
    n_batch: int = 2048
    n_chunks: int = -1  # -1: every chunk of the text (ignored by the KL-divergence mode, as in llama.cpp)
    ppl_stride: int = 0  # > 0: strided perplexity (perplexity_v2)
    ppl_output_type: int = 0  # 1: one line per chunk instead of [i]ppl,
    logits_file: str = ""  # --kl-divergence-base: written in perplexity mode, read with kl_divergence
    kl_divergence: bool = False


@dataclass
class PerplexityResult:
    n_chunks: int
    n_ctx: int
    n_tokens: int  # tokens run through the model
    n_scored: int  # tokens whose probability counts
    seconds: float  # forward passes and scoring, without loading and tokenizing
    ppl: float
    ppl_error: float | None  # None where llama.cpp reports a negative variance
    chunk_ppl: list[float]
    logits_file: str = ""


@dataclass
class KLDivergenceStats:
    """llama-perplexity's kl_divergence_result: running sums over the scored tokens."""

    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    max_p_diff: float = 0.0
    n_same_top: int = 0
    count: int = 0


@dataclass
class KLDivergenceResult:
    n_chunks: int
    n_ctx: int
    n_tokens: int
    seconds: float
    stats: KLDivergenceStats
    kld_values: np.ndarray  # float32, per scored token
    p_diff_values: np.ndarray  # float32, per scored token: p(Q) - p(base) of the actual next token
    chunk_lines: list[str] = field(default_factory=list)

    @property
    def ppl(self) -> float:
        return _mean_and_uncertainty(self.stats.sum_nll, self.stats.sum_nll2, self.stats.count)[0]

    def summary(self) -> dict[str, float]:
        """The figures of the statistics block, unrounded."""
        return _kld_figures(self.stats)

    def statistics(self) -> str:
        """llama-perplexity's closing statistics block ('' under 100 tokens, as it prints none)."""
        return format_kld_statistics(self.stats, self.kld_values, self.p_diff_values)


# --- per-token kernels: ports of perplexity.cpp's log_softmax variants ------------------------

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


@njit(parallel=True, cache=True)
def _kld_rows(logits, base16, base32, targets, nll, nll_base, kld, p_diff, same_top):
    """log_softmax(n_vocab, logits, base_log_prob, tok, kld) per row, the per-token values."""
    rows, n = logits.shape
    for r in prange(rows):
        row = logits[r]
        mx = row[0]
        imax = 0
        for i in range(1, n):
            if row[i] > mx:
                mx = row[i]
                imax = i
        s = 0.0
        for i in range(n):
            s += np.exp(F32(row[i] - mx))
        lse = F32(np.log(s))
        scale = base32[r, 0]
        mlp = base32[r, 1]
        t = targets[r]
        v = F32(F32(mx + lse) - row[t])
        vb = -F32(F32(scale * F32(base16[r, 4 + t])) + mlp)
        mxl = F32(mx + lse)
        total = 0.0
        imax_base = -1
        pmax = F32(0.0)
        for i in range(n):
            plb = F32(F32(scale * F32(base16[r, 4 + i])) + mlp)
            if i == 0 or plb > pmax:
                pmax = plb
                imax_base = i
            if plb > F32(-16.0):
                pb = np.exp(plb)
                total += F32(pb * F32(F32(plb - row[i]) + mxl))
        nll[r] = v
        nll_base[r] = vb
        kld[r] = total
        p_diff[r] = F32(np.exp(-v) - np.exp(-vb))
        same_top[r] = imax == imax_base


@njit(cache=True)
def _kld_accumulate(sums, nll, nll_base, kld, p_diff, same_top):
    """Add the rows to llama.cpp's sums (in row order), in float32 where it multiplies floats.
    sums: float64[11] (sum_nll .. sum_p_diff4, max_p_diff), returns the number of same tops."""
    same = 0
    for r in range(nll.size):
        v = nll[r]
        vb = nll_base[r]
        sums[0] += v
        sums[1] += F32(v * v)
        sums[2] += vb
        sums[3] += F32(vb * vb)
        sums[4] += F32(v * vb)
        sums[5] += kld[r]
        sums[6] += kld[r] * kld[r]
        d = p_diff[r]
        sums[7] += d
        d2 = np.float64(F32(d * d))
        sums[8] += d2
        sums[9] += d2 * d2
        sums[10] = max(sums[10], abs(np.float64(d)))
        if same_top[r]:
            same += 1
    return same


@njit(parallel=True, cache=True)
def _softmax_nll(logits, targets):
    """perplexity_v2's scoring: softmax() (expf summed in double, each probability divided in
    double and stored as float) then -logf(prob) of the target."""
    rows, n = logits.shape
    out = np.empty(rows, np.float64)
    for r in prange(rows):
        row = logits[r]
        mx = row[0]
        for i in range(n):
            mx = max(mx, row[i])
        s = 0.0
        for i in range(n):
            s += np.exp(F32(row[i] - mx))
        p = F32(np.float64(np.exp(F32(row[targets[r]] - mx))) / s)
        out[r] = -np.log(p)
    return out


# --- the logits file -----------------------------------------------------------------------

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
        folder = self.path.parent if str(self.path.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=folder)
        except OSError as e:
            raise ModelError(f"failed to open {path} for writing ({e.strerror})") from None
        self._tmp = Path(tmp)
        self._f: BinaryIO = os.fdopen(fd, "wb")
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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o666 & ~umask)  # what a plain open() would have made, not mkstemp's 0600
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)


# --- running chunks through the model --------------------------------------------------------

def _chunk_sequences(tokens: np.ndarray, start: int, n_seq: int, n_ctx: int, bos: int | None) -> list[np.ndarray]:
    """The next n_seq chunks from `start`, each with its first token replaced by BOS when the
    model adds one (as llama-perplexity does)."""
    seqs = []
    for seq in range(n_seq):
        toks = tokens[start + seq * n_ctx:start + (seq + 1) * n_ctx].copy()
        if bos is not None:
            toks[0] = bos
        seqs.append(toks)
    return seqs


def _run_sequences(model: Transformer, caches: list, seqs: list[np.ndarray], n_batch: int, n_ubatch: int,
                   n_stream: int, lo: int, hi: int) -> list[np.ndarray]:
    """Run sequences of equal length from position 0 as llama.cpp's batches of n_batch positions
    (every sequence in each), each split into physical batches; returns per sequence the logits
    of positions lo .. hi - 1 (float32, on the host)."""
    for c in caches[:len(seqs)]:
        c.clear()
    out: list[list[np.ndarray]] = [[] for _ in seqs]
    length = len(seqs[0])
    for b0 in range(0, length, n_batch):
        segs = [(s, toks[b0:b0 + n_batch]) for s, toks in enumerate(seqs)]
        for ub in _ubatches(segs, n_ubatch, n_stream):
            rows: list[int] = []
            counts = []
            r = 0
            for s, toks in ub:
                p0 = caches[s].n
                a, b = max(lo, p0), min(hi, p0 + len(toks))
                if b > a:
                    rows.extend(range(r + a - p0, r + b - p0))
                counts.append(max(0, b - a))
                r += len(toks)
            logits = model.forward([Segment(toks, caches[s]) for s, toks in ub], logit_rows=rows)
            if rows:
                logits = to_host(logits)
                r = 0
                for (s, _), n in zip(ub, counts):
                    if n:
                        out[s].append(logits[r:r + n])
                    r += n
    return [np.ascontiguousarray(np.concatenate(o), dtype=F32) if o else np.empty((0, 0), F32) for o in out]


def _eta_line(prefix: str, t_total: float, n_chunk: int, n_seq: int = 1) -> str:
    """llama-perplexity's '<prefix>: X seconds per pass - ETA [H hours ]M minutes', the ETA
    int(t_total * n_chunk / n_seq) seconds in float32 as llama.cpp computes it."""
    total_seconds = int(F32(F32(F32(t_total) * F32(n_chunk)) / F32(n_seq)))
    line = f"{prefix}: {t_total:.2f} seconds per pass - ETA "
    if total_seconds >= 60 * 60:
        line += f"{total_seconds // 3600} hours "
        total_seconds %= 3600
    return line + f"{total_seconds / 60.0:.2f} minutes"


def _batch_layout(params: PerplexityParams) -> tuple[int, int]:
    """llama-perplexity's main(): n_parallel = max(1, b / c) sequences, n_batch = min(b, n_parallel * c)."""
    if params.n_ctx <= 0:
        raise ModelError("perplexity tool requires '--ctx-size' > 0")
    if params.n_batch <= 0:
        raise ModelError("the batch size -b must be > 0")
    n_par = max(1, params.n_batch // params.n_ctx)
    return n_par, min(params.n_batch, n_par * params.n_ctx)


def _check_vocab(model: Transformer, n_vocab: int) -> None:
    rows = model.weights.output.shape[0]
    if rows != n_vocab:
        raise ModelError(f"the model's output has {rows} rows for a vocabulary of {n_vocab} tokens")


def perplexity(model: Transformer, tokens: np.ndarray, params: PerplexityParams, bos: int | None,
               n_vocab: int, progress: bool = True, log: Log | None = None, emit: Log | None = None,
               writer: LogitsWriter | None = None) -> PerplexityResult:
    """llama-perplexity's default mode over `tokens` (the text tokenized with add_special).
    `emit` receives what llama-perplexity prints to stdout, piece by piece ('[1]x.xxxx,', ...),
    `log` its informational lines; with `writer`, the log-probabilities are saved as well."""
    log = log or _stderr
    emit = emit or _nothing
    if params.ppl_stride > 0:
        if writer is not None:
            raise ModelError("--kl-divergence-base with --ppl-stride: llama-perplexity saves logits "
                             "only in its default mode")
        return perplexity_strided(model, tokens, params, n_vocab, progress, log, emit)
    n_par, n_batch = _batch_layout(params)
    n_ctx = params.n_ctx
    tokens = np.asarray(tokens, np.int32)
    if len(tokens) < 2 * n_ctx:
        raise ModelError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of "
                         f"{n_ctx}; the data file you provided tokenizes to only {len(tokens)} tokens")
    first = n_ctx // 2
    n_score = n_ctx - 1 - first
    if n_score < 1:
        raise ModelError(f"a context of {n_ctx} tokens scores no token (its second half is predicted "
                         "from the first): use -c 3 or more")
    _check_vocab(model, n_vocab)
    n_chunk_max = len(tokens) // n_ctx
    n_chunk = n_chunk_max if params.n_chunks < 0 else min(params.n_chunks, n_chunk_max)
    if n_chunk <= 0:
        raise ModelError("no chunk to process (--chunks 0)")
    n_seq = max(1, n_batch // n_ctx)
    n_ubatch = min(N_UBATCH, n_batch)
    log(f"perplexity: calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, batch_size={n_batch}, "
        f"n_seq={n_seq}")
    nv = row_values(n_vocab)
    if writer is not None:
        log(f"perplexity: saving all logits to {writer.path}")
        writer.header(n_ctx, n_vocab, n_chunk, tokens)
        buf16 = np.zeros((n_score, nv), np.uint16)
        buf32 = buf16.view(np.float32)

    caches = [model.new_cache(n_ctx) for _ in range(min(n_seq, n_chunk))]
    nll = nll2 = 0.0
    count = 0
    chunk_ppl: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=n_chunk, desc="perplexity", unit="chunk", disable=not progress, file=sys.stderr)
    try:
        for i in range(0, n_chunk, n_seq):
            start = i * n_ctx
            n_seq_batch = min(n_seq, n_chunk - i)
            t_start = time.perf_counter()
            seqs = _chunk_sequences(tokens, start, n_seq_batch, n_ctx, bos)
            logits = _run_sequences(model, caches, seqs, n_batch, n_ubatch, n_par, first, n_ctx)
            if i == 0:
                log(_eta_line("perplexity", time.perf_counter() - t_start, n_chunk, n_seq))
            for seq in range(n_seq_batch):
                s0 = start + seq * n_ctx + first
                targets = tokens[s0 + 1:s0 + 1 + n_score]
                lg = logits[seq][:n_score]
                if writer is not None:
                    v = compress_log_probs(lg, targets, buf16, buf32)
                    writer.write(buf16)
                else:
                    v, _, _ = token_nll(lg, targets.astype(np.int64))
                nll += float(v.sum())
                nll2 += float((v * v).sum())
                count += n_score
                chunk_ppl.append(math.exp(nll / count))
                if params.ppl_output_type == 0:
                    emit(f"[{i + seq + 1}]{chunk_ppl[-1]:.4f},")
                else:
                    av = nll / count
                    av2 = nll2 / count - av * av
                    if av2 > 0:
                        av2 = math.sqrt(av2 / (count - 1))
                    emit(f"{i * n_ctx:8d}  {chunk_ppl[-1]:.4f}  {av:4f}  {av2:4f}\n")
            bar.set_postfix_str(f"ppl {chunk_ppl[-1]:.4f}")
            bar.update(n_seq_batch)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    emit("\n")
    mean, mean2 = nll / count, nll2 / count
    ppl = math.exp(mean)
    var = mean2 - mean * mean
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else None
    return PerplexityResult(n_chunk, n_ctx, n_chunk * n_ctx, count, seconds, ppl, err, chunk_ppl,
                            str(writer.path) if writer is not None else "")


def _pad256(n: int) -> int:
    return (n + 255) // 256 * 256


def perplexity_strided(model: Transformer, tokens: np.ndarray, params: PerplexityParams, n_vocab: int,
                       progress: bool = True, log: Log | None = None, emit: Log | None = None) -> PerplexityResult:
    """llama-perplexity's perplexity_v2 (--ppl-stride S): windows of the context llama.cpp creates
    (n_parallel * c + S/2, padded to a multiple of 256) every S tokens, each scoring its last S
    tokens; like llama.cpp, no BOS is put in front of a window and there is no final estimate."""
    log = log or _stderr
    emit = emit or _nothing
    n_par, n_batch = _batch_layout(params)
    stride = params.ppl_stride
    if n_par > 1:
        raise ModelError("--ppl-stride needs -b <= -c: with several sequences llama-perplexity's strided "
                         "window does not fit its per-sequence context and decoding fails")
    calc = _pad256(_pad256(params.n_ctx + stride // 2))
    tokens = np.asarray(tokens, np.int32)
    if len(tokens) < 2 * calc:
        raise ModelError(f"you need at least {2 * calc} tokens to evaluate perplexity with a context of "
                         f"{calc}; the data file you provided tokenizes to only {len(tokens)} tokens")
    if stride >= calc:
        raise ModelError(f"the stride {stride} must be less than the window of {calc} tokens")
    _check_vocab(model, n_vocab)
    n_chunk_max = (len(tokens) - calc + stride - 1) // stride
    n_chunk = n_chunk_max if params.n_chunks < 0 else min(params.n_chunks, n_chunk_max)
    if n_chunk <= 0:
        raise ModelError("no chunk to process (--chunks 0)")
    log(f"perplexity_v2: have {len(tokens)} tokens. Calculation chunk = {calc}")
    log(f"perplexity_v2: computing over {n_chunk} chunks, n_ctx={calc}, batch_size={n_batch}, "
        f"n_seq={max(1, n_batch // calc)}")
    cache = [model.new_cache(calc)]
    lo, hi = calc - stride - 1, calc - 1
    nll = 0.0
    count = 0
    chunk_ppl: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=n_chunk, desc="perplexity", unit="chunk", disable=not progress, file=sys.stderr)
    try:
        for i in range(n_chunk):
            start = i * stride
            t_start = time.perf_counter()
            logits = _run_sequences(model, cache, [tokens[start:start + calc]], n_batch, min(N_UBATCH, n_batch),
                                    1, lo, hi)[0]
            if i == 0:
                log(_eta_line("perplexity_v2", time.perf_counter() - t_start, n_chunk))
            v = _softmax_nll(logits, tokens[start + lo + 1:start + hi + 1])
            for x in v:  # in token order, as llama.cpp adds them
                nll += x
            count += len(v)
            chunk_ppl.append(math.exp(nll / count))
            if params.ppl_output_type == 0:
                emit(f"[{i + 1}]{chunk_ppl[-1]:.4f},")
            else:
                emit(f"{i * stride:8d}  {chunk_ppl[-1]:.4f}\n")
            bar.set_postfix_str(f"ppl {chunk_ppl[-1]:.4f}")
            bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    emit("\n")
    return PerplexityResult(n_chunk, calc, n_chunk * calc, count, seconds, chunk_ppl[-1], None, chunk_ppl)


# --- KL divergence --------------------------------------------------------------------------

KLD_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              "
              "Δp RMS            Same top p\n")


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else math.nan


def _div(a: float, b: float) -> float:
    """a / b with C's IEEE results for b = 0."""
    if b != 0:
        return a / b
    return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)


def _mean_and_uncertainty(s: float, s2: float, count: int) -> tuple[float, float]:
    if count < 1:
        return 0.0, 0.0
    f = s / count
    df = s2 / count - f * f
    df = math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0
    return f, df


def _covariance(sa: float, sb: float, sab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (sab / count - (sa / count) * (sb / count)) / (count - 1)


def _kld_figures(k: KLDivergenceStats) -> dict[str, float]:
    """Every figure llama-perplexity derives from the sums (per chunk and in the closing block)."""
    log_ppl, log_ppl_unc = _mean_and_uncertainty(k.sum_nll, k.sum_nll2, k.count)
    log_base, log_base_unc = _mean_and_uncertainty(k.sum_nll_base, k.sum_nll_base2, k.count)
    cov = _covariance(k.sum_nll, k.sum_nll_base, k.sum_nll_nll_base, k.count)
    ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
    ratio_unc = _sqrt(log_ppl_unc ** 2 + log_base_unc ** 2 - 2.0 * cov)
    ppl_unc, ppl_base_unc = ppl * log_ppl_unc, ppl_base * log_base_unc
    kld, kld_unc = _mean_and_uncertainty(k.sum_kld, k.sum_kld2, k.count)
    mse, mse_unc = _mean_and_uncertainty(k.sum_p_diff2, k.sum_p_diff4, k.count)
    rms = math.sqrt(mse)
    dp, dp_unc = _mean_and_uncertainty(k.sum_p_diff, k.sum_p_diff2, k.count)
    top = _div(k.n_same_top, k.count)
    return {
        "ppl": ppl, "ppl_unc": ppl_unc, "ppl_base": ppl_base, "ppl_base_unc": ppl_base_unc,
        "log_ppl_cor": _div(cov, log_ppl_unc * log_base_unc),
        "log_ppl_ratio": log_ppl - log_base, "log_ppl_ratio_unc": ratio_unc,
        "ppl_ratio": math.exp(log_ppl - log_base), "ppl_ratio_unc": math.exp(log_ppl - log_base) * ratio_unc,
        "ppl_diff": ppl - ppl_base,
        "ppl_diff_unc": _sqrt(ppl_unc ** 2 + ppl_base_unc ** 2 - 2.0 * ppl * ppl_base * cov),
        "kld": kld, "kld_unc": kld_unc,
        "p_diff": dp, "p_diff_unc": dp_unc,
        "p_diff_rms": rms, "p_diff_rms_unc": _div(0.5, rms) * mse_unc,
        "same_top": top, "same_top_unc": _sqrt(_div(top * (1 - top), k.count - 1)),
        "max_p_diff": k.max_p_diff, "count": k.count,
    }


def _f(x: float, width: int, prec: int) -> str:
    """printf's %W.Pf as glibc prints on x86, where every NaN an operation makes is '-nan'."""
    if math.isnan(x):
        return f"{'-nan':>{width}}"
    return f"{x:{width}.{prec}f}"


def format_kld_chunk(n: int, k: KLDivergenceStats) -> str:
    """One line of llama-perplexity's per-chunk KL-divergence table."""
    f = _kld_figures(k)
    return (f"{n:4d}"
            f"    {_f(f['ppl'], 9, 4)} ± {_f(f['ppl_unc'], 9, 4)}"
            f"    {_f(f['log_ppl_ratio'], 10, 5)} ± {_f(f['log_ppl_ratio_unc'], 10, 5)}"
            f"    {_f(f['kld'], 10, 5)} ± {_f(f['kld_unc'], 10, 5)}"
            f"    {_f(100.0 * f['p_diff_rms'], 6, 3)} ± {_f(100.0 * f['p_diff_rms_unc'], 6, 3)} %"
            f"    {_f(100.0 * f['same_top'], 6, 3)} ± {_f(100.0 * f['same_top_unc'], 6, 3)} %\n")


def _percentile(values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp's percentile lambda, in float32: linear between the two nearest ranks."""
    fraction = F32(fraction)
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = F32(fraction * F32(len(values) - 1))
    ip = int(p)
    p = F32(p - F32(ip))
    return float(F32(F32(F32(1) - p) * values[ip]) + F32(p * values[min(ip + 1, len(values) - 1)]))


def _median(values: np.ndarray) -> float:
    n = len(values)
    if n % 2 == 0:
        return float(F32(0.5) * F32(values[n // 2] + values[n // 2 - 1]))
    return float(values[n // 2])


def format_kld_statistics(k: KLDivergenceStats, kld_values: np.ndarray, p_diff_values: np.ndarray) -> str:
    """llama-perplexity's closing block ('' for fewer than 100 tokens, where it prints none)."""
    if k.count < 100:
        return ""
    kv = np.sort(np.asarray(kld_values, F32))
    pv = np.sort(np.asarray(p_diff_values, F32))
    f = _kld_figures(k)
    out = ["====== Perplexity statistics ======",
           f"Mean PPL(Q)                   : {_f(f['ppl'], 10, 6)} ± {_f(f['ppl_unc'], 10, 6)}",
           f"Mean PPL(base)                : {_f(f['ppl_base'], 10, 6)} ± {_f(f['ppl_base_unc'], 10, 6)}",
           f"Cor(ln(PPL(Q)), ln(PPL(base))): {_f(100.0 * f['log_ppl_cor'], 6, 2)}%",
           f"Mean ln(PPL(Q)/PPL(base))     : {_f(f['log_ppl_ratio'], 10, 6)} ± {_f(f['log_ppl_ratio_unc'], 10, 6)}",
           f"Mean PPL(Q)/PPL(base)         : {_f(f['ppl_ratio'], 10, 6)} ± {_f(f['ppl_ratio_unc'], 10, 6)}",
           f"Mean PPL(Q)-PPL(base)         : {_f(f['ppl_diff'], 10, 6)} ± {_f(f['ppl_diff_unc'], 10, 6)}",
           "",
           "====== KL divergence statistics ======",
           f"Mean    KLD: {_f(f['kld'], 10, 6)} ± {_f(f['kld_unc'], 10, 6)}",
           f"Maximum KLD: {_f(float(kv[-1]), 10, 6)}"]
    for label, frac in (("99.9%", 0.999), ("99.0%", 0.990), ("95.0%", 0.950), ("90.0%", 0.900)):
        out.append(f"{label}   KLD: {_f(_percentile(kv, frac), 10, 6)}")
    out.append(f"Median  KLD: {_f(_median(kv), 10, 6)}")
    for label, frac in (("10.0%", 0.100), (" 5.0%", 0.050), (" 1.0%", 0.010), (" 0.1%", 0.001)):
        out.append(f"{label}   KLD: {_f(_percentile(kv, frac), 10, 6)}")
    out += [f"Minimum KLD: {_f(float(kv[0]), 10, 6)}",
            "",
            "====== Token probability statistics ======",
            f"Mean    Δp: {_f(100.0 * f['p_diff'], 6, 3)} ± {_f(100.0 * f['p_diff_unc'], 5, 3)} %",
            f"Maximum Δp: {_f(100.0 * float(pv[-1]), 6, 3)}%"]
    for label, frac in (("99.9%", 0.999), ("99.0%", 0.990), ("95.0%", 0.950), ("90.0%", 0.900),
                        ("75.0%", 0.750)):
        out.append(f"{label}   Δp: {_f(100.0 * _percentile(pv, frac), 6, 3)}%")
    out.append(f"Median  Δp: {_f(100.0 * _median(pv), 6, 3)}%")
    for label, frac in (("25.0%", 0.250), ("10.0%", 0.100), (" 5.0%", 0.050), (" 1.0%", 0.010),
                        (" 0.1%", 0.001)):
        out.append(f"{label}   Δp: {_f(100.0 * _percentile(pv, frac), 6, 3)}%")
    out += [f"Minimum Δp: {_f(100.0 * float(pv[0]), 6, 3)}%",
            f"RMS Δp    : {_f(100.0 * f['p_diff_rms'], 6, 3)} ± {_f(100.0 * f['p_diff_rms_unc'], 5, 3)} %",
            f"Same top p: {_f(100.0 * f['same_top'], 6, 3)} ± {_f(100.0 * f['same_top_unc'], 5, 3)} %"]
    return "\n".join(out) + "\n"


def kl_divergence(model: Transformer, base: BaseLogits, params: PerplexityParams, bos: int | None, n_vocab: int,
                  progress: bool = True, log: Log | None = None, emit: Log | None = None) -> KLDivergenceResult:
    """llama-perplexity --kl-divergence: the base file's chunks through `model`, compared token by
    token with the stored log-probabilities. `emit` gets the per-chunk table as llama.cpp prints it."""
    log = log or _stderr
    emit = emit or _nothing
    n_par, n_batch = _batch_layout(params)
    n_ctx = base.n_ctx
    # llama.cpp's context holds n_par sequences of pad256(pad256(n_par * c) / n_par) positions
    per_seq = _pad256(_pad256(n_par * params.n_ctx) // n_par)
    if n_ctx > per_seq:
        raise ModelError(f"{base.path} has been computed with a context of {n_ctx}, while the current "
                         f"context is {params.n_ctx}. Increase it with -c {n_ctx} and retry")
    if base.n_vocab != n_vocab:
        raise ModelError(f"{base.path}: inconsistent vocabulary ({base.n_vocab} vs {n_vocab}): the base "
                         "logits are of another model")
    _check_vocab(model, n_vocab)
    if base.tokens.size and (base.tokens.min() < 0 or base.tokens.max() >= n_vocab):
        raise ModelError(f"{base.path}: token ids outside the vocabulary of {n_vocab}: the base logits are "
                         "of another model")
    n_chunk = base.n_chunk
    n_seq = min(max(1, n_batch // n_ctx), n_par)
    n_ubatch = min(N_UBATCH, n_batch)
    first = n_ctx // 2
    n_score = n_ctx - 1 - first
    log(f"kl_divergence: computing over {n_chunk} chunks, n_ctx={n_ctx}, batch_size={n_batch}, n_seq={n_seq}")
    tokens = base.tokens
    caches = [model.new_cache(n_ctx) for _ in range(min(n_seq, n_chunk))]
    k = KLDivergenceStats()
    sums = np.zeros(11, np.float64)
    kld_values = np.empty(n_chunk * n_score, F32)
    p_diff_values = np.empty(n_chunk * n_score, F32)
    nll = np.empty(n_score, F32)
    nll_base = np.empty(n_score, F32)
    kld = np.empty(n_score, np.float64)
    same = np.empty(n_score, np.bool_)
    lines: list[str] = []
    t0 = time.perf_counter()
    bar = tqdm(total=n_chunk, desc="kl-divergence", unit="chunk", disable=not progress, file=sys.stderr)
    try:
        for i in range(0, n_chunk, n_seq):
            start = i * n_ctx
            n_seq_batch = min(n_seq, n_chunk - i)
            t_start = time.perf_counter()
            seqs = _chunk_sequences(tokens, start, n_seq_batch, n_ctx, bos)
            logits = _run_sequences(model, caches, seqs, n_batch, n_ubatch, n_par, first, n_ctx)
            if i == 0:
                log(_eta_line("kl_divergence", time.perf_counter() - t_start, n_chunk, n_seq))
                emit(KLD_HEADER)
            for seq in range(n_seq_batch):
                c = i + seq
                b16 = np.ascontiguousarray(base.log_probs[c])
                s0 = start + seq * n_ctx + first
                at = c * n_score
                _kld_rows(logits[seq][:n_score], b16, b16.view(F32), tokens[s0 + 1:s0 + 1 + n_score], nll,
                          nll_base, kld, p_diff_values[at:at + n_score], same)
                kld_values[at:at + n_score] = kld
                k.n_same_top += int(_kld_accumulate(sums, nll, nll_base, kld, p_diff_values[at:at + n_score], same))
                k.count += n_score
                (k.sum_nll, k.sum_nll2, k.sum_nll_base, k.sum_nll_base2, k.sum_nll_nll_base, k.sum_kld,
                 k.sum_kld2, k.sum_p_diff, k.sum_p_diff2, k.sum_p_diff4, k.max_p_diff) = (float(x) for x in sums)
                lines.append(format_kld_chunk(c + 1, k))
                emit(lines[-1])
            bar.set_postfix_str(f"kld {k.sum_kld / k.count:.5f}")
            bar.update(n_seq_batch)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    emit("\n")
    return KLDivergenceResult(n_chunk, n_ctx, n_chunk * n_ctx, seconds, k, kld_values, p_diff_values, lines)


# --- from files -----------------------------------------------------------------------------

def _load(model_path: str | Path, device: str, n_threads: int | None, progress: bool):
    from ..models import open_model
    from ..runtime import resolve_device, set_threads
    from ..tokenizer import Tokenizer

    device = resolve_device(device)
    threads = set_threads(n_threads)
    source = open_model(model_path, "f32")
    tokenizer = Tokenizer.from_source(source)
    if tokenizer.add_eos:
        raise ModelError("the model's tokenizer adds EOS to every text, which llama-perplexity does not "
                         "support either")
    return source, tokenizer, device, threads


def run_perplexity(model_path: str | Path, text_path: str | Path | None, params: PerplexityParams,
                   device: str = "auto", n_threads: int | None = None, progress: bool = True,
                   log: Log | None = None, emit: Log | None = None) -> PerplexityResult | KLDivergenceResult:
    """kquant-perplexity: load the model, then llama-perplexity's default mode over the text (saving
    the log-probabilities to `params.logits_file` if set), its strided mode (`ppl_stride`), or with
    `params.kl_divergence` its KL-divergence mode against `params.logits_file` (no text needed)."""
    log = log or _stderr
    if params.kl_divergence:
        return run_kl_divergence(model_path, params, device, n_threads, progress, log, emit)
    if text_path is None:
        raise ModelError("no text: give -f TEXT")
    if params.logits_file and Path(params.logits_file).exists() and \
            Path(params.logits_file).resolve() in {Path(model_path).resolve(), Path(text_path).resolve()}:
        raise ModelError(f"the logits file {params.logits_file} is also an input")
    _batch_layout(params)
    text = read_text(text_path)  # llama.cpp reads -f first, while parsing its arguments
    source, tokenizer, device, threads = _load(model_path, device, n_threads, progress)
    t0 = time.perf_counter()
    tokens = tokenizer.tokenize(text, add_special=True)
    log(f"perplexity: tokenizing {text_path}: {len(tokens)} tokens in {time.perf_counter() - t0:.2f} s")
    model = Transformer(source, device, progress)
    log(f"{source.arch} model, {model.config.n_layer} layers, {device}, {threads} threads")
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    writer = LogitsWriter(params.logits_file) if params.logits_file else None
    try:
        result = perplexity(model, tokens, params, bos, tokenizer.n_vocab, progress, log, emit, writer)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    return result


def run_kl_divergence(model_path: str | Path, params: PerplexityParams, device: str = "auto",
                      n_threads: int | None = None, progress: bool = True, log: Log | None = None,
                      emit: Log | None = None) -> KLDivergenceResult:
    """llama-perplexity --kl-divergence --kl-divergence-base F: the model against base log-probabilities."""
    log = log or _stderr
    if not params.logits_file:
        raise ModelError("you must provide a name of a file containing the log probabilities of the base "
                         "model (--kl-divergence-base F)")
    _batch_layout(params)
    base = BaseLogits.open(params.logits_file)
    source, tokenizer, device, threads = _load(model_path, device, n_threads, progress)
    model = Transformer(source, device, progress)
    log(f"{source.arch} model, {model.config.n_layer} layers, {device}, {threads} threads")
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    return kl_divergence(model, base, params, bos, tokenizer.n_vocab, progress, log, emit)
