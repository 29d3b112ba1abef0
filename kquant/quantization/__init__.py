"""Stage 3, quantization of whole models as llama-quantize does it.

- `mixes`: llama.cpp's per-tensor type choice for every ftype (data over code);
- `pipeline`: plan (types, metadata, imatrix checks), then stream each tensor through the
  codecs (kquant.codecs) into the GGUF writer (`quantize_model`).
"""
