"""Per-tensor bit allocation under a size budget: `kquant-quantize --target-bpw X | --target-size B`.

llama.cpp's mixes (Q4_K_M, ...) give each tensor a type by fixed rules. Here the mix only says
which tensors are quantized at all (norms and small tensors stay as the mix leaves them, and
--tensor-type choices stay fixed); every other tensor gets the type that minimises the model's
estimated loss under the budget.

The estimate is additive over tensors: loss = sum_t s_t e_t(type_t), with
- e_t(type) the imatrix-weighted squared error of quantizing tensor t to that type,
  sum_j imatrix_j (w_rj - q_rj)^2 over its rows (the expected squared change of the matrix's
  outputs per token, the imatrix being the mean of x_j^2 over calibration tokens), measured on
  a sample of rows and scaled up to all of them; token_embd (a row lookup, no imatrix) takes
  the mean over its rows of ||w_r - q_r||^2, the change of one looked-up token's embedding;
- s_t the tensor's sensitivity: how much loss one unit of that error costs (1 unless measured;
  kquant.quantization.sensitivity).

For an additive estimate the Lagrangian choice (each tensor minimises s e + lambda bytes) is
exact at every lambda; the allocator walks each tensor's lower convex hull of (bytes, loss)
from its smallest type upwards, taking the steps that buy the most loss per byte first while
they fit (`allocate`), which visits every lambda's solution in turn and then fills what budget
is left with the best steps that still fit. Deterministic: ties go to the earlier tensor.
"""
from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Collection

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from tqdm import tqdm

from ..codecs.api import dequantize, quantize
from ..errors import ModelError
from ..types import TYPES
from . import mixes

#: candidates for rows that are a multiple of 256 values, and the legacy ones for other rows
#: (what llama.cpp's mixes fall back to); smallest first. These are what the GPTQ sweep knows.
K_CANDIDATES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
LEGACY_CANDIDATES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
#: the i-quants beside them, by the block they need (256-value super-blocks, or 32 for IQ4_NL);
#: a candidate only once kquant both writes and runs it (a codec and a CPU kernel), so every
#: allocated file can be validated with kquant-perplexity
IQ_CANDIDATES = (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS)
IQ_LEGACY_CANDIDATES = (T.IQ4_NL,)

#: rows quantized per tensor and candidate to estimate its error (evenly spaced, all if fewer)
SAMPLE_ROWS = 256


def _needs_imatrix(name: str, qtype: T) -> bool:
    """llama-quantize refuses the type without an imatrix (tensor_requires_imatrix), or ggml
    cannot quantize it without one (IQ1_S for token_embd, which llama-quantize exempts)."""
    return mixes.requires_imatrix(name, qtype, "Q4_K_M") or TYPES[qtype].codec.requires_imatrix


def _runnable(qtype: T) -> bool:
    record = TYPES.get(qtype)
    return record is not None and record.codec is not None and record.cpu_kernel is not None


def candidate_types(n_per_row: int, name: str = "", has_imatrix: bool = True,
                    allowed: Collection[T] | None = None) -> tuple[T, ...]:
    """The types a tensor with rows of n_per_row values can take, smallest first (bytes per
    value; at equal size the K-quant or legacy type first). The i-quants among them only where
    `allowed` (None: all; --method gptq allows the types its sweeps know), and those
    llama-quantize makes only with an imatrix only when there is one."""
    if n_per_row % 256 == 0:
        base, extra = K_CANDIDATES, IQ_CANDIDATES
    elif n_per_row % 32 == 0:
        base, extra = LEGACY_CANDIDATES, IQ_LEGACY_CANDIDATES
    else:
        return ()
    extra = tuple(q for q in extra if _runnable(q) and (allowed is None or q in allowed)
                  and (has_imatrix or not _needs_imatrix(name, q)))
    return tuple(sorted(base + extra, key=lambda q: GGML_QUANT_SIZES[q][1] / GGML_QUANT_SIZES[q][0]))


