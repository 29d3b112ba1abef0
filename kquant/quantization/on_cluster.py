"""kquant-quantize --cluster: the tensors quantized on a Dask cluster's workers (kquant.cluster).

A task is one tensor to convert. The worker opens the model itself (same path, same
--hf-outtype, so the same source bytes), quantizes the tensor with the plan's type, imatrix
row and Hessian, and returns the bytes; the driver writes them in the file's order as they
come, with a bounded number in flight. The codecs are deterministic, so the file is byte for
byte the single-process one. Copies and bytes made before writing (sequential GPTQ) stay on
the driver.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..cluster import Cluster, worker_cached, worker_task
from ..files.source import ModelSource
from .calibrated import GptqReport
from .gptq import GptqSettings
from .pipeline import Plan, PlannedTensor, convert_tensor


@dataclass(frozen=True)
class TensorJob:
    """A planned tensor as a worker needs it: the source by name, not its loader."""

    source_name: str
    target: object  # GGMLQuantizationType
    imatrix: np.ndarray | None
    name: str
    hessian: np.ndarray | None
    gptq: GptqSettings


def convert_task(index: int, path: str, hf_outtype: str, job: TensorJob,
                 n_threads: int | None) -> tuple[np.ndarray, GptqReport]:
    """On a worker: one tensor's output bytes (and its GPTQ report)."""
    with worker_task(index, n_threads):
        tensors = worker_cached(("source", path, hf_outtype), lambda: _tensors_by_name(path, hf_outtype))
        p = PlannedTensor(tensors[job.source_name], job.target, job.imatrix, job.name, job.hessian,
                          None, job.gptq)
        report = GptqReport()
        data = convert_tensor(p, n_threads, report)
        report.errors = dict(report.errors)  # a plain dict travels back (no lambda factory)
        return np.ascontiguousarray(data), report


def _tensors_by_name(path: str, hf_outtype: str) -> dict:
    from ..models import open_model

    return {t.name: t for t in open_model(path, hf_outtype).tensors}


def on_driver(p: PlannedTensor) -> bool:
    """Bytes already made, or a plain copy: not worth a trip to a worker."""
    return p.data is not None or p.target == p.source.type


class ClusterConversions:
    """The plan's conversions run on the cluster, handed out in `order` (the order the writer
    loads the tensors): `load(p)` returns p's bytes, merging its GPTQ report into `report`."""

    def __init__(self, cluster: Cluster, plan: Plan, order: list[PlannedTensor], path: str,
                 hf_outtype: str, n_threads: int | None, report: GptqReport | None):
        remote = [p for p in order if not on_driver(p)]
        self._expected: Iterator[PlannedTensor] = iter(remote)
        self._results = cluster.ordered(convert_task, [
            (i, path, hf_outtype, TensorJob(p.source.name, p.target, p.imatrix, p.name, p.hessian, p.gptq),
             cluster.worker_threads) for i, p in enumerate(remote)])
        self._n_threads = n_threads
        self._report = report

    def load(self, p: PlannedTensor) -> np.ndarray:
        if on_driver(p):
            return convert_tensor(p, self._n_threads, self._report)
        expected = next(self._expected)
        if expected is not p:
            raise RuntimeError(f"tensors loaded out of order: {p.name}, expected {expected.name}")
        data, report = next(self._results)
        if self._report is not None:
            self._report.merge(report)
        return data

    def close(self) -> None:
        """Cancel what is still in flight (after an error or an interrupt)."""
        self._results.close()


def cluster_output_source(conversions: ClusterConversions, plan: Plan) -> ModelSource:
    """output_source's model, its tensors' bytes coming from the cluster."""
    from .pipeline import output_source

    result = output_source(plan)
    for t, p in zip(result.tensors, plan.tensors):
        t.load = (lambda p=p: conversions.load(p))
    return result
