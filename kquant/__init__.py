"""kquant: llama.cpp's GGUF K-quant toolchain in Python + Numba, byte-identical to ggml."""
from __future__ import annotations

from .codecs import CODECS, get_codec
from .quants import dequantize, quantize

__version__ = "0.1.0"
__all__ = ["quantize", "dequantize", "get_codec", "CODECS", "__version__"]
