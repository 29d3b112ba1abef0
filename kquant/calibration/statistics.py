"""llama-imatrix --show-statistics: per-tensor statistics of an importance matrix.

`compute_statistics` reproduces tools/imatrix/imatrix.cpp's compute_statistics and
compute_cossim with the same float32 arithmetic (sequential float32 sums as std::accumulate
and std::inner_product do them, glibc's log2f), sorted as show_statistics sorts them (by
tensor kind, then by decreasing Σ(Act²)); `format_statistics` prints both of its tables with
its printf formats, byte for byte the text llama-imatrix logs (to stderr, LOG_INF) from
"Computing statistics for ..." on. `plot_statistics` draws the per-layer figures.

llama-imatrix first loads the file into its collector, so a caller does the same:

    im = Imatrix()
    accumulate(im, load_imatrix(path), n_ctx // n_parallel)  # 512 by default
    print(format_statistics(compute_statistics(im), path), end="", file=sys.stderr)

(`statistics_of_file` does the first two lines.) n_parallel here is the -np option as given
(default 1): --show-statistics runs before llama-imatrix derives it from -b; only a legacy
.dat file's values depend on the chunk size.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from .imatrix_file import Imatrix, accumulate, load_imatrix
from ..errors import ModelError

__all__ = ["TensorStats", "compute_statistics", "format_statistics", "plot_statistics",
           "statistics_of_file"]


@dataclass
class TensorStats:
    """One row of the first table (C++ tensor_statistics); floats are float32 values."""

    tensor: str
    values: np.ndarray  # the raw sums (float32), what CosSim compares
    counts: np.ndarray  # int64, per matrix
    total_sqract: float = 0.0
    mean_sqract: float = 0.0
    max_sqract: float = 0.0
    min_sqract: float = 0.0
    elements: int = 0
    stddev: float = 0.0
    active: float = 0.0
    entropy: float = 0.0
    zd: float = 0.0
    cossim: float = 0.0

    @property
    def layer(self) -> str:
        return process_tensor_name(self.tensor)[0]

    @property
    def kind(self) -> str:
        return process_tensor_name(self.tensor)[1]


def process_tensor_name(name: str) -> tuple[str, str]:
    """(layer, tensor kind) as process_tensor_name splits them: the item after "blk" ("-" if
    none) and the item before "weight" (the whole name if none); items are split on '.' as
    std::getline does (no trailing empty item)."""
    items = name.split(".")
    if items and items[-1] == "":
        items.pop()
    layer = tensor = ""
    for i, item in enumerate(items):
        if item == "blk" and i + 1 < len(items):
            layer = items[i + 1]
            break
    for i, item in enumerate(items):
        if item == "weight" and i > 0:
            tensor = items[i - 1]
            break
    return layer or "-", tensor or name


@njit(cache=True)
def _stats_kernel(values, counts, row_size):  # pragma: no cover - compiled
    f0 = np.float32(0.0)
    n_mat = counts.size
    acts = np.empty(values.size, np.float32)
    n = 0
    for i in range(n_mat):
        if counts[i] == 0:
            continue
        c = np.float32(counts[i])
        for j in range(row_size):
            acts[n] = values[i * row_size + j] / c
            n += 1
    out = np.zeros(9, np.float32)
    if n == 0:
        return 0, out
    total = f0
    for k in range(n):
        total = total + acts[k]
    largest = acts[0]
    smallest = acts[0]
    for k in range(1, n):
        if largest < acts[k]:
            largest = acts[k]
        if acts[k] < smallest:
            smallest = acts[k]
    fn = np.float32(n)
    mean = total / fn
    sqr = f0
    for k in range(n):
        sqr = sqr + acts[k] * acts[k]
    var = sqr / fn - mean * mean
    dev = np.sqrt(var if f0 < var else f0)
    threshold = np.float32(1e-5)
    inactive = 0
    for k in range(n):
        if abs(acts[k]) <= threshold:
            inactive += 1
    active = np.float32(1.0) - np.float32(inactive) / fn
    entropy = f0
    if total > f0:
        for k in range(n):
            p = acts[k] / total
            if p > f0:
                entropy = entropy - p * np.float32(math.log2(p))
    z = 0
    if dev > f0:
        for k in range(n):
            if (acts[k] - mean) / dev > np.float32(1.0):
                z += 1
    out[0] = total
    out[1] = mean
    out[2] = largest
    out[3] = smallest
    out[4] = dev
    out[5] = active
    out[6] = entropy
    out[7] = np.float32(z) / fn
    return n, out


# error_model="numpy": an all-zero entry divides 0 by 0, which is NaN in C++ as in numpy
# (llama-imatrix prints it), not Python's ZeroDivisionError
@njit(cache=True, error_model="numpy")
def _cossim_kernel(cur, prev):  # pragma: no cover - compiled
    f0 = np.float32(0.0)
    n = min(cur.size, prev.size)
    dp = f0
    cc = f0
    pp = f0
    for k in range(n):
        dp = dp + cur[k] * prev[k]
    for k in range(cur.size):
        cc = cc + cur[k] * cur[k]
    for k in range(prev.size):
        pp = pp + prev[k] * prev[k]
    return dp / (np.sqrt(cc) * np.sqrt(pp))


_BLK = re.compile(r"blk\.([0-9]+)\.")


def _stats_order(a: TensorStats, b: TensorStats) -> int:
    """show_statistics' comparator: kind name (bytes) ascending, then Σ(Act²) descending."""
    ka, kb = a.kind.encode("utf-8", "surrogateescape"), b.kind.encode("utf-8", "surrogateescape")
    if ka < kb or (ka == kb and a.total_sqract > b.total_sqract):
        return -1
    if kb < ka or (ka == kb and b.total_sqract > a.total_sqract):
        return 1
    return 0


