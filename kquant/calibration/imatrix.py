"""Computing an importance matrix the way llama-imatrix does (tools/imatrix/imatrix.cpp).

The text is tokenized once, cut into chunks of n_ctx tokens (BOS first when the model adds one),
and run n_batch / n_ctx chunks at a time through the model. For every matrix product of the
repeating blocks (and output.weight with process_output) the collector adds, per input column,
the squares of the activations of every token, and counts the tokens: the `in_sum2` and
`counts` of a GGUF imatrix. Products over fewer than 16 rows are skipped, as in llama.cpp.
Perplexity over the second half of each chunk comes for free from the same pass.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from ..archs.base import BLOCK_PREFIX
from ..errors import ModelError
from ..files.atomic import refuse_input_as_output
from ..files.text import read_text
from ..runtime import Transformer
from ..runtime.chunks import NllTotals, run_chunks
from ..runtime.device import to_host
from ..runtime.experts import ExpertInput, accumulate_expert_sumsq
from ..runtime.kernels import COMPILING, forward_compiled, accumulate_sumsq, token_nll, token_nll_exact
from ..runtime.weights import OUTPUT
from .imatrix_file import Imatrix, ImatrixEntry, accumulate, at_path, load_imatrix, save_imatrix

# llama.cpp's collect_imatrix ignores products of fewer rows ("why are small batches ignored?")
MIN_ROWS = 16


@dataclass
class ImatrixParams:
    """llama-imatrix's settings, with its defaults."""

    n_ctx: int = 512
    n_batch: int = 2048
    n_chunks: int = -1  # -1: every chunk of the text
    from_chunk: int = 0
    process_output: bool = False
    compute_ppl: bool = True
    parse_special: bool = False
    output_frequency: int = 10  # save the imatrix every N chunks
    save_frequency: int = 0  # keep a copy `<out>.at_N` every N chunks (0: none)
    out_file: str = "imatrix.gguf"
    output_format: str = "gguf"  # gguf | dat
    prompt_file: str = ""  # stored in the file as the dataset name
    exact: bool = False  # llama.cpp's CPU float order (x86 AVX2 build), as kquant-perplexity --exact


@dataclass
class ImatrixResult:
    imatrix: Imatrix
    n_chunks: int
    n_tokens: int
    seconds: float  # forward passes and collection, without loading and tokenizing
    ppl: float | None
    ppl_error: float | None
    chunk_ppl: list[float]


