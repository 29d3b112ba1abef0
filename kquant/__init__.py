"""kquant: llama.cpp's GGUF K-quant toolchain in Python + Numba, byte-identical to ggml."""
from __future__ import annotations

from .codecs import CODECS, get_codec
from .quantize_model import QuantizeOptions, quantize_model
from .quants import dequantize, quantize
from .source import ModelError

__version__ = "0.1.0"
__all__ = ["quantize", "dequantize", "get_codec", "CODECS", "quantize_model", "QuantizeOptions",
           "ModelError", "__version__"]
