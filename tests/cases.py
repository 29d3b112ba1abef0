"""Deterministic inputs for the codec tests and the golden-vector generator.

Each case is a float32 matrix of rows; the names say what part of the algorithms they reach:
ordinary distributions, outlier columns that dominate a block's scale, zero and constant
blocks (the early exits), values so small or large that scales sit at the edge of float
range, and non-finite values (which ggml quantizes too, and kquant byte for byte alike).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Case = Callable[[np.random.Generator, int, int], np.ndarray]


def gaussian(rng, rows, n):
    return rng.standard_normal((rows, n)).astype(np.float32)


def laplace(rng, rows, n):
    return rng.laplace(size=(rows, n)).astype(np.float32)


def student_t(rng, rows, n):
    return rng.standard_t(3, size=(rows, n)).astype(np.float32)


def outliers(rng, rows, n):
    x = rng.standard_normal((rows, n)).astype(np.float32)
    cols = rng.choice(n, size=max(1, n // 128), replace=False)
    x[:, cols] *= rng.uniform(100, 1000, size=cols.size).astype(np.float32)
    return x


def zero_and_constant(rng, rows, n):
    """All-zero rows, constant rows and blocks (positive, negative), a lone non-zero block,
    and signed zeros mixed in: the 'max == min' and 'amax < eps' exits of every search."""
    x = np.zeros((max(rows, 8), n), np.float32)
    x[1] = 1.5
    x[2, : n // 2] = -3.0
    x[3, 32:64] = rng.standard_normal(32)
    x[4] = rng.standard_normal(n)
    x[4, :32] = 0.0
    x[4, 32:64] = 7.25
    x[5] = np.where(rng.random(n) < 0.5, -0.0, 0.0)
    x[6] = np.abs(rng.standard_normal(n))
    x[6, rng.random(n) < 0.3] = -0.0
    x[7] = -np.abs(rng.standard_normal(n))
    return x


def tiny(rng, rows, n):
    return (rng.standard_normal((rows, n)) * 1e-30).astype(np.float32)


def large(rng, rows, n):
    return (rng.standard_normal((rows, n)) * rng.choice([1e4, 1e5, 1e6], (rows, 1))).astype(np.float32)


def mixed_scales(rng, rows, n):
    return (rng.standard_normal((rows, n)) * np.exp(rng.uniform(-8, 8, (rows, 1)))).astype(np.float32)


def non_finite(rng, rows, n):
    """inf, -inf, NaN, values near FLT_MAX and denormals."""
    x = rng.standard_normal((max(rows, 6), n)).astype(np.float32)
    x[0, 5] = np.inf
    x[1, 40] = -np.inf
    x[2, 7] = np.nan
    x[3, :32] = np.nan
    x[4, 100 % n] = 3e38
    x[4, 101 % n] = -3e38
    x[5, :32] = 1e-40
    x[5, 3] = 3e-39
    return x


CASES: dict[str, Case] = {
    "gauss": gaussian,
    "laplace": laplace,
    "student_t": student_t,
    "outliers": outliers,
    "zero_const": zero_and_constant,
    "tiny": tiny,
    "large": large,
    "mixed_scales": mixed_scales,
    "non_finite": non_finite,
}

IMATRIX_MODES = ("none", "random", "with_zeros")


def make_case(name: str, rows: int, n: int, seed: int = 0) -> np.ndarray:
    return np.ascontiguousarray(CASES[name](np.random.default_rng(seed), rows, n))


def make_imatrix(mode: str, n: int, seed: int = 0) -> np.ndarray | None:
    """None, positive weights with a heavy tail (as real imatrices have), or the same with
    about 30% exact zeros (columns never activated)."""
    if mode == "none":
        return None
    rng = np.random.default_rng(seed + 1000)
    w = (rng.random(n) * rng.exponential(1.0, n)).astype(np.float32)
    if mode == "with_zeros":
        w[rng.random(n) < 0.3] = 0.0
    return w
