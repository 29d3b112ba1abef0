"""kquant's model runtime: llama-family forward passes on numpy (CPU) or CuPy (GPU)."""
from __future__ import annotations

import os

# Numba's OpenMP workers otherwise spin after each parallel kernel and take the cores from
# OpenBLAS's threads in the matrix products that follow (measured: 2.6 s -> 1.2 s per 512-token
# chunk of SmolLM2 on 2 cores). libgomp reads this when Numba first loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import ModelConfig, read_config
from .device import keep_freed_memory, resolve_device, set_threads
from .forward import KVCache, Segment, Transformer, load_model

__all__ = ["ModelConfig", "read_config", "Transformer", "KVCache", "Segment", "load_model",
           "keep_freed_memory", "resolve_device", "set_threads"]
