"""KL divergence against a base model, as llama-perplexity --kl-divergence computes it.

KL-divergence mode (`kl_divergence`) runs the file's tokens through the model under test and
compares with the stored base log-probabilities: per-chunk PPL(Q), ln(PPL(Q)/PPL(base)), KLD,
RMS Δp and top-token agreement, then llama-perplexity's statistics block.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit, prange
from tqdm import tqdm

from ..errors import ModelError
from ..runtime import Transformer
from ..runtime.chunks import run_chunks
from ..runtime.kernels import COMPILING, forward_compiled
from .common import (Log, PerplexityParams, batch_layout, check_vocab, eta_line, load_for_evaluation, log_nothing,
                     log_stderr, pad256)
from .logits_file import BaseLogits

F32 = np.float32


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


def printf_float(x: float, width: int, prec: int) -> str:
    """printf's %W.Pf as glibc prints on x86, where every NaN an operation makes is '-nan'."""
    if math.isnan(x):
        return f"{'-nan':>{width}}"
    return f"{x:{width}.{prec}f}"


def format_kld_chunk(n: int, k: KLDivergenceStats) -> str:
    """One line of llama-perplexity's per-chunk KL-divergence table."""
    f = _kld_figures(k)
    return (f"{n:4d}"
            f"    {printf_float(f['ppl'], 9, 4)} ± {printf_float(f['ppl_unc'], 9, 4)}"
            f"    {printf_float(f['log_ppl_ratio'], 10, 5)} ± {printf_float(f['log_ppl_ratio_unc'], 10, 5)}"
            f"    {printf_float(f['kld'], 10, 5)} ± {printf_float(f['kld_unc'], 10, 5)}"
            f"    {printf_float(100.0 * f['p_diff_rms'], 6, 3)} ± {printf_float(100.0 * f['p_diff_rms_unc'], 6, 3)} %"
            f"    {printf_float(100.0 * f['same_top'], 6, 3)} ± {printf_float(100.0 * f['same_top_unc'], 6, 3)} %\n")


def percentile(values: np.ndarray, fraction: float) -> float:
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


def median(values: np.ndarray) -> float:
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
           f"Mean PPL(Q)                   : {printf_float(f['ppl'], 10, 6)} ± {printf_float(f['ppl_unc'], 10, 6)}",
           f"Mean PPL(base)                : {printf_float(f['ppl_base'], 10, 6)} ± {printf_float(f['ppl_base_unc'], 10, 6)}",
           f"Cor(ln(PPL(Q)), ln(PPL(base))): {printf_float(100.0 * f['log_ppl_cor'], 6, 2)}%",
           f"Mean ln(PPL(Q)/PPL(base))     : {printf_float(f['log_ppl_ratio'], 10, 6)} ± {printf_float(f['log_ppl_ratio_unc'], 10, 6)}",
           f"Mean PPL(Q)/PPL(base)         : {printf_float(f['ppl_ratio'], 10, 6)} ± {printf_float(f['ppl_ratio_unc'], 10, 6)}",
           f"Mean PPL(Q)-PPL(base)         : {printf_float(f['ppl_diff'], 10, 6)} ± {printf_float(f['ppl_diff_unc'], 10, 6)}",
           "",
           "====== KL divergence statistics ======",
           f"Mean    KLD: {printf_float(f['kld'], 10, 6)} ± {printf_float(f['kld_unc'], 10, 6)}",
           f"Maximum KLD: {printf_float(float(kv[-1]), 10, 6)}"]
    for label, frac in (("99.9%", 0.999), ("99.0%", 0.990), ("95.0%", 0.950), ("90.0%", 0.900)):
        out.append(f"{label}   KLD: {printf_float(percentile(kv, frac), 10, 6)}")
    out.append(f"Median  KLD: {printf_float(median(kv), 10, 6)}")
    for label, frac in (("10.0%", 0.100), (" 5.0%", 0.050), (" 1.0%", 0.010), (" 0.1%", 0.001)):
        out.append(f"{label}   KLD: {printf_float(percentile(kv, frac), 10, 6)}")
    out += [f"Minimum KLD: {printf_float(float(kv[0]), 10, 6)}",
            "",
            "====== Token probability statistics ======",
            f"Mean    Δp: {printf_float(100.0 * f['p_diff'], 6, 3)} ± {printf_float(100.0 * f['p_diff_unc'], 5, 3)} %",
            f"Maximum Δp: {printf_float(100.0 * float(pv[-1]), 6, 3)}%"]
    for label, frac in (("99.9%", 0.999), ("99.0%", 0.990), ("95.0%", 0.950), ("90.0%", 0.900),
                        ("75.0%", 0.750)):
        out.append(f"{label}   Δp: {printf_float(100.0 * percentile(pv, frac), 6, 3)}%")
    out.append(f"Median  Δp: {printf_float(100.0 * median(pv), 6, 3)}%")
    for label, frac in (("25.0%", 0.250), ("10.0%", 0.100), (" 5.0%", 0.050), (" 1.0%", 0.010),
                        (" 0.1%", 0.001)):
        out.append(f"{label}   Δp: {printf_float(100.0 * percentile(pv, frac), 6, 3)}%")
    out += [f"Minimum Δp: {printf_float(100.0 * float(pv[0]), 6, 3)}%",
            f"RMS Δp    : {printf_float(100.0 * f['p_diff_rms'], 6, 3)} ± {printf_float(100.0 * f['p_diff_rms_unc'], 5, 3)} %",
            f"Same top p: {printf_float(100.0 * f['same_top'], 6, 3)} ± {printf_float(100.0 * f['same_top_unc'], 5, 3)} %"]
    return "\n".join(out) + "\n"


