"""Perplexity the way llama-perplexity computes it (tools/perplexity/perplexity.cpp).

Default mode (`perplexity`): the text is tokenized as llama.cpp tokenizes it (BOS first when the
model adds one), cut into chunks of n_ctx tokens, and n_batch / n_ctx chunks run as one batch of
sequences (each split into llama.cpp's physical batches), the first token of every chunk replaced
by BOS when the model adds one. Each chunk scores the second half of its window: the tokens at
positions n_ctx/2 + 1 .. n_ctx - 1, each predicted from everything before it in the chunk. The
running perplexity is printed after every chunk (`[1]x.xxxx,[2]...`) and the closing
`Final estimate: PPL = exp(mean nll) +/- ppl * sqrt(var(nll) / (count - 1))`.

Strided mode (`ppl_stride > 0`) is llama-perplexity's perplexity_v2, with its quirks: the window
is the context llama.cpp would create (padded to 256), and no BOS is put in front of a window.

The per-token arithmetic (float32 / double, glibc expf and logf, the uint16 rounding) is a port of
llama-perplexity's log_softmax functions, so the differences from llama.cpp come only from the
logits themselves.

The KL-divergence mode is kquant.validation.kld; the logits file, kquant.validation.logits_file.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from numba import njit, prange
from tqdm import tqdm

from ..errors import ModelError
from ..files.atomic import check_writable, refuse_input_as_output
from ..files.text import read_text
from ..runtime import Transformer
from ..runtime.chunks import N_UBATCH, NllTotals, run_chunks, run_sequences
from ..runtime.kernels import COMPILING, forward_compiled, token_nll, token_nll_exact
from .common import (Log, PerplexityParams, batch_layout, check_vocab, eta_line, load_for_evaluation, log_nothing,
                     log_stderr, pad256)
from .kld import KLDivergenceResult, run_kl_divergence
from .logits_file import LogitsWriter, compress_log_probs, row_values

F32 = np.float32


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


def perplexity(model: Transformer | None, tokens: np.ndarray, params: PerplexityParams, bos: int | None,
               n_vocab: int, progress: bool = True, log: Log | None = None, emit: Log | None = None,
               writer: LogitsWriter | None = None, cluster: Any = None, spec: Any = None) -> PerplexityResult:
    """llama-perplexity's default mode over `tokens` (the text tokenized with add_special).
    `emit` receives what llama-perplexity prints to stdout, piece by piece ('[1]x.xxxx,', ...),
    `log` its informational lines; with `writer`, the log-probabilities are saved as well.
    With `cluster` (kquant.cluster.Cluster) the batches run on its workers, each loading the
    model of `spec` (model is then None); the figures are the same."""
    log = log or log_stderr
    emit = emit or log_nothing
    if params.ppl_stride > 0:
        if writer is not None:
            raise ModelError("--kl-divergence-base with --ppl-stride: llama-perplexity saves logits "
                             "only in its default mode")
        return perplexity_strided(model, tokens, params, n_vocab, progress, log, emit)
    n_par, n_batch = batch_layout(params)
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
    if model is not None:
        check_vocab(model, n_vocab)
    n_chunk_max = len(tokens) // n_ctx
    n_chunk = n_chunk_max if params.n_chunks < 0 else min(params.n_chunks, n_chunk_max)
    if n_chunk <= 0:
        raise ModelError("no chunk to process (--chunks 0)")
    n_seq = max(1, n_batch // n_ctx)
    log(f"perplexity: calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, batch_size={n_batch}, "
        f"n_seq={n_seq}")
    if writer is not None:
        log(f"perplexity: saving all logits to {writer.path}")
    lay = Layout(n_ctx, n_seq, n_batch, n_par, first, n_score, bos)
    if cluster is not None:
        from .on_cluster import perplexity_on_cluster

        batches = perplexity_on_cluster(cluster, spec, tokens, n_chunk, lay, n_vocab)
    else:
        batches = _batches(model, tokens, n_chunk, lay, writer, n_vocab)

    totals = NllTotals()
    chunk_ppl: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(total=n_chunk, desc="perplexity", unit="chunk", disable=not progress, file=sys.stderr)
    try:
        for i, nlls, seconds in batches:
            if i == 0:
                log(eta_line("perplexity", seconds, n_chunk, n_seq))
            for seq, v in enumerate(nlls):
                chunk_ppl.append(totals.add(v))
                if params.ppl_output_type == 0:
                    emit(f"[{i + seq + 1}]{chunk_ppl[-1]:.4f},")
                else:
                    av = totals.nll / totals.count
                    av2 = totals.nll2 / totals.count - av * av
                    if av2 > 0:
                        av2 = math.sqrt(av2 / (totals.count - 1))
                    emit(f"{i * n_ctx:8d}  {chunk_ppl[-1]:.4f}  {av:4f}  {av2:4f}\n")
            bar.set_postfix_str(f"ppl {chunk_ppl[-1]:.4f}")
            bar.update(len(nlls))
    finally:
        bar.close()
        if hasattr(batches, "close"):
            batches.close()
    seconds = time.perf_counter() - t0
    emit("\n")
    ppl, err = totals.estimate()
    return PerplexityResult(n_chunk, n_ctx, n_chunk * n_ctx, totals.count, seconds, ppl, err, chunk_ppl,
                            str(writer.path) if writer is not None else "")


@dataclass(frozen=True)
class Layout:
    """llama-perplexity's batches: n_seq chunks of n_ctx per batch of n_batch positions over n_par
    sequences; each chunk scores n_score tokens from position `first`; BOS starts chunks."""

    n_ctx: int
    n_seq: int
    n_batch: int
    n_par: int
    first: int
    n_score: int
    bos: int | None


def _batches(model: Transformer, tokens: np.ndarray, n_chunk: int, lay: Layout, writer: LogitsWriter | None,
             n_vocab: int) -> Iterator[tuple[int, list[np.ndarray], float]]:
    """Per batch: its first chunk's index, each chunk's scored NLLs, the seconds it took
    (with `writer`, the log-probabilities saved on the way)."""
    if writer is not None:
        writer.header(lay.n_ctx, n_vocab, n_chunk, tokens)
        buf16 = np.zeros((lay.n_score, row_values(n_vocab)), np.uint16)
        buf32 = buf16.view(np.float32)
    for i, logits, seconds in run_chunks(model, tokens, n_chunk, lay.n_ctx, lay.n_seq, lay.n_batch, lay.n_par,
                                         lay.first, lay.n_ctx, lay.bos):
        if writer is None:
            yield i, chunk_nlls(model, tokens, i, logits, lay), seconds
            continue
        nlls = []
        for seq in range(len(logits)):
            s0 = (i + seq) * lay.n_ctx + lay.first
            nlls.append(compress_log_probs(logits[seq][:lay.n_score], tokens[s0 + 1:s0 + 1 + lay.n_score],
                                           buf16, buf32))
            writer.write(buf16)
        yield i, nlls, seconds


def chunk_nlls(model: Transformer, tokens: np.ndarray, i: int, logits: list[np.ndarray],
               lay: Layout) -> list[np.ndarray]:
    """The scored tokens' NLLs of each chunk of the batch starting at chunk i."""
    nll = token_nll_exact if model.exact else token_nll
    out = []
    for seq in range(len(logits)):
        s0 = (i + seq) * lay.n_ctx + lay.first
        v, _, _ = nll(logits[seq][:lay.n_score], tokens[s0 + 1:s0 + 1 + lay.n_score].astype(np.int64))
        out.append(v)
    return out