def type_nbytes(qtype: T, n_elements: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n_elements // block * size


@dataclass
class Options:
    """One tensor's candidates: types (smallest first), their bytes and estimated losses."""

    name: str
    types: tuple[T, ...]
    nbytes: np.ndarray  # int64 (n,)
    loss: np.ndarray  # float64 (n,): sensitivity x error
    digest: str = ""  # sha256 of the sampled rows and the imatrix the estimate was made from

    def hull(self) -> list[int]:
        """Indices of the candidates on the lower convex hull of (bytes, loss), smallest
        first: the only ones a Lagrangian choice ever takes (a larger type that errs no less
        is never on it)."""
        order = sorted(range(len(self.types)), key=lambda i: (self.nbytes[i], self.loss[i]))
        hull: list[int] = []
        for i in order:
            if hull and self.loss[i] >= self.loss[hull[-1]]:
                continue  # no better for more bytes
            while len(hull) >= 2 and _cross(self, hull[-2], hull[-1], i) <= 0:
                hull.pop()
            hull.append(i)
        return hull


def _cross(o: Options, a: int, b: int, c: int) -> float:
    """> 0 when b lies below the segment a-c (b stays on the lower hull)."""
    ax, ay = float(o.nbytes[a]), float(o.loss[a])
    bx, by = float(o.nbytes[b]), float(o.loss[b])
    cx, cy = float(o.nbytes[c]), float(o.loss[c])
    return (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)


def allocate(options: list[Options], budget: int) -> list[int]:
    """Each tensor's candidate index, total bytes at most `budget`, minimising the summed loss
    as the Lagrangian does. Raises ModelError when even the smallest types do not fit."""
    hulls = [o.hull() for o in options]
    pos = [0] * len(options)
    used = sum(int(o.nbytes[h[0]]) for o, h in zip(options, hulls))
    if used > budget:
        raise ModelError(f"the budget of {budget} bytes of tensor data is below the smallest "
                         f"possible ({used} bytes, every tensor at its smallest type)")
    steps = []  # (loss saved per byte, tensor, step) for every hull step
    for t, (o, h) in enumerate(zip(options, hulls)):
        for k in range(1, len(h)):
            gain = (o.loss[h[k - 1]] - o.loss[h[k]]) / float(o.nbytes[h[k]] - o.nbytes[h[k - 1]])
            steps.append((-gain, t, k))
    steps.sort()
    blocked = [False] * len(options)
    for _, t, k in steps:
        if blocked[t] or pos[t] != k - 1:
            continue  # a tensor's steps come in order: a step that did not fit ends its climb
        h = hulls[t]
        extra = int(options[t].nbytes[h[k]] - options[t].nbytes[h[k - 1]])
        if used + extra > budget:
            blocked[t] = True
            continue
        used += extra
        pos[t] = k
    return [h[p] for h, p in zip(hulls, pos)]


def sample_rows(n_rows: int, n: int = SAMPLE_ROWS) -> np.ndarray:
    """n evenly spaced row indices (all rows when there are no more)."""
    if n_rows <= n:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, n).round().astype(np.int64))


def weighted_errors(x: np.ndarray, types: tuple[T, ...], imatrix: np.ndarray | None,
                    n_rows: int, lookup: bool = False, n_threads: int | None = None) -> np.ndarray:
    """The error estimate e(type) of a tensor from a sample x (rows, n_per_row) float32 of its
    n_rows rows: the imatrix-weighted squared error summed over rows (scaled from the sample
    to n_rows), or with `lookup` (token embeddings) the mean over rows of the plain squared
    error. Each type is quantized as the file would be, with the imatrix."""
    weight = np.ones(x.shape[1]) if imatrix is None or lookup else imatrix.astype(np.float64)
    out = np.empty(len(types))
    for i, qtype in enumerate(types):
        q = dequantize(quantize(x, qtype, imatrix, n_threads=n_threads), qtype, n_threads=n_threads)
        d = (x.astype(np.float64) - q) ** 2
        per_row = d @ weight
        out[i] = per_row.mean() if lookup else per_row.mean() * n_rows
    return out


_FLOAT = (T.F32, T.F16, T.BF16)
_BLK = re.compile(r"^blk\.\d+\.")


def tensor_kind(name: str) -> str:
    """attn_q, ffn_down, token_embd, output...: a tensor's name without its block number."""
    return _BLK.sub("", name).removesuffix(".weight")