def kl_divergence(model: Transformer, base: BaseLogits, params: PerplexityParams, bos: int | None, n_vocab: int,
                  progress: bool = True, log: Log | None = None, emit: Log | None = None) -> KLDivergenceResult:
    """llama-perplexity --kl-divergence: the base file's chunks through `model`, compared token by
    token with the stored log-probabilities. `emit` gets the per-chunk table as llama.cpp prints it."""
    log = log or log_stderr
    emit = emit or log_nothing
    n_par, n_batch = batch_layout(params)
    n_ctx = base.n_ctx
    # llama.cpp's context holds n_par sequences of pad256(pad256(n_par * c) / n_par) positions
    per_seq = pad256(pad256(n_par * params.n_ctx) // n_par)
    if n_ctx > per_seq:
        raise ModelError(f"{base.path} has been computed with a context of {n_ctx}, while the current "
                         f"context is {params.n_ctx}. Increase it with -c {n_ctx} and retry")
    if base.n_vocab != n_vocab:
        raise ModelError(f"{base.path}: inconsistent vocabulary ({base.n_vocab} vs {n_vocab}): the base "
                         "logits are of another model")
    check_vocab(model, n_vocab)
    if base.tokens.size and (base.tokens.min() < 0 or base.tokens.max() >= n_vocab):
        raise ModelError(f"{base.path}: token ids outside the vocabulary of {n_vocab}: the base logits are "
                         "of another model")
    n_chunk = base.n_chunk
    n_seq = min(max(1, n_batch // n_ctx), n_par)
    first = n_ctx // 2
    n_score = n_ctx - 1 - first
    log(f"kl_divergence: computing over {n_chunk} chunks, n_ctx={n_ctx}, batch_size={n_batch}, n_seq={n_seq}")
    tokens = base.tokens
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
        for i, logits, seconds in run_chunks(model, tokens, n_chunk, n_ctx, n_seq, n_batch, n_par, first, n_ctx,
                                             bos):
            if i == 0:
                log(eta_line("kl_divergence", seconds, n_chunk, n_seq))
                emit(KLD_HEADER)
            for seq in range(len(logits)):
                c = i + seq
                b16 = np.ascontiguousarray(base.log_probs[c])
                s0 = c * n_ctx + first
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
            bar.update(len(logits))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    emit("\n")
    return KLDivergenceResult(n_chunk, n_ctx, n_chunk * n_ctx, seconds, k, kld_values, p_diff_values, lines)


def run_kl_divergence(model_path: str | Path, params: PerplexityParams, device: str = "auto",
                      n_threads: int | None = None, progress: bool = True, log: Log | None = None,
                      emit: Log | None = None) -> KLDivergenceResult:
    """llama-perplexity --kl-divergence --kl-divergence-base F: the model against base log-probabilities."""
    log = log or log_stderr
    if not params.logits_file:
        raise ModelError("you must provide a name of a file containing the log probabilities of the base "
                         "model (--kl-divergence-base F)")
    batch_layout(params)
    base = BaseLogits.open(params.logits_file)
    source, tokenizer, device, threads = load_for_evaluation(model_path, device, n_threads)
    model = Transformer(source, device, progress)
    log(f"{source.arch} model, {model.config.n_layer} layers, {device}, {threads} threads")
    if device == "cpu" and not forward_compiled():
        log(COMPILING)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    return kl_divergence(model, base, params, bos, tokenizer.n_vocab, progress, log, emit)