def compute_statistics(im: Imatrix, errors: list[str] | None = None) -> list[TensorStats]:
    """The statistics of every entry of `im` (the collector's raw form, see `accumulate`) in
    llama-imatrix's printed order, CosSim against the same tensor of the previous block
    included. Entries it skips (sizes that do not split into the counts, every count zero)
    are left out, with its LOG_ERR message appended to `errors` if given."""
    ts: list[TensorStats] = []
    for name in sorted(im.entries):
        e = im.entries[name]
        values = np.ascontiguousarray(e.sums, np.float32).ravel()
        counts = np.ascontiguousarray(e.counts, np.int64).ravel()
        if counts.size == 0:
            if errors is not None:
                errors.append(f"compute_statistics: there are no activations for tensor {name}."
                              " The imatrix may be suboptimal\n")
            continue
        if values.size % counts.size:
            if errors is not None:
                errors.append(f"compute_statistics: activation size mismatch for tensor {name} "
                              f"({counts.size} vs {values.size})\n")
            continue
        n, r = _stats_kernel(values, counts, values.size // counts.size)
        if n == 0:
            if errors is not None:
                errors.append(f"compute_statistics: all counts are zero for tensor {name}, "
                              "skipping statistics computation\n")
            continue
        ts.append(TensorStats(name, values, counts, total_sqract=r[0], mean_sqract=r[1],
                              max_sqract=r[2], min_sqract=r[3], elements=int(n), stddev=r[4],
                              active=r[5], entropy=r[6], zd=r[7], cossim=np.float32(0.0)))
    by_name = {t.tensor: t for t in ts}
    for t in ts:
        m = _BLK.search(t.tensor)
        if m is None:
            continue
        tname = t.tensor[:m.start(1)] + str(int(m.group(1)) - 1) + t.tensor[m.end(1):]
        prev = by_name.get(tname)
        if prev is not None:
            t.cossim = _cossim_kernel(t.values, prev.values)
    ts.sort(key=functools.cmp_to_key(_stats_order))
    return ts


def statistics_of_file(path: str | Path, chunk_size: int = 512,
                       errors: list[str] | None = None) -> list[TensorStats]:
    """llama-imatrix --show-statistics --in-file PATH: load the file into a fresh collector
    with `chunk_size` (n_ctx / n_parallel of the command line, 512 by default) and compute."""
    im = Imatrix()
    accumulate(im, load_imatrix(path), chunk_size)
    return compute_statistics(im, errors)


# ---------------------------------------------------------------------------------------------
# printf


def _pad(s: str, width: int, left: bool = False) -> str:
    """%*s / %-*s: printf pads by bytes, not characters."""
    n = width - len(s.encode("utf-8", "surrogateescape"))
    if n <= 0:
        return s
    return s + " " * n if left else " " * n + s


def _f(x, width: int, prec: int) -> str:
    """printf("%{width}.{prec}f", (double) x) as glibc prints it (NaN with its sign)."""
    v = float(x)
    if math.isnan(v):
        return _pad("-nan" if math.copysign(1.0, v) < 0 else "nan", width)
    if math.isinf(v):
        return _pad("-inf" if v < 0 else "inf", width)
    return f"{v:{width}.{prec}f}"


def _stoi(s: str) -> int:
    """std::stoi of the layer item, -1 where it throws (no number, out of int range)."""
    m = re.match(r"[ \t\n\v\f\r]*([+-]?[0-9]+)", s)
    if not m:
        return -1
    v = int(m.group(1))
    return v if -2**31 <= v < 2**31 else -1


def _table_rows(stats: list[TensorStats]):
    f32 = np.float32
    rows = []
    ws: dict[int, list] = {}
    for t in stats:
        layer, name = process_tensor_name(t.tensor)
        blk = _stoi(layer)
        entropy_norm = (f32(100.0 * (float(t.entropy) / math.log2(t.elements)))
                        if t.elements > 0 else f32(0.0))
        rows.append((layer, name, t, entropy_norm))
        e = f32(t.elements)
        w = (e * f32(t.total_sqract), e * f32(t.zd), e * f32(t.cossim))
        if blk in ws:
            acc = ws[blk]
            acc[0], acc[1], acc[2] = acc[0] + w[0], acc[1] + w[1], acc[2] + w[2]
            acc[3] = acc[3] + t.elements
        else:
            ws[blk] = [w[0], w[1], w[2], t.elements]
    return rows, ws


def _layer_averages(ws: dict[int, list]) -> list[tuple[int, np.float32, np.float32, np.float32]]:
    out = []
    for layer in sorted(ws):
        b, z, c, n = ws[layer]
        if n == 0 or layer < 0:
            continue
        fn = np.float32(n)
        out.append((layer, b / fn, z / fn, c / fn))
    return out


def format_statistics(stats: list[TensorStats], file_name: str) -> str:
    """The text llama-imatrix --show-statistics logs (LOG_INF, stderr), from its blank line
    before "Computing statistics for FILE (N tensors)" to the blank line after the per-layer
    table; `stats` as compute_statistics returns them and `file_name` as given to --in-file.
    Without --no-log-prefix llama-imatrix prefixes each LOG_INF call's text (not each line)
    with a timestamp and "I "."""
    f32 = np.float32
    out = [f"\nComputing statistics for {file_name} ({len(stats)} tensors)\n",
           "\n" + "\t".join((" Layer", "       Tensor", "          Σ(Act²)", "  Min",
                              "            Max", "           μ", "   σ", " % Active", "N",
                              "   Entropy", "E (norm)", "ZD", "  CosSim")) + "\n",
           "=" * 169 + "\n"]
    rows, ws = _table_rows(stats)
    for layer, name, t, entropy_norm in rows:
        out.append("\t".join((
            _pad(layer, 5), _pad(name, 20, left=True), _f(t.total_sqract, 10, 2),
            _f(t.min_sqract, 8, 4), _f(t.max_sqract, 11, 4), _f(t.mean_sqract, 6, 2),
            _f(t.stddev, 6, 2), _f(f32(t.active) * f32(100.0), 8, 2) + "%",
            f"{t.elements:6d}", _f(t.entropy, 10, 4), _f(entropy_norm, 6, 2) + "%",
            _f(f32(100.0) * f32(t.zd), 10, 2) + "%", _f(t.cossim, 8, 4))) + "\n")
    layers = sum(1 for k in ws if k >= 0)
    out.append(f"\nComputing weighted average statistics per layer ({layers} layers)\n")
    out.append("\n" + "\t".join(("  Layer", "     μΣ(Act²)", "      μZD", "μCosSim")) + "\n")
    out.append("=" * 48 + "\n")
    for layer, bias, zd, cossim in _layer_averages(ws):
        out.append(f"{layer:5d}\t{_f(bias, 14, 2)}\t{_f(f32(100.0) * zd, 10, 4)}%\t"
                   f"{_f(cossim, 6, 4)}\n")
    out.append("\n")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# plots


def plot_statistics(stats: list[TensorStats], png_path: str | Path) -> Path:
    """Per-layer figures, one PNG: on the left for each tensor kind (attn_q, ffn_down, ...)
    its Σ(Act²), ZD and CosSim against the layer number; on the right the per-layer weighted
    averages of the second table (μΣ(Act²), μZD, μCosSim). Tensors outside the blocks
    (output.weight) are left out, as from that table. Needs matplotlib (imported here only)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ModelError("--plot needs matplotlib: pip install matplotlib") from None
    by_kind: dict[str, list[tuple[int, TensorStats]]] = {}
    for t in stats:
        blk = _stoi(t.layer)
        if blk >= 0:
            by_kind.setdefault(t.kind, []).append((blk, t))
    _, ws = _table_rows(stats)
    averages = _layer_averages(ws)
    fig, axes = plt.subplots(3, 2, figsize=(14, 11), sharex=True, squeeze=False)
    panels = (("Σ(Act²)", lambda t: float(t.total_sqract), "μΣ(Act²)", lambda a: float(a[1])),
              ("ZD (%)", lambda t: 100.0 * float(t.zd), "μZD (%)", lambda a: 100.0 * float(a[2])),
              ("CosSim", lambda t: float(t.cossim), "μCosSim", lambda a: float(a[3])))
    for row, (title, get, wtitle, wget) in enumerate(panels):
        ax = axes[row][0]
        for kind in sorted(by_kind):
            pts = sorted(by_kind[kind], key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [get(p[1]) for p in pts], marker=".", label=kind)
        ax.set_ylabel(title)
        ax2 = axes[row][1]
        ax2.plot([a[0] for a in averages], [wget(a) for a in averages], marker="o",
                 color="black")
        ax2.set_ylabel(wtitle)
        if row == 0:  # magnitudes span decades across kinds
            ax.set_yscale("symlog", linthresh=1e-3)
        for a in (ax, ax2):
            a.grid(True, alpha=0.3)
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
    if by_kind:
        axes[0][0].legend(fontsize="small", ncol=3)
    axes[0][0].set_title("per tensor kind")
    axes[0][1].set_title("weighted average per layer")
    axes[2][0].set_xlabel("layer")
    axes[2][1].set_xlabel("layer")
    fig.suptitle("imatrix statistics per layer")
    fig.tight_layout()
    out = Path(png_path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
