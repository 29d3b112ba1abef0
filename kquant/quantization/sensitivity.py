"""How much model loss a unit of each tensor kind's weight error costs: the allocator's s_t.

The allocator (kquant.quantization.allocation) adds up the tensors' imatrix-weighted errors
e_t; for small independent rounding errors the KL divergence of the model's next-token
distribution is, to second order, a weighted sum of them, KLD ~ sum_t s_t e_t, with a gain s_t
that the imatrix cannot know: an error in attn_v's outputs reaches the residual stream
directly, one in attn_k's passes a softmax first, one in the output matrix is an error in the
logits themselves.

The gains are measured once per model, first per tensor kind (attn_q, ffn_down, token_embd,
...): every tensor of the kind is replaced by its probe quantization (Q3_K, or Q4_0 for rows the
K-quants do not fit), the rest of the model left at float32, and the mean KLD against the float
model on a few calibration chunks, divided by the kind's summed error estimate at the probe
type, is its gain. Then per block: all of block l's tensors at their probe types, the measured
KLD over what the kinds' gains predict for them is the block's factor (the first and last blocks
of a model often matter more than their errors say). s_t = gain(kind) x factor(block): one
forward pass per kind and per block. The probe's errors are large enough to measure above the
float noise and small enough to stay near the quadratic regime. On the tiny model at the size of
llama.cpp's Q4_K_M, mean KLD on wikitext (kquant-perplexity): llama.cpp's mix 0.006305, per-kind
gains 0.006708, with the block factors 0.006084.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T
from tqdm import tqdm

from ..codecs.api import dequantize, quantize
from ..errors import ModelError
from .allocation import K_CANDIDATES, Options, tensor_kind

#: chunks of the calibration text the KL divergences are measured on
SENSITIVITY_CHUNKS = 4


def probe_type(types: tuple[T, ...]) -> T:
    """The type a kind is probed at: Q3_K where the K-quants fit, else the smallest legacy type."""
    return T.Q3_K if types == K_CANDIDATES else types[0]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class _Probe:
    """The float model, its log-probabilities on the chunks, and weights swapped in and out by
    GGUF name."""

    def __init__(self, model: Any, chunks: list[np.ndarray]):
        from ..runtime.forward import Segment

        self.model, self.chunks, self.segment = model, chunks, Segment
        n_ctx = len(chunks[0])
        self.rows = np.arange(n_ctx // 2, n_ctx - 1)  # the second half, as llama-perplexity scores
        self.where: dict[str, tuple[Any, str]] = {}
        W = model.weights
        for L in W.layers:
            for attr, name in L.names.items():
                self.where[name] = (L, attr)
        self.where["token_embd.weight"] = (W, "token_embd")
        self.where["output.weight"] = (W, "output")
        self.tied = W.output is W.token_embd
        self.base = [self.log_probs(c) for c in chunks]

    def log_probs(self, chunk: np.ndarray) -> np.ndarray:
        cache = self.model.new_cache(len(chunk))
        return _log_softmax(self.model.forward([self.segment(chunk, cache)], logit_rows=self.rows))

    def kld(self) -> float:
        """The mean KL divergence of the current weights' next-token distributions from the
        float model's."""
        total, count = 0.0, 0
        for chunk, base in zip(self.chunks, self.base):
            lp = self.log_probs(chunk)
            total += float(np.sum(np.exp(base) * (base - lp)))
            count += len(lp)
        return total / count

    def get(self, name: str) -> Any:
        owner, attr = self.where[name]
        return getattr(owner, attr)

    def put(self, name: str, value: Any) -> None:
        owner, attr = self.where[name]
        setattr(owner, attr, value)
        if name == "token_embd.weight" and self.tied:
            owner.output = value  # one tensor in the file, both roles in the model


