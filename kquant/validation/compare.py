"""kquant-compare: one table of how close quantized files are to their base model.

`compare(base, quants, text)` runs BASE once over the text in llama-perplexity's chunks, saving
its log-probabilities to a temporary logits file (llama-perplexity's --kl-divergence-base
format), then runs each QUANT against that file in llama-perplexity's --kl-divergence mode. The
figures come from kquant.validation.perplexity / .kld themselves, so they are, digit for digit,
what `kquant-perplexity --kl-divergence` prints for the same files and options.

Next to them, the weight error of each 2-D tensor: both files' tensors dequantized, and

    err = sum_{rows r, columns j} im_j (wq_rj - w_rj)^2 / sum_{r, j} im_j w_rj^2

with im the tensor's imatrix weights (llama-quantize's per-column `quant_weights`, from a GGUF
or legacy .dat imatrix) or all ones. The table reports its mean over the tensors.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ..errors import ModelError
from ..files.atomic import atomic_path, check_writable, refuse_input_as_output
from ..files.gguf_read import split_paths
from ..files.source import ModelSource, SourceTensor
from ..files.text import read_text
from ..models import open_model
from .common import Log, PerplexityParams, batch_layout, log_nothing, log_stderr
# the percentile, median and printf helpers of llama-perplexity's statistics block: the table's
# KLD figures must be the block's own, to the digit
from .kld import KLDivergenceResult, median, percentile, printf_float, run_kl_divergence
from .perplexity import run_perplexity

F32 = np.float32
SLAB_VALUES = 1 << 22  # values dequantized at once: bounds memory on large embeddings


@dataclass
class TensorError:
    name: str
    type: str  # its ggml type in the quantized file
    error: float  # imatrix-weighted relative squared error against BASE


@dataclass
class Row:
    """One file of the table. For BASE, KLD is 0 and same-top 100 by definition."""

    name: str
    path: str
    size: int  # bytes on disk (all parts of a split model)
    bpw: float
    ppl: float
    kld_mean: float = 0.0
    kld_median: float = 0.0
    kld_p99: float = 0.0
    same_top: float = 100.0  # percent
    weight_error: float = 0.0  # mean of `tensors`' errors
    tensors: list[TensorError] = field(default_factory=list)
    is_base: bool = False
    kld: KLDivergenceResult | None = None  # the whole KL-divergence run, for callers that want more


@dataclass
class Report:
    base: Row
    quants: list[Row]
    n_chunks: int
    n_ctx: int
    seconds: float
    weighted: bool  # whether an imatrix weighted the weight errors

    def to_markdown(self) -> str:
        """The table: BASE first, then each QUANT; the PPL, KLD and same-top cells are printed
        as llama-perplexity's statistics block prints them (%.6f, %.3f)."""
        err = "weight err (imatrix)" if self.weighted else "weight err"
        lines = [f"| file | size (bytes) | bpw | PPL | mean KLD | median KLD | p99 KLD | same top (%) | {err} |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [_markdown_row(r) for r in [self.base, *self.quants]]
        return "\n".join(lines) + "\n"

    def tensors_markdown(self) -> str:
        """One per-tensor table per QUANT file (--tensors)."""
        out = []
        for r in self.quants:
            out += ["", f"### {_escape(r.name)}", "", "| tensor | type | weighted rel. error |", "|---|---|---:|"]
            out += [f"| {_escape(t.name)} | {t.type} | {t.error:.4e} |" for t in r.tensors]
        return "\n".join(out) + "\n"

    def summary(self) -> str:
        return (f"kquant-compare: {len(self.quants)} file(s) against {self.base.name} over {self.n_chunks} chunks x "
                f"{self.n_ctx} tokens, {self.seconds:.1f} s in all")


def _escape(s: str) -> str:
    return s.replace("|", "\\|")


def _cell(x: float, prec: int) -> str:
    # llama-perplexity's printf (via kld.printf_float: '-nan' as glibc prints it), without the padding
    return printf_float(x, 0, prec)


def _markdown_row(r: Row) -> str:
    name = _escape(r.name) + (" (base)" if r.is_base else "")
    if r.is_base:  # nothing to compare with: zero by definition
        rest = "0 | 0 | 0 | 100 | 0"
    else:
        rest = (f"{_cell(r.kld_mean, 6)} | {_cell(r.kld_median, 6)} | {_cell(r.kld_p99, 6)} | "
                f"{_cell(r.same_top, 3)} | {r.weight_error:.4e}")
    return f"| {name} | {r.size} | {r.bpw:.4f} | {_cell(r.ppl, 6)} | {rest} |"


# --- inputs ----------------------------------------------------------------------------------

def file_size(path: str | Path) -> int:
    """Bytes on disk: a split model's parts together, a folder's files together."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return sum(q.stat().st_size for q in split_paths(p))


def bits_per_weight(source: ModelSource) -> float:
    """Tensor data bits over tensor elements, every tensor counted (norms, embeddings and
    output too, at their stored types); metadata and alignment padding left out."""
    n = sum(t.n_elements for t in source.tensors)
    return 8.0 * sum(t.nbytes for t in source.tensors) / n if n else 0.0


def check_compatible(base: ModelSource, quant: ModelSource) -> None:
    """A QUANT must be BASE's model: same architecture, vocabulary and tensor shapes (checked
    before any long run, with a message naming what differs)."""
    q = quant.path or "QUANT"
    if quant.arch != base.arch:
        raise ModelError(f"{q}: architecture {quant.arch} differs from the base model's ({base.arch})")
    bt, qt = base.get("tokenizer.ggml.tokens") or [], quant.get("tokenizer.ggml.tokens") or []
    if len(bt) != len(qt):
        raise ModelError(f"{q}: a vocabulary of {len(qt)} tokens, the base model's has {len(bt)}")
    if bt != qt:
        i = next(i for i, (a, b) in enumerate(zip(bt, qt)) if a != b)
        raise ModelError(f"{q}: its vocabulary differs from the base model's (token {i}: {qt[i]!r} vs {bt[i]!r})")
    shapes = {t.name: t.shape for t in base.tensors}
    for t in quant.tensors:
        if shapes.get(t.name) != t.shape:
            what = f"shape {shapes[t.name]}" if t.name in shapes else "no such tensor"
            raise ModelError(f"{q}: tensor {t.name} of shape {t.shape}, the base model has {what}: "
                             "another architecture")
    if len(quant.tensors) != len(shapes):
        raise ModelError(f"{q}: {len(quant.tensors)} tensors, the base model has {len(shapes)}: another architecture")


def check_decodable(source: ModelSource) -> None:
    """Every 2-D tensor in a type kquant dequantizes (the weight error needs them all)."""
    from ..codecs import CODECS

    for t in source.tensors:
        if len(t.shape) == 2 and t.type not in CODECS:
            raise ModelError(f"{source.path or 'the model'}: tensor {t.name} is {t.type.name}, which kquant cannot "
                             "dequantize")


def imatrix_weights(path: str | Path, base: ModelSource) -> dict[str, np.ndarray]:
    """Per-column weights by tensor name from a GGUF or legacy .dat imatrix, as llama-quantize
    derives them, checked against BASE's 2-D tensors."""
    from ..calibration.imatrix_file import load_imatrix, weights_for_quantize

    weights = weights_for_quantize(load_imatrix(path))
    cols = {t.name: t.shape[0] for t in base.tensors if len(t.shape) == 2}
    if not set(weights) & set(cols):
        raise ModelError(f"{path}: no entry names a tensor of the base model: the imatrix is of another model")
    for name, w in weights.items():
        if name in cols and w.size != cols[name]:
            raise ModelError(f"{path}: {name} has {w.size} weights for rows of {cols[name]}: the imatrix is of "
                             "another model")
    return weights