class Collector:
    """Accumulates sum-of-squares per column and token counts per weight, and saves the
    imatrix every `output_frequency` chunks, as IMatrixCollector::collect_imatrix does."""

    def __init__(self, params: ImatrixParams, imatrix: Imatrix, xp: Any = np,
                 on_save: Callable[[str], None] | None = None):
        self.params = params
        self.im = imatrix
        self.xp = xp
        self.chunk_size = params.n_ctx
        self.last_chunk = imatrix.chunk_count
        self.on_save = on_save
        self._device_sums: dict[str, Any] = {}  # GPU accumulators, copied back when saving
        self._pending: list[str] = []
        self._pending_x: Any = None

    def wants(self, name: str, rows: int) -> bool:
        if rows < MIN_ROWS:
            return False
        return name.startswith(BLOCK_PREFIX) or (self.params.process_output and name == OUTPUT)

    def observe(self, name: str, x: Any) -> None:
        """Called with the input of each weight's product. Consecutive calls with the same input
        array (Q/K/V, gate/up) are collected in one pass over it, at the next call or `flush`.
        A stacked expert tensor's input (an ExpertInput) is collected at once, whatever its
        rows: llama-imatrix collects every ggml_mul_mat_id."""
        if isinstance(x, ExpertInput):
            self.flush()
            self._collect_experts(name, x)
            return
        if not self.wants(name, x.shape[0]):
            return
        if self._pending and self._pending_x is not x:
            self.flush()
        self._pending.append(name)
        self._pending_x = x

    def flush(self) -> None:
        names, x = self._pending, self._pending_x
        self._pending, self._pending_x = [], None
        if not names:
            return
        rows, cols = x.shape
        entries = []
        for name in names:
            e = self.im.entries.get(name)
            if e is None:
                e = self.im.entries[name] = ImatrixEntry(np.zeros(cols, np.float32), np.zeros(1, np.int64))
            elif e.sums.size != cols:
                raise ModelError(f"inconsistent size for {name} ({e.sums.size} vs {cols}): the imatrix "
                                 "loaded with --in-file is not for this model")
            if e.counts.size > 1 and (e.counts == e.counts[0]).all():
                e.counts = e.counts[:1].copy()  # a dense tensor keeps a single count
            entries.append(e)
        if self.xp is np:
            # the sums stacked into one array: one compiled kernel for any number of matrices
            sums = np.stack([e.sums for e in entries])
            accumulate_sumsq(sums, np.ascontiguousarray(x, dtype=np.float32))
            for k, e in enumerate(entries):
                e.sums[:] = sums[k]
            bad = [n for n, e in zip(names, entries) if not np.isfinite(e.sums).all()]
        else:
            sq = (x * x).sum(axis=0)
            bad = []
            for name, e in zip(names, entries):
                acc = self._device_sums.get(name)
                if acc is None:
                    acc = self._device_sums[name] = self.xp.asarray(e.sums)
                acc += sq
                if not bool(self.xp.isfinite(acc).all()):
                    bad.append(name)
        if bad:
            raise ModelError(f"non-finite values detected in the activations of {bad[0]}")
        # counts first, then llama.cpp's save triggers in its order: a file saved here holds
        # every matrix of this input with its sums and counts in step
        for e in entries:
            e.counts += rows
        for e in entries:
            for c in e.counts:
                self._maybe_save(int(c) // self.chunk_size)

    def _collect_experts(self, name: str, inp: ExpertInput) -> None:
        """llama-imatrix's ggml_mul_mat_id branch: per expert, the squares of the rows routed to
        it (sums [n_expert, cols]) and their count; an expert no token chose keeps 0."""
        x = to_host(inp.x).astype(np.float32, copy=False)
        x = np.ascontiguousarray(x.reshape(x.shape[0], -1 if x.ndim == 3 else 1, x.shape[-1]))
        n_as = inp.n_expert
        e = self.im.entries.get(name)
        cols = x.shape[2]
        if e is None:
            e = self.im.entries[name] = ImatrixEntry(np.zeros(cols * n_as, np.float32), np.zeros(n_as, np.int64))
        elif e.counts.size == 1 and n_as > 1:  # broadcast, when loading an old imatrix
            e.counts = np.full(n_as, e.counts[0], np.int64)
        if e.sums.size != cols * n_as or e.counts.size != n_as:
            raise ModelError(f"inconsistent size for {name} ({e.sums.size} vs {cols * n_as}): the imatrix "
                             "loaded with --in-file is not for this model")
        sums = e.sums.reshape(n_as, cols)
        accumulate_expert_sumsq(sums, e.counts, x, inp.ids)
        touched = np.bincount(inp.ids.ravel(), minlength=n_as) > 0
        if not np.isfinite(sums[touched]).all():
            raise ModelError(f"non-finite values detected in the activations of {name}")
        for c in e.counts:
            self._maybe_save(int(c) // self.chunk_size)

    def _maybe_save(self, n_chunk: int) -> None:
        if n_chunk <= self.last_chunk:
            return
        step = n_chunk - self.last_chunk
        self.last_chunk = n_chunk
        p = self.params
        if p.output_frequency > 0 and (self.last_chunk % p.output_frequency) // step == 0:
            self.save()
        if p.save_frequency > 0 and (self.last_chunk % p.save_frequency) // step == 0:
            self.save(self.last_chunk)

    def snapshot(self) -> Imatrix:
        """The imatrix as it stands (device sums copied back)."""
        self.flush()
        for name, acc in self._device_sums.items():
            self.im.entries[name].sums = to_host(acc).astype(np.float32)
        self.im.chunk_count = self.last_chunk
        self.im.chunk_size = self.chunk_size
        return self.im

    def save(self, n_chunk: int = -1) -> str:
        p = self.params
        path = at_path(p.out_file, n_chunk) if n_chunk > 0 else p.out_file
        save_imatrix(self.snapshot(), path, p.output_format, p.prompt_file)
        if self.on_save is not None:
            self.on_save(path)
        return path


def load_in_files(paths: list[str], chunk_size: int) -> Imatrix:
    """The imatrices of --in-file, combined as llama-imatrix combines them."""
    im = Imatrix(chunk_size=chunk_size)
    for path in paths:
        accumulate(im, load_imatrix(path), chunk_size)
    return im


def check_against_source(im: Imatrix, source: Any) -> None:
    """Every entry of a loaded imatrix must be a matrix of this model with the same row length."""
    # each matrix's row length (the width of its input), by GGUF name
    widths = {t.name: t.shape[0] for t in source.tensors
              if len(t.shape) >= 2 and (t.name.startswith(BLOCK_PREFIX) or t.name == OUTPUT)}
    n_expert = source.get(f"{source.arch}.expert_count") or 0
    for name, e in im.entries.items():
        want = widths.get(name)
        if want is None:
            raise ModelError(f"the --in-file imatrix has an entry {name} that this model does not have")
        n_mat = max(1, e.counts.size)
        if e.sums.size != want * n_mat or n_mat not in (1, max(1, n_expert)):
            raise ModelError(f"the --in-file imatrix entry {name} has {e.sums.size // n_mat} columns, "
                             f"this model's has {want}")


@dataclass
class ChunkLayout:
    """How llama-imatrix cuts the tokens: n_chunk chunks of n_ctx, n_seq per batch of n_batch
    positions; positions lo .. hi - 1 of each chunk are scored (the second half's, from `first`)."""

    tokens: np.ndarray  # from --chunk on
    n_ctx: int
    n_chunk: int
    n_seq: int
    n_batch: int
    first: int
    lo: int
    hi: int


def chunk_layout(tokens: np.ndarray, params: ImatrixParams) -> ChunkLayout:
    n_ctx = params.n_ctx
    if n_ctx <= 0:
        raise ModelError("the imatrix needs a context size -c > 0")
    tokens = np.asarray(tokens, np.int64)
    if params.from_chunk > 0:
        if (params.from_chunk + 2) * n_ctx >= len(tokens):
            raise ModelError(f"there will be not enough tokens left after removing {params.from_chunk} chunks")
        tokens = tokens[params.from_chunk * n_ctx:]
    if len(tokens) < 2 * n_ctx:
        raise ModelError(f"you need at least {2 * n_ctx} tokens for a context of {n_ctx} tokens; "
                         f"the text tokenizes to only {len(tokens)} tokens")
    n_chunk_max = len(tokens) // n_ctx
    n_chunk = n_chunk_max if params.n_chunks < 0 else min(params.n_chunks, n_chunk_max)
    n_seq = max(1, params.n_batch // n_ctx)
    n_batch = min(params.n_batch, n_seq * n_ctx)  # below n_ctx, or a multiple of it
    first = n_ctx // 2
    # scored positions: the second half of each chunk, each predicting the next token
    lo, hi = (first, n_ctx - 1) if params.compute_ppl else (0, 0)
    return ChunkLayout(tokens, n_ctx, n_chunk, n_seq, n_batch, first, lo, hi)


def chunk_nlls(model: Transformer, layout: ChunkLayout, i: int, logits: list[np.ndarray]) -> list[np.ndarray]:
    """The scored tokens' negative log-likelihoods of the batch whose first chunk is i."""
    nll = token_nll_exact if model.exact else token_nll
    out = []
    for seq in range(len(logits)):
        s0 = (i + seq) * layout.n_ctx + layout.first
        v, _, _ = nll(logits[seq], layout.tokens[s0 + 1:s0 + 1 + len(logits[seq])])
        out.append(v)
    return out


def compute_imatrix(model: Transformer, tokens: np.ndarray, params: ImatrixParams, collector: Collector,
                    bos: int | None, progress: bool = True, log: Callable[[str], None] | None = None) -> ImatrixResult:
    """Run the chunks of `tokens` through the model, collecting into `collector`."""
    log = log or (lambda s: print(s, file=sys.stderr))
    lay = chunk_layout(tokens, params)
    log(f"computing over {lay.n_chunk} chunks, n_ctx={lay.n_ctx}, batch_size={lay.n_batch}, n_seq={lay.n_seq}")
    totals = NllTotals()
    chunk_ppl: list[float] = []
    start_time = time.perf_counter()
    bar = tqdm(total=lay.n_chunk, desc="imatrix", unit="chunk", disable=not progress, file=sys.stderr)
    for i, logits, _ in run_chunks(model, lay.tokens, lay.n_chunk, lay.n_ctx, lay.n_seq, lay.n_batch, lay.n_seq,
                                   lay.lo, lay.hi, bos, collector.observe, params.process_output, collector.flush):
        if params.compute_ppl:
            chunk_ppl.extend(totals.add(v) for v in chunk_nlls(model, lay, i, logits))
            bar.set_postfix_str(f"ppl {chunk_ppl[-1]:.4f}")
        bar.update(len(logits))
    bar.close()
    return _result(collector, lay, totals, chunk_ppl, time.perf_counter() - start_time, params)


def _result(collector: Collector, lay: ChunkLayout, totals: NllTotals, chunk_ppl: list[float], seconds: float,
            params: ImatrixParams) -> ImatrixResult:
    ppl = err = None
    if params.compute_ppl and totals.count > 1:
        ppl, err = totals.estimate()
    return ImatrixResult(collector.snapshot(), lay.n_chunk, lay.n_chunk * lay.n_ctx, seconds, ppl, err, chunk_ppl)


def run_imatrix(model_path: str | Path, text_path: str | Path, params: ImatrixParams,
                in_files: list[str] | None = None, device: str = "auto", n_threads: int | None = None,
                progress: bool = True, log: Callable[[str], None] | None = None,
                hessian_out: str | None = None, cluster: str | None = None) -> ImatrixResult:
    """kquant-imatrix: load the model and text, start from `in_files`, compute, save
    `params.out_file` (every `output_frequency` chunks and at the end); with `hessian_out`,
    also the layer Hessians (kquant.calibration.hessian_file) for kquant-quantize --method gptq.
    With `cluster` (a Dask scheduler address or local:N), the chunks run on its workers
    (kquant.calibration.on_cluster), each loading the model from `model_path`."""
    from ..models import open_model
    from ..runtime import Transformer, resolve_device, set_threads
    from ..tokenizer import Tokenizer

    log = log or (lambda s: print(s, file=sys.stderr))
    if params.output_format not in ("gguf", "dat"):
        raise ModelError(f"unknown output format {params.output_format!r} (gguf or dat)")
    refuse_input_as_output(params.out_file, [model_path, text_path, *(in_files or [])])
    if hessian_out:
        refuse_input_as_output(hessian_out, [model_path, text_path, params.out_file, *(in_files or [])])
        if in_files:
            raise ModelError("--hessian-out cannot start from --in-file imatrices (they hold no Hessians)")
    device = resolve_device(device)
    if hessian_out and device != "cpu":
        raise ModelError("--hessian-out collects on the CPU: use --device cpu")
    if params.exact and device != "cpu":
        raise ModelError("--exact reproduces llama.cpp's CPU backend: use --device cpu")
    threads = set_threads(n_threads)
    source = open_model(model_path, "f32")
    tokenizer = Tokenizer.from_source(source)
    text = read_text(text_path)
    t0 = time.perf_counter()
    tokens = tokenizer.tokenize(text, add_special=True, parse_special=params.parse_special)
    log(f"tokenized {text_path}: {len(tokens)} tokens in {time.perf_counter() - t0:.2f} s")
    n_expert = source.get(f"{source.arch}.expert_count") or 0
    if hessian_out and n_expert:
        raise ModelError(f"--hessian-out (GPTQ calibration) does not support mixture-of-experts models "
                         f"({source.arch}, {n_expert} experts) yet")
    im = load_in_files(in_files or [], params.n_ctx)
    check_against_source(im, source)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    if cluster:
        result, hessians = _on_cluster(cluster, model_path, device, n_threads, tokens, params, im, bos,
                                       hessian_out is not None, progress, log)
    else:
        model = Transformer(source, device, progress)
        model.exact = params.exact
        log(f"{source.arch} model, {model.config.n_layer} layers, {device}, {threads} threads")
        if device == "cpu" and not forward_compiled():
            log(COMPILING)
        if hessian_out:
            from .hessian import HessianCollector, Hessians

            collector = HessianCollector(params, im, Hessians(), model.xp)
        else:
            collector = Collector(params, im, model.xp)
        result = compute_imatrix(model, tokens, params, collector, bos, progress, log)
        hessians = getattr(collector, "hessians", None)
    if hessian_out:
        from ..quantization.calibrated import model_tag
        from .hessian_file import save_hessians

        save_hessians(hessian_out, hessians, result.imatrix, model_tag(source), str(text_path), result.n_chunks)
    save_imatrix(result.imatrix, params.out_file, params.output_format, params.prompt_file)
    return result


def _on_cluster(address: str, model_path: str | Path, device: str, n_threads: int | None, tokens: np.ndarray,
                params: ImatrixParams, im: Imatrix, bos: int | None, hessians: bool, progress: bool,
                log: Callable[[str], None]) -> tuple[ImatrixResult, Any]:
    from ..cluster import ModelSpec, open_cluster
    from .on_cluster import ClusterCollector, compute_on_cluster

    with open_cluster(address, n_threads, log) as cluster:
        collector = ClusterCollector(params, im, hessians)
        spec = ModelSpec(str(Path(model_path).resolve()), device, params.exact)
        result = compute_on_cluster(cluster, spec, tokens, params, collector, bos, progress, log)
    return result, collector.hessians


def combine_files(in_files: list[str], params: ImatrixParams) -> tuple[str, int]:
    """No text: the --in-file imatrices combined (or one converted) into params.out_file."""
    refuse_input_as_output(params.out_file, in_files)
    im = load_in_files(in_files, params.n_ctx)
    save_imatrix(im, params.out_file, params.output_format, params.prompt_file)
    return params.out_file, len(im.entries)
