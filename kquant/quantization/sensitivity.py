"""How much model loss a unit of each tensor's weight error costs: the allocator's s_t.

The allocator (kquant.quantization.allocation) adds up the tensors' imatrix-weighted errors
e_t; for small independent rounding errors the KL divergence of the model's next-token
distribution is, to second order, a weighted sum of them, KLD ~ sum_t s_t e_t, with a gain s_t
that the imatrix cannot know: an error in attn_v's outputs reaches the residual stream
directly, one in attn_k's passes a softmax first, one in the output matrix is an error in the
logits themselves, and the same error weighs more where the residual stream is small.

Each tensor's s_t is measured once per model: the tensor alone is replaced by its probe
quantization (Q3_K, or Q4_0 for rows the K-quants do not fit), the rest left at float32, and
the mean KLD against the float model on a few calibration chunks, divided by the tensor's error
estimate at the probe type, is its s_t. A tensor in block l reruns only blocks l.. from the
float pass's residual stream at block l's input, so a probe costs on average half a forward
pass. The probe's errors are large enough to measure above the float noise and small enough to
stay near the quadratic regime: on the tiny model s_t measured at Q2_K..Q6_K agree within 15%
for every kind.

Why per tensor: s_t is far from a product of a gain per kind and a factor per block. On the
tiny model, blk.0.attn_output costs 460x the KLD per unit of error of the other attn_output
tensors (its inputs are 300x smaller, the residual stream it writes to no less sensitive), and
blk.0.attn_v 7.5x; an allocation by per-kind gains and per-block factors sent blk.0.attn_output
to Q2_K and measured 0.967x llama.cpp's Q4_K_M mean KLD on wikitext at its size
(kquant-perplexity, 40 x 512 tokens), the per-tensor s_t 0.580x (llama-perplexity, the same
tokens). Two chunks of 512 tokens measure them as well as four (0.003674 against 0.003662 there).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T
from tqdm import tqdm

from ..codecs.api import dequantize, quantize
from ..errors import ModelError
from .allocation import Options, tensor_kind

#: chunks of the calibration text the KL divergences are measured on
SENSITIVITY_CHUNKS = 2


def probe_type(types: tuple[T, ...]) -> T:
    """The type a tensor is probed at: Q3_K where the K-quants fit, else Q4_0 (the smallest
    legacy type), whatever the other candidates."""
    return T.Q3_K if T.Q3_K in types else T.Q4_0


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class _Probe:
    """The float model, its log-probabilities on the chunks and its residual stream at every
    block's input, and weights swapped in and out by GGUF name."""

    def __init__(self, model: Any, chunks: list[np.ndarray]):
        from ..runtime.forward import Segment

        self.model, self.chunks, self.segment = model, chunks, Segment
        n_ctx = len(chunks[0])
        self.rows = np.arange(n_ctx // 2, n_ctx - 1)  # the second half, as llama-perplexity scores
        self.where: dict[str, tuple[Any, str, int]] = {}  # name -> (owner, attribute, first block)
        W = model.weights
        for il, L in enumerate(W.layers):
            for attr, name in L.names.items():
                self.where[name] = (L, attr, il)
        self.where["token_embd.weight"] = (W, "token_embd", 0)
        self.where["output.weight"] = (W, "output", len(W.layers))
        self.tied = W.output is W.token_embd
        if self.tied:
            self.where["output.weight"] = (W, "output", 0)
        self.states: list[list[Any]] = []
        self.base = []
        for c in chunks:
            states: list[Any] = []
            self.base.append(self.log_probs(c, block_inputs=states))
            self.states.append(states)

    def log_probs(self, chunk: np.ndarray, start: tuple[int, Any] | None = None,
                  block_inputs: list | None = None) -> np.ndarray:
        cache = self.model.new_cache(len(chunk))
        return _log_softmax(self.model.forward([self.segment(chunk, cache)], logit_rows=self.rows,
                                               start=start, block_inputs=block_inputs))

    def kld(self, first: int = 0) -> float:
        """The mean KL divergence of the current weights' next-token distributions from the
        float model's, rerunning blocks `first`.. only (the weights before are the float ones)."""
        total, count = 0.0, 0
        for chunk, base, states in zip(self.chunks, self.base, self.states):
            lp = self.log_probs(chunk, (first, states[first]) if first else None)
            total += float(np.sum(np.exp(base) * (base - lp)))
            count += len(lp)
        return total / count

    def first_block(self, name: str) -> int:
        return self.where[name][2]

    def get(self, name: str) -> Any:
        owner, attr, _ = self.where[name]
        return getattr(owner, attr)

    def put(self, name: str, value: Any) -> None:
        owner, attr, _ = self.where[name]
        setattr(owner, attr, value)
        if name == "token_embd.weight" and self.tied:
            owner.output = value  # one tensor in the file, both roles in the model


@dataclass
class Sensitivity:
    """s_t per tensor name: the mean KLD per unit of the tensor's error estimate."""

    tensor: dict[str, float]

    def of(self, name: str) -> float:
        return self.tensor[name]

    def line(self) -> str:
        by_kind: dict[str, list[float]] = {}
        for name, v in self.tensor.items():
            by_kind.setdefault(tensor_kind(name), []).append(v)
        kinds = ", ".join(f"{k} {np.median(v):.3g}" + (f" ({min(v):.3g}-{max(v):.3g})" if len(v) > 1 else "")
                          for k, v in sorted(by_kind.items()))
        return f"sensitivity (KLD per unit of error, median per kind): {kinds}"


def measure_sensitivities(model_path: str | Path, text_path: str | Path, planned: list[Any],
                          options: list[Options], n_ctx: int = 512, n_chunks: int = SENSITIVITY_CHUNKS,
                          n_threads: int | None = None, progress: bool = False) -> Sensitivity:
    """The allocatable planned tensors' sensitivities (their Options hold the error estimates
    without them), measured on the calibration text, one probe per tensor."""
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
    out = Sensitivity({})
    for p, o in tqdm(list(zip(planned, options)), desc="sensitivity", unit="tensor", disable=not progress,
                     file=sys.stderr):
        kld, error = _probe_tensor(probe, p, o, n_threads)
        out.tensor[p.name] = kld / error if error > 0 else 0.0
    return out


def _probe_tensor(probe: _Probe, p: Any, o: Options, n_threads: int | None) -> tuple[float, float]:
    """The KLD with this tensor at its probe type (the rest float), and its error estimate
    there; the weights are restored."""
    qtype = probe_type(o.types)
    name = p.source.name
    w = np.asarray(probe.get(name))
    im = p.imatrix if p.imatrix is not None and p.imatrix.size == w.shape[1] else None
    q = dequantize(quantize(np.ascontiguousarray(w, np.float32), qtype, im, n_threads=n_threads),
                   qtype, n_threads=n_threads)
    probe.put(name, probe.model.xp.asarray(q.reshape(w.shape)))
    try:
        kld = probe.kld(probe.first_block(name))
    finally:
        probe.put(name, w)
    return max(kld, 0.0), float(o.loss[o.types.index(qtype)])