# --- weight error ----------------------------------------------------------------------------

def _rows(t: SourceTensor) -> np.ndarray:
    """The tensor's stored bytes, one row of blocks per line."""
    raw = np.ascontiguousarray(t.load()).view(np.uint8)
    return raw.reshape(t.n_elements // t.shape[0], -1)


def tensor_error(base: SourceTensor, quant: SourceTensor, weights: np.ndarray | None,
                 n_threads: int | None = None) -> float:
    """sum im_j (wq - w)^2 / sum im_j w^2 over all rows and columns (0 for equal tensors),
    dequantized a slab of rows at a time and summed in float64."""
    from ..codecs.api import dequantize

    a, b = _rows(base), _rows(quant)
    im = np.ones(base.shape[0]) if weights is None else np.asarray(weights, np.float64)
    step = max(1, SLAB_VALUES // base.shape[0])
    num = den = 0.0
    for r0 in range(0, a.shape[0], step):
        w = dequantize(a[r0:r0 + step], base.type, n_threads).astype(np.float64)
        d = dequantize(b[r0:r0 + step], quant.type, n_threads) - w
        num += float(np.square(d).sum(axis=0) @ im)
        den += float(np.square(w).sum(axis=0) @ im)
    for t in (base, quant):
        if t.release is not None:
            t.release()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def weight_errors(base: ModelSource, quant: ModelSource, weights: dict[str, np.ndarray] | None = None,
                  n_threads: int | None = None, progress: bool = False) -> list[TensorError]:
    """The weighted relative error of every 2-D tensor of `quant` against `base` (tensors the
    imatrix does not name, e.g. token_embd, are weighted evenly, as llama-quantize does)."""
    by_name = {t.name: t for t in base.tensors}
    todo = [t for t in quant.tensors if len(t.shape) == 2]
    out = []
    for t in tqdm(todo, desc="weights", unit="tensor", disable=not progress, file=sys.stderr, leave=False):
        w = (weights or {}).get(t.name)
        out.append(TensorError(t.name, t.type.name, tensor_error(by_name[t.name], t, w, n_threads)))
    return out


# --- the comparison --------------------------------------------------------------------------

def check_params(params: PerplexityParams) -> None:
    if params.n_chunks == 0 or params.n_chunks < -1:
        raise ModelError(f"--chunks {params.n_chunks}: give a positive number of chunks (default: all)")
    if params.ppl_stride > 0:
        raise ModelError("strided perplexity has no KL-divergence mode: leave ppl_stride at 0")
    batch_layout(params)  # -c and -b


def _base_row(path: str | Path, source: ModelSource, ppl: float) -> Row:
    return Row(Path(path).name, str(path), file_size(path), bits_per_weight(source), ppl, is_base=True)


def _quant_row(path: str | Path, source: ModelSource, kld: KLDivergenceResult, errors: list[TensorError]) -> Row:
    f = kld.summary()
    # sorted in float32, as llama-perplexity sorts its KLD values for the percentiles
    kv = np.sort(np.asarray(kld.kld_values, F32))
    mean_err = float(np.mean([e.error for e in errors])) if errors else 0.0
    return Row(Path(path).name, str(path), file_size(path), bits_per_weight(source), f["ppl"], f["kld"],
               median(kv), percentile(kv, 0.990), 100.0 * f["same_top"], mean_err, errors, kld=kld)


def _open_inputs(base: str | Path, quants: Sequence[str | Path], text: str | Path, params: PerplexityParams,
                 imatrix: str | Path | None) -> tuple[ModelSource, list[ModelSource], dict[str, np.ndarray] | None]:
    """Every input checked before the first forward pass: a bad one fails in a second, not after
    the base run."""
    check_params(params)
    if not quants:
        raise ModelError("no file to compare: give BASE and at least one QUANT")
    base_src = open_model(base, "f32")
    quant_srcs = [open_model(q, "f32") for q in quants]
    for q in quant_srcs:
        check_compatible(base_src, q)
    for src in (base_src, *quant_srcs):
        check_decodable(src)
    weights = imatrix_weights(imatrix, base_src) if imatrix else None
    read_text(text)
    return base_src, quant_srcs, weights


def compare(base: str | Path, quants: Sequence[str | Path], text: str | Path,
            params: PerplexityParams | None = None, imatrix: str | Path | None = None, device: str = "auto",
            n_threads: int | None = None, progress: bool = True, log: Log | None = None) -> Report:
    """BASE's perplexity over `text`, then each QUANT's PPL, KLD and same-top rate against BASE
    (kquant-perplexity --kl-divergence's run and figures) and its per-tensor weight error.
    `params` gives -c, -b and --chunks (llama-perplexity's defaults when None). Every input is
    checked before the first forward pass. The base logits go to a temporary file (in TMPDIR;
    n_chunks * n_ctx/2 * n_vocab * 2 bytes), removed at the end."""
    t0 = time.perf_counter()
    log = log or log_stderr
    params = replace(params or PerplexityParams(), logits_file="", kl_divergence=False)
    base_src, quant_srcs, weights = _open_inputs(base, quants, text, params, imatrix)
    bar = tqdm(total=1 + len(quants), desc="compare", unit="file", disable=not progress, file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory(prefix="kquant-compare-") as tmp:
            logits = str(Path(tmp) / "base.logits")
            res = run_perplexity(base, text, replace(params, logits_file=logits), device, n_threads, progress,
                                 log_nothing)
            base_row = _base_row(base, base_src, res.ppl)
            log(f"kquant-compare: {base_row.name}: PPL {res.ppl:.4f} over {res.n_chunks} chunks x {res.n_ctx} tokens")
            bar.update(1)
            kld_params = replace(params, logits_file=logits, kl_divergence=True)
            rows = []
            for path, src in zip(quants, quant_srcs):
                kld = run_kl_divergence(path, kld_params, device, n_threads, progress, log_nothing)
                rows.append(_quant_row(path, src, kld, weight_errors(base_src, src, weights, n_threads, progress)))
                log(f"kquant-compare: {rows[-1].name}: PPL {rows[-1].ppl:.4f}, mean KLD {rows[-1].kld_mean:.6f}, "
                    f"weight error {rows[-1].weight_error:.4e}")
                bar.update(1)
    finally:
        bar.close()
    return Report(base_row, rows, res.n_chunks, res.n_ctx, time.perf_counter() - t0, weights is not None)


# --- the plot --------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ModelError("--plot needs matplotlib: pip install 'kquant[plot]'") from None
    return plt


def check_plot(png_path: str | Path, inputs: Sequence[str | Path | None]) -> None:
    """Fail before the long run, not after it: matplotlib missing, or a bad output path."""
    _pyplot()
    refuse_input_as_output(png_path, inputs)
    check_writable(Path(png_path))


def plot_report(report: Report, png_path: str | Path) -> Path:
    """Mean KLD (log scale) against bits per weight for the QUANT files, each labelled with its name;
    written atomically. Points with a KLD of 0 or less cannot sit on a log axis and are left out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    pts = [r for r in report.quants if r.kld_mean > 0]
    ax.plot([r.bpw for r in pts], [r.kld_mean for r in pts], "o")
    for r in pts:
        ax.annotate(r.name, (r.bpw, r.kld_mean), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set_yscale("log")
    ax.margins(0.15)  # room for the labels
    ax.set_xlabel("bits per weight (tensor data)")
    ax.set_ylabel("mean KLD against the base")
    ax.set_title(f"against {report.base.name} ({report.base.bpw:.2f} bpw), "
                 f"{report.n_chunks} chunks x {report.n_ctx} tokens")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)  # the temporary name has no .png suffix
    plt.close(fig)
    return Path(png_path)
