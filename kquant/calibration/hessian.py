"""Layer Hessians for GPTQ: H = sum over calibration tokens of x x^T, per matrix input.

The matrices of a block that share an input (Q/K/V the attention input, gate/up the FFN input)
share one Hessian: it is kept once, under the first matrix's name, and `Hessians.of(name)`
finds it for any of them. Sums are float64 (a float32 sum over 10^5 tokens loses digits that
the Cholesky factorisation needs). The diagonal divided by the token count is the importance
matrix, so one calibration run gives both: this collector is kquant-imatrix's (same rows, same
skipped small batches) with the Hessians added.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ModelError
from ..runtime.device import to_host
from .imatrix import Collector, ImatrixParams, ImatrixResult, compute_imatrix
from .imatrix_file import Imatrix


@dataclass
class Hessians:
    """The sums of x x^T per input, and how many tokens went into each."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)  # first matrix's name -> (k, k)
    counts: dict[str, int] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)  # every matrix's name -> its key in sums

    def of(self, name: str) -> np.ndarray | None:
        """The Hessian of a matrix's input (sum, not mean), or None if calibration never saw it."""
        key = self.shared.get(name)
        return None if key is None else self.sums[key]

    def count(self, name: str) -> int:
        key = self.shared.get(name)
        return 0 if key is None else self.counts[key]


class HessianCollector(Collector):
    """kquant-imatrix's collector that also adds x^T x of every observed input into Hessians
    (it saves the imatrix as kquant-imatrix does: never with output_frequency 0)."""

    def __init__(self, params: ImatrixParams, imatrix: Imatrix, hessians: Hessians, xp: Any = np):
        super().__init__(params, imatrix, xp)
        self.hessians = hessians

    def flush(self) -> None:
        names, x = self._pending, self._pending_x
        if names:
            self._add(names, x)
        super().flush()

    def _add(self, names: list[str], x: Any) -> None:
        h = self.hessians
        key = h.shared.get(names[0])
        if key is None:
            key = names[0]
            k = x.shape[1]
            h.sums[key] = np.zeros((k, k), np.float64)
            h.counts[key] = 0
        for name in names:
            if h.shared.setdefault(name, key) != key:
                raise ModelError(f"{name}: its input changed between batches")
        x64 = np.asarray(to_host(x), np.float64)
        h.sums[key] += x64.T @ x64
        h.counts[key] += x64.shape[0]


def collect_hessians(model: Any, tokens: np.ndarray, params: ImatrixParams, bos: int | None,
                     progress: bool = True, log: Callable[[str], None] | None = None
                     ) -> tuple[Hessians, ImatrixResult]:
    """Run the calibration tokens through the model (as kquant-imatrix does, params' chunks and
    batches): the Hessians of every block matrix's input, and the importance matrix."""
    if model.xp is not np:
        raise ModelError("Hessians are collected on the CPU: use --device cpu")
    hessians = Hessians()
    collector = HessianCollector(params, Imatrix(), hessians, model.xp)
    result = compute_imatrix(model, tokens, params, collector, bos, progress, log)
    return hessians, result


def calibration_tokens(source: Any, text_path: str | Path, n_ctx: int) -> tuple[np.ndarray, int | None]:
    """The calibration text tokenized as llama-imatrix tokenizes it, and the BOS to start chunks."""
    from ..files.text import read_text
    from ..tokenizer import Tokenizer

    tokenizer = Tokenizer.from_source(source)
    tokens = np.asarray(tokenizer.tokenize(read_text(text_path), add_special=True), np.int64)
    if len(tokens) < 2 * n_ctx:
        raise ModelError(f"{text_path}: {len(tokens)} tokens, too short for calibration with a "
                         f"context of {n_ctx} (needs {2 * n_ctx} or more)")
    return tokens, (tokenizer.bos_id if tokenizer.add_bos else None)
