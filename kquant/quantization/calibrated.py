"""`kquant-quantize --method gptq`: calibrate, then quantize the block matrices by GPTQ.

Calibration runs the input model (float32) over the text as kquant-imatrix does and keeps, per
matrix input, the Hessian and the importance matrix (kquant.calibration.hessian). The tensor
types are llama-quantize's for the same TYPE and options; only the bytes of the matrices with a
Hessian change, and only in the rows where GPTQ's Hessian-weighted error beats plain
quantization's (kquant.quantization.gptq). The file has the same size and tensor types as llama-quantize's.
"""
from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..calibration.hessian import Hessians, calibration_tokens, collect_hessians
from ..calibration.imatrix import Collector, ImatrixParams, compute_imatrix
from ..calibration.imatrix_file import Imatrix
from ..errors import ModelError
from ..types import TYPES
from .gptq import GptqResult, GptqSettings, Heldout, gptq_quantize

METHODS = ("llama", "gptq")


@dataclass
class Calibration:
    """What a calibration run gives the quantizer."""

    hessians: Hessians
    imatrix: Imatrix
    text: str  # the calibration file, recorded as the imatrix's dataset
    n_chunks: int


def model_tag(source) -> str:
    """What a Hessian file records of its model, to refuse it for another: architecture,
    tensor count and a digest of the tensor names and shapes."""
    names = ";".join(f"{t.name}:{list(t.shape)}" for t in sorted(source.tensors, key=lambda t: t.name))
    return f"{source.arch} {len(source.tensors)} tensors {hashlib.sha1(names.encode()).hexdigest()[:16]}"


def load_calibration(path: str | Path, model_path: str | Path) -> Calibration:
    """A calibration saved by kquant-imatrix --hessian-out, checked against the model."""
    from ..calibration.hessian_file import load_hessians
    from ..models import open_model

    hessians, imatrix, dataset, n_chunks = load_hessians(path, model_tag(open_model(model_path, "f32")))
    return Calibration(hessians, imatrix, dataset or str(path), n_chunks)


def calibrate(model_path: str | Path, text_path: str | Path, n_ctx: int = 512, n_chunks: int = -1,
              progress: bool = True, hessians: bool = True, device: str = "cpu", cluster=None) -> Calibration:
    """Run the model at float32 over the text's chunks (llama-imatrix's layout): the imatrix of
    every block matrix, and with `hessians` their Hessians (the sequential sweep makes its own,
    so it asks for the imatrix only; that pass may run on `device` cuda). With `cluster`
    (kquant.cluster.Cluster), the chunks run on its workers."""
    from ..models import open_model

    if not Path(text_path).is_file():
        raise ModelError(f"{text_path}: no such calibration text")
    source = open_model(model_path, "f32")
    tokens, bos = calibration_tokens(source, text_path, n_ctx)
    if hessians and (n_expert := source.get(f"{source.arch}.expert_count") or 0):
        raise ModelError(f"{model_path}: GPTQ does not support mixture-of-experts models ({source.arch}, "
                         f"{n_expert} experts) yet")
    params = ImatrixParams(n_ctx=n_ctx, n_chunks=n_chunks, compute_ppl=False, output_frequency=0,
                           prompt_file=str(text_path))
    device = "cpu" if hessians else device
    if cluster is not None:
        from ..calibration.on_cluster import ClusterCollector, compute_on_cluster
        from ..cluster import ModelSpec

        collector = ClusterCollector(params, Imatrix(), hessians)
        result = compute_on_cluster(cluster, ModelSpec(str(Path(model_path).resolve()), device), tokens, params,
                                    collector, bos, progress, log=lambda s: None)
        found = collector.hessians or Hessians()
    else:
        from ..runtime import Transformer

        model = Transformer(source, device, progress)
        if hessians:
            found, result = collect_hessians(model, tokens, params, bos, progress, log=lambda s: None)
        else:
            found = Hessians()
            result = compute_imatrix(model, tokens, params, Collector(params, Imatrix(), model.xp), bos,
                                     progress, log=lambda s: None)
    for key, h in found.sums.items():
        if not np.isfinite(h).all():
            raise ModelError(f"non-finite values in the activations of {key}")
    result.imatrix.datasets = [str(text_path)]
    return Calibration(found, result.imatrix, str(text_path), result.n_chunks)


def gptq_types() -> set:
    """The block types the sweep handles: every type whose values sit on a grid of levels
    under per-block scales (K-quants, legacy, IQ4_NL / IQ4_XS; not the lattice i-quants, whose
    groups of 4 or 8 values are one grid point)."""
    return {r.qtype for r in TYPES.values()
            if r.codec_class in ("BlockCodec", "LegacyCodec", "IQ4Codec") and r.name not in ("Q8_K",)}


_KIND = re.compile(r"^blk\.\d+\.")


@dataclass
class GptqReport:
    """Per tensor kind (attn_q, ffn_down, ...): the Hessian-weighted errors of the rows the file
    takes and of plain quantization's, and how many rows GPTQ gives."""

    errors: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    rows: int = 0
    kept: int = 0  # rows from GPTQ
    tried: int = 0  # matrices swept

    def add(self, name: str, result: GptqResult) -> None:
        kind = _KIND.sub("", name).removesuffix(".weight")
        e = self.errors[kind]
        e[0] += result.error
        e[1] += result.plain_error
        self.tried += 1
        self.rows += len(result.chosen)
        self.kept += int(result.chosen.sum())

    def merge(self, other: "GptqReport") -> None:
        """Add another report's figures (a cluster worker's, for one tensor)."""
        for kind, (err, plain) in other.errors.items():
            e = self.errors[kind]
            e[0] += err
            e[1] += plain
        self.rows += other.rows
        self.kept += other.kept
        self.tried += other.tried

    def line(self) -> str:
        if not self.tried:
            return "gptq: no matrix had a Hessian"
        parts = ", ".join(f"{k} {e[0] / e[1]:.3f}" for k, e in sorted(self.errors.items()) if e[1] > 0)
        return (f"gptq: {self.tried} matrices swept, {self.kept} of {self.rows} rows from GPTQ; "
                f"Hessian-weighted error against plain quantization: {parts}")


def quantize_matrix(x: np.ndarray, target, imatrix: np.ndarray | None, hessian: np.ndarray,
                    name: str, report: GptqReport, settings: GptqSettings = GptqSettings(),
                    aim: np.ndarray | None = None, heldout: Heldout | None = None) -> np.ndarray:
    """A matrix's bytes: GPTQ's rows where they err less than plain quantization's (llama.cpp's),
    judged on `heldout` tokens when given, else on the sweep's Hessian. `aim` is the float
    matrix GPTQ aims at, when not x itself (sequential.py's corrected target); the in-sample
    errors are measured against it, the held-out ones against x's outputs as Heldout defines."""
    result = gptq_quantize(x if aim is None else aim, hessian, target, imatrix, settings,
                           plain_of=None if aim is None else x)
    if heldout is not None:
        result.judge(heldout, x)
    report.add(name, result)
    return result.bytes
