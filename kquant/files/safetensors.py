"""A Hugging Face folder's files as kquant reads them: its JSON files and its safetensors weights.

`index_tensors(folder)` lists every tensor of the model*.safetensors shards (through
model.safetensors.index.json when there is one) in the order llama.cpp's convert_hf_to_gguf.py
visits them, reading only the headers; each `StTensor` memory-maps its own bytes on `load()`.
`read_json` reads config.json, tokenizer.json and the other JSON files with one error message
style.  Everything unreadable raises `ModelError`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import ModelError

__all__ = ["StTensor", "index_tensors", "read_json"]


def read_json(path: Path, what: str) -> Any:
    """The JSON file at `path`; `what` names it in the error message."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelError(f"{what} {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ModelError(f"cannot read {what} {path}: {e.strerror or e}") from None


_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
# what kquant's own files add (calibration.hessian_file: float64 Hessians)
_ALL_DTYPES = {**_ST_DTYPES, "F64": np.dtype("<f8")}


class StTensor:
    """One tensor of a safetensors file: where its bytes are and how to read them."""

    __slots__ = ("path", "dtype", "shape", "offset", "nbytes")

    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...], offset: int, nbytes: int):
        self.path, self.dtype, self.shape, self.offset, self.nbytes = path, dtype, shape, offset, nbytes

    def raw(self) -> np.ndarray:
        """The stored values, memory-mapped (bf16 as uint16 bit patterns)."""
        dt = _ALL_DTYPES[self.dtype]
        n = int(np.prod(self.shape, dtype=np.int64))
        if n == 0:
            return np.empty(self.shape, dtype=dt)
        return np.memmap(self.path, dtype=dt, mode="r", offset=self.offset, shape=(n,)).reshape(self.shape)

    def load(self) -> np.ndarray:
        """The tensor as float32 or float16 (bf16 widened to float32, as the converter does)."""
        arr = self.raw()
        if self.dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


def read_header(path: Path, dtypes: Iterable[str] = tuple(_ST_DTYPES),
                metadata: dict | None = None) -> dict[str, StTensor]:
    """The tensors of a safetensors file (refusing dtypes not in `dtypes`), in name order;
    its `__metadata__` strings go into `metadata` when given."""
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path.name}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                raise ModelError(f"{path.name}: truncated safetensors file: header of {n} bytes "
                                 f"does not fit in the file's {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path.name}: bad safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path.name}: bad safetensors header")
    data_start = 8 + n
    tensors: dict[str, StTensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            if metadata is not None and isinstance(meta, dict):
                metadata.update(meta)
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path.name}: bad safetensors header entry for {name!r}") from None
        if dtype not in dtypes:
            raise ModelError(f"{path.name}: tensor {name!r} has dtype {dtype}; kquant reads "
                             f"{', '.join(dtypes)} here")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ALL_DTYPES[dtype].itemsize
        if end - begin != nbytes or begin < 0:
            raise ModelError(f"{path.name}: tensor {name!r}: data_offsets {begin}..{end} do not match "
                             f"shape {list(shape)} {dtype}")
        if data_start + end > size:
            raise ModelError(f"{path.name}: truncated safetensors file: tensor {name!r} ends at byte "
                             f"{data_start + end}, past the end of the file ({size} bytes)")
        tensors[name] = StTensor(path, dtype, shape, data_start + begin, nbytes)
    # the converter (gguf.utility.SafetensorsLocal) orders the tensors of a file by name
    return dict(sorted(tensors.items(), key=lambda t: t[0]))


def index_tensors(folder: Path) -> dict[str, StTensor]:
    """All tensors, in the converter's order: parts sorted by file name, tensors by name."""
    names = sorted(os.listdir(folder))
    parts = [n for n in names if n.startswith("model") and n.endswith(".safetensors")]
    index_file = folder / "model.safetensors.index.json"
    from_index: set[str] = set()
    weight_map: dict[str, str] = {}
    if index_file.is_file():
        index = read_json(index_file, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index_file.name} has no 'weight_map'")
        from_index = set(weight_map)
        parts = sorted(dict.fromkeys(weight_map.values()))
    if not parts:
        if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names):
            raise ModelError(f"{folder}: only pytorch_model*.bin weights; kquant reads safetensors only")
        raise ModelError(f"{folder}: no model*.safetensors weights")
    tensors: dict[str, StTensor] = {}
    for part in parts:
        p = folder / part
        if not p.is_file():
            raise ModelError(f"{folder}: missing safetensors file {part} (listed in {index_file.name})")
        tensors.update(read_header(p))
    if from_index and from_index != set(tensors):
        missing = sorted(from_index - set(tensors))
        extra = sorted(set(tensors) - from_index)
        raise ModelError(f"{index_file.name} does not match the safetensors files: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"extra {extra[:5]}{'...' if len(extra) > 5 else ''}")
    return tensors