@dataclass
class Sensitivity:
    """s_t = kind[t's kind] x layer[t's block]: a gain per tensor kind, and a factor per block
    for what the kinds' gains miss of where the block sits (1 outside the blocks)."""

    kind: dict[str, float]
    layer: dict[int, float] = field(default_factory=dict)

    def of(self, name: str) -> float:
        m = _BLK_NUMBER.match(name)
        factor = self.layer.get(int(m[1]), 1.0) if m else 1.0
        return self.kind.get(tensor_kind(name), 1.0) * factor

    def line(self) -> str:
        kinds = ", ".join(f"{k} {v:.3g}" for k, v in sorted(self.kind.items()))
        layers = " ".join(f"{v:.2f}" for _, v in sorted(self.layer.items()))
        return f"sensitivity (KLD per unit of error): {kinds}; per block x {layers}"


_BLK_NUMBER = re.compile(r"^blk\.(\d+)\.")


def measure_sensitivities(model_path: str | Path, text_path: str | Path, planned: list[Any],
                          options: list[Options], n_ctx: int = 512, n_chunks: int = SENSITIVITY_CHUNKS,
                          n_threads: int | None = None, progress: bool = False) -> Sensitivity:
    """The allocatable planned tensors' sensitivities (their Options hold the error estimates
    without them), measured on the calibration text: first per kind, then per block."""
    from ..calibration.hessian import calibration_tokens
    from ..models import open_model
    from ..runtime import Transformer
    from ..runtime.chunks import chunk_sequences

    source = open_model(model_path, "f32")
    tokens, bos = calibration_tokens(source, text_path, n_ctx)
    n = min(n_chunks, len(tokens) // n_ctx)
    probe = _Probe(Transformer(source, "cpu", progress=False), chunk_sequences(tokens, 0, n, n_ctx, bos))
    for p in planned:
        if p.source.name not in probe.where:
            raise ModelError(f"{p.source.name}: the runtime has no such matrix to measure")
    members = list(zip(planned, options))
    kinds = _groups(members, lambda name: tensor_kind(name))
    blocks = _groups(members, lambda name: int(m[1]) if (m := _BLK_NUMBER.match(name)) else None)
    bar = tqdm(total=len(kinds) + len(blocks), desc="sensitivity", unit="probe", disable=not progress,
               file=sys.stderr)
    out = Sensitivity({})
    for kind, group in kinds.items():
        kld, error = _probe_group(probe, group, n_threads)
        out.kind[kind] = kld / error if error > 0 else 0.0
        bar.update(1)
    for block, group in blocks.items():
        kld, _ = _probe_group(probe, group, n_threads)
        predicted = sum(out.kind[tensor_kind(p.name)] * _probe_error(o) for p, o in group)
        out.layer[block] = kld / predicted if predicted > 0 else 1.0
        bar.update(1)
    bar.close()
    return out


def _groups(members: list[tuple[Any, Options]], key) -> dict[Any, list[tuple[Any, Options]]]:
    """Members by key (sorted; None keys left out)."""
    out: dict[Any, list] = {}
    for p, o in members:
        k = key(p.name)
        if k is not None:
            out.setdefault(k, []).append((p, o))
    return dict(sorted(out.items()))


def _probe_error(o: Options) -> float:
    return float(o.loss[o.types.index(probe_type(o.types))])


def _probe_group(probe: _Probe, group: list[tuple[Any, Options]], n_threads: int | None) -> tuple[float, float]:
    """The KLD with the group's tensors at their probe types (the rest float), and the group's
    summed error estimate at those types; the weights are restored."""
    saved = {}
    error = 0.0
    for p, o in group:
        qtype = probe_type(o.types)
        error += _probe_error(o)
        w = np.asarray(probe.get(p.source.name))
        saved[p.source.name] = w
        im = p.imatrix if p.imatrix is not None and p.imatrix.size == w.shape[1] else None
        q = dequantize(quantize(np.ascontiguousarray(w, np.float32), qtype, im, n_threads=n_threads),
                       qtype, n_threads=n_threads)
        probe.put(p.source.name, probe.model.xp.asarray(q.reshape(w.shape)))
    try:
        kld = probe.kld()
    finally:
        for name, w in saved.items():
            probe.put(name, w)
    return max(kld, 0.0), error
