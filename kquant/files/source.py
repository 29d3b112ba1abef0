"""What the quantize pipeline reads: a model as GGUF metadata plus lazily loaded tensors.

A GGUF file (kquant.files.gguf_read) and a Hugging Face folder (kquant.files.hf) both become a
`ModelSource`: the key-value pairs in the order they are written, and the tensors under their
GGUF names, each loaded only when asked for, so that a model is never all in memory at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType


@dataclass
class KV:
    """One metadata pair; `sub_type` is the element type of an ARRAY value."""

    key: str
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass
class SourceTensor:
    """A tensor as stored: `shape` in ggml order (ne[0], the row length, first), `type` its
    ggml type, and `load()` returning its data as a numpy array of that type's storage
    (float32/float16 values, or uint8 bytes for bf16 and quantized types), rows last."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    load: Callable[[], np.ndarray] = field(repr=False)
    split: int = 0  # which file of a split model holds it
    # called once the tensor's data has been used: lets a memory-mapped input drop its pages
    release: Callable[[], None] | None = field(default=None, repr=False)
    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return self.n_elements // block * size


@dataclass
class ModelSource:
    """A whole model: its architecture name (general.architecture), metadata and tensors."""

    arch: str
    kv: list[KV]
    tensors: list[SourceTensor]
    path: str = ""
    # why the model, converted faithfully, cannot be run faithfully (a Hugging Face feature
    # llama.cpp's converter drops): the runtime refuses it with this reason; "" for none
    not_runnable: str = ""

    def get(self, key: str, default: Any = None) -> Any:
        for kv in self.kv:
            if kv.key == key:
                return kv.value
        return default