def perplexity_strided(model: Transformer, tokens: np.ndarray, params: PerplexityParams, n_vocab: int,
                       progress: bool = True, log: Log | None = None, emit: Log | None = None) -> PerplexityResult:
    """llama-perplexity's perplexity_v2 (--ppl-stride S): windows of the context llama.cpp creates
    (n_parallel * c + S/2, padded to a multiple of 256) every S tokens, each scoring its last S
    tokens; like llama.cpp, no BOS is put in front of a window and there is no final estimate."""
    log = log or log_stderr
    emit = emit or log_nothing
    n_par, n_batch = batch_layout(params)
    stride = params.ppl_stride
    if n_par > 1:
        raise ModelError("--ppl-stride needs -b <= -c: with several sequences llama-perplexity's strided "
                         "window does not fit its per-sequence context and decoding fails")
    calc = pad256(pad256(params.n_ctx + stride // 2))
    tokens = np.asarray(tokens, np.int32)
    if len(tokens) < 2 * calc:
        raise ModelError(f"you need at least {2 * calc} tokens to evaluate perplexity with a context of "
                         f"{calc}; the data file you provided tokenizes to only {len(tokens)} tokens")
    if stride >= calc:
        raise ModelError(f"the stride {stride} must be less than the window of {calc} tokens")
    check_vocab(model, n_vocab)
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
            logits = run_sequences(model, cache, [tokens[start:start + calc]], n_batch, min(N_UBATCH, n_batch),
                                    1, lo, hi)[0]
            if i == 0:
                log(eta_line("perplexity_v2", time.perf_counter() - t_start, n_chunk))
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


def run_perplexity(model_path: str | Path, text_path: str | Path | None, params: PerplexityParams,
                   device: str = "auto", n_threads: int | None = None, progress: bool = True,
                   log: Log | None = None, emit: Log | None = None,
                   cluster: str | None = None) -> PerplexityResult | KLDivergenceResult:
    """kquant-perplexity: load the model, then llama-perplexity's default mode over the text (saving
    the log-probabilities to `params.logits_file` if set), its strided mode (`ppl_stride`), or with
    `params.kl_divergence` its KL-divergence mode against `params.logits_file` (no text needed).
    With `cluster` (a Dask scheduler address or local:N), the default mode's batches run on
    its workers (kquant.validation.on_cluster)."""
    log = log or log_stderr
    if cluster and (params.kl_divergence or params.logits_file or params.ppl_stride > 0):
        raise ModelError("--cluster runs llama-perplexity's default mode only: not with --kl-divergence, "
                         "--kl-divergence-base or --ppl-stride")
    if params.kl_divergence:
        return run_kl_divergence(model_path, params, device, n_threads, progress, log, emit)
    if text_path is None:
        raise ModelError("no text: give -f TEXT")
    if params.logits_file:  # before the model loads: a bad output path fails at once
        refuse_input_as_output(params.logits_file, [model_path, text_path])
        check_writable(Path(params.logits_file))
    batch_layout(params)
    text = read_text(text_path)  # llama.cpp reads -f first, while parsing its arguments
    source, tokenizer, device, threads = load_for_evaluation(model_path, device, n_threads)
    t0 = time.perf_counter()
    tokens = tokenizer.tokenize(text, add_special=True)
    log(f"perplexity: tokenizing {text_path}: {len(tokens)} tokens in {time.perf_counter() - t0:.2f} s")
    if params.exact and device != "cpu":
        raise ModelError("--exact reproduces llama.cpp's CPU backend: use --device cpu")
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    if cluster:
        return _on_cluster(cluster, model_path, device, n_threads, tokens, params, bos, tokenizer.n_vocab,
                           progress, log, emit)
    model = Transformer(source, device, progress)
    model.exact = params.exact
    log(f"{source.arch} model, {model.config.n_layer} layers, {device}, {threads} threads")
    if device == "cpu" and not forward_compiled():
        log(COMPILING)
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


def _on_cluster(address: str, model_path: str | Path, device: str, n_threads: int | None, tokens: np.ndarray,
                params: PerplexityParams, bos: int | None, n_vocab: int, progress: bool, log: Log,
                emit: Log) -> PerplexityResult:
    from ..cluster import ModelSpec, open_cluster

    with open_cluster(address, n_threads, log) as cluster:
        spec = ModelSpec(str(Path(model_path).resolve()), device, params.exact)
        return perplexity(None, tokens, params, bos, n_vocab, progress, log, emit, cluster=cluster, spec=spec)
