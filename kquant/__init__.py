"""kquant: llama.cpp's GGUF K-quant toolchain in Python + Numba, byte-identical to ggml."""
from __future__ import annotations

import os

# Numba's parallel loops run on GNU OpenMP, whose idle threads here go to sleep almost at once:
# generating a token runs ~200 short parallel products, and waking the threads for each cost
# more than the product (SmolLM2-135M Q4_K_M: 18 tokens/s; 57 with this). Spinning 10000
# rounds (tens of microseconds) first keeps them awake between back-to-back products without
# holding the cores from BLAS in between. Read once, when Numba first loads libgomp. On a CPU
# other processes keep busy, spinning threads would wait for each other's cores at every join
# (generation 7x slower on 2 threads than on 1): there the default thread count leaves the
# busy CPUs out (kquant.runtime.device.default_threads).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# The public names load their modules on first use (PEP 562), so that `import kquant.cli` (every
# command's entry point) is instant: a command installs its signal handlers before Numba and
# numpy load, and Ctrl-C while they load is an ordinary interrupt, not a traceback.
_PUBLIC = {
    "CODECS": ".codecs", "get_codec": ".codecs", "dequantize": ".codecs.api", "quantize": ".codecs.api",
    "ModelError": ".errors", "open_model": ".models", "QuantizeOptions": ".quantization.pipeline",
    "quantize_model": ".quantization.pipeline", "get_type": ".types", "TYPES": ".types",
}

__version__ = "0.1.0"  # the one version string (pyproject.toml reads it)
__all__ = ["quantize", "dequantize", "get_codec", "CODECS", "get_type", "TYPES", "quantize_model",
           "QuantizeOptions", "open_model", "ModelError", "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kquant' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value
