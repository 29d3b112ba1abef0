#!/usr/bin/env python3
"""First-call cost of every codec: Numba compiles each kernel once, then `cache=True` keeps it.

Run twice with an empty NUMBA_CACHE_DIR: the first run shows the compile (cold) cost, the
second the load-from-cache (warm) cost, which is what every later process pays.

    NUMBA_CACHE_DIR=$(mktemp -d) python tools/coldstart.py   # run it twice with the same dir
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

t0 = time.perf_counter()
import kquant  # noqa: E402

t_import = time.perf_counter() - t0
x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
w = np.ones(512, np.float32)
total = 0.0
parts = []
for qtype, codec in kquant.CODECS.items():
    t = time.perf_counter()
    q = kquant.quantize(x, qtype)
    if codec.uses_imatrix:
        kquant.quantize(x, qtype, imatrix=w)
    kquant.dequantize(q, qtype)
    dt = time.perf_counter() - t
    total += dt
    parts.append(f"{qtype.name} {dt:.1f}s")
print(f"import {t_import:.2f}s; first quantize+dequantize of every type {total:.1f}s "
      f"({', '.join(parts)})")