@dataclass
class Allocation:
    """What the allocator chose: per tensor its type, estimated loss and bytes, in plan order."""

    rows: list[tuple[str, T, float, int]]
    budget: int  # bytes of tensor data allowed for the allocated tensors
    used: int
    sensitivity: Any  # sensitivity.Sensitivity where measured, else None

    @property
    def loss(self) -> float:
        return sum(r[2] for r in self.rows)

    def line(self) -> str:
        counts: dict[T, int] = {}
        for _, qtype, _, _ in self.rows:
            counts[qtype] = counts.get(qtype, 0) + 1
        mix = ", ".join(f"{n} {q.name}" for q, n in sorted(counts.items(), key=lambda kv: kv[0].value))
        return (f"allocation: {len(self.rows)} tensors chosen ({mix}), {self.used} of {self.budget} "
                f"bytes, estimated loss {self.loss:.4g}")


def allocatable(p: Any, fixed: Callable[[str], bool]) -> bool:
    """Whether the allocator chooses this planned tensor's type: the mix quantizes it from a
    float type, no option fixes it, and some candidate fits its rows."""
    return (p.source.type in _FLOAT and p.target not in _FLOAT and len(p.source.shape) >= 2
            and not fixed(p.name) and bool(candidate_types(p.source.shape[0])))


def estimate(p: Any, n_threads: int | None = None, allowed: Collection[T] | None = None) -> Options:
    """A planned tensor's candidates with their bytes and error estimates (weighted_errors on
    a row sample; the losses before any sensitivity)."""
    from .pipeline import _float_rows

    t = p.source
    n_per_row = t.shape[0]
    n_rows = t.n_elements // n_per_row
    raw = t.load().view(np.uint8).reshape(n_rows, -1)
    x = _float_rows(raw[sample_rows(n_rows)], t, 0, n_threads)
    if t.release is not None:
        t.release()
    imatrix = p.imatrix
    if imatrix is not None and imatrix.size != n_per_row:
        imatrix = None  # per-expert imatrices: the estimate goes unweighted
    types = candidate_types(n_per_row, p.name, imatrix is not None, allowed)
    lookup = tensor_kind(p.name) == "token_embd"
    errors = weighted_errors(x, types, imatrix, n_rows, lookup=lookup, n_threads=n_threads)
    digest = hashlib.sha256(x.tobytes())
    if imatrix is not None:
        digest.update(np.ascontiguousarray(imatrix, np.float32).tobytes())
    return Options(p.name, types, np.array([type_nbytes(q, t.n_elements) for q in types], np.int64), errors,
                   digest.hexdigest())


Measure = Callable[[list[Any], list[Options]], Any]  # -> sensitivity.Sensitivity


def allocate_plan(tensors: list[Any], budget: int, fixed: Callable[[str], bool],
                  measure: Measure | None = None, n_threads: int | None = None,
                  progress: bool = False, allowed: Collection[T] | None = None) -> Allocation:
    """Choose the types of the allocatable planned tensors (in place: their `target`) so that
    all tensors' data is at most `budget` bytes; the others keep the mix's types. `measure`
    gives the tensors' sensitivities from the error estimates (sensitivity.py), else 1.
    `allowed`: the i-quants that may be candidates (None: all kquant runs)."""
    chosen = [p for p in tensors if allocatable(p, fixed)]
    rest = sum(p.new_nbytes for p in tensors if not allocatable(p, fixed))
    if not chosen:
        raise ModelError("no tensor is left for the allocator to choose (the options fix them all)")
    if budget - rest < 0:
        raise ModelError(f"the budget of {budget} bytes is below the {rest} bytes of the tensors "
                         f"the allocator does not choose")
    options = [estimate(p, n_threads, allowed)
               for p in tqdm(chosen, desc="estimate", unit="tensor", disable=not progress, file=sys.stderr)]
    sensitivity = measure(chosen, options) if measure is not None else None
    if sensitivity is not None:
        for o in options:
            o.loss = o.loss * sensitivity.of(o.name)
    picks = allocate(options, budget - rest)
    rows = []
    for p, o, i in zip(chosen, options, picks):
        p.target = o.types[i]
        rows.append((p.name, o.types[i], float(o.loss[i]), int(o.nbytes[i])))
    return Allocation(rows, budget - rest, sum(r[3] for r in rows), sensitivity)
