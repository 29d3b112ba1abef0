"""One way to open a model: a GGUF file (split files too) or a Hugging Face folder.

Every stage reads its input through `open_model`, so the quantizer, the calibration run and the
validation tools accept the same paths and say the same thing about a bad one.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ModelError
from .files.gguf_read import is_gguf, load_gguf
from .files.source import ModelSource


def open_model(path: str | Path, hf_outtype: str = "f16") -> ModelSource:
    """A GGUF file or a Hugging Face model folder, as a ModelSource. A folder's tensors come
    as `convert_hf_to_gguf.py --outtype hf_outtype` writes them (its default, f16; "auto"
    keeps bf16 checkpoints bf16; the runtime asks for f32), so that quantizing the folder gives
    the same file as converting it and running llama-quantize on the result."""
    p = Path(path)
    if p.is_dir():
        from .files.hf import guess_outtype, load_hf_model  # only needed for folders

        return load_hf_model(p, guess_outtype(p) if hf_outtype == "auto" else hf_outtype)
    if not p.exists():
        raise ModelError(f"{p}: no such file or directory")
    if not is_gguf(p):
        raise ModelError(f"{p}: neither a GGUF file nor a Hugging Face model folder")
    return load_gguf(p)
