"""A Hugging Face folder's files as kquant reads them: its JSON files and its safetensors weights.

`index_tensors(folder)` lists every tensor of the model*.safetensors shards (through
model.safetensors.index.json when there is one) in the order llama.cpp's convert_hf_to_gguf.py
visits them, reading only the headers; each `StTensor` memory-maps its own bytes on `load()`.
`read_json` reads config.json, tokenizer.json and the other JSON files with one error message
style.  Everything unreadable raises `ModelError`.
"""
from __future__ import annotations

import json
import math
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:  # "[[[[..." nested deeper than Python's parser goes
        raise ModelError(f"{what} {path} is not valid JSON: nested too deeply") from None
    except OSError as e:
        raise ModelError(f"cannot read {what} {path}: {e.strerror or e}") from None


_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
# what kquant's own files add (calibration.hessian_file: float64 Hessians)
_ALL_DTYPES = {**_ST_DTYPES, "F64": np.dtype("<f8")}
# every dtype the safetensors format knows, in bits: a file's layout is checked with all of
# them before kquant refuses the ones it does not read
_ST_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
            "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
            "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64}
_MAX_HEADER = 100_000_000  # the safetensors library's MAX_HEADER_SIZE


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
    its `__metadata__` strings go into `metadata` when given. The header is checked as the
    safetensors library checks it: every tensor's dtype, shape and byte range, the ranges
    contiguous and covering the data section exactly."""
    size, n, header = _read_json_header(path)
    data_start = 8 + n
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise ModelError(f"{path.name}: bad safetensors header: __metadata__ must map strings "
                         "to strings")
    if metadata is not None and meta:
        metadata.update(meta)
    entries = {name: _entry(path, name, info) for name, info in header.items()}
    _check_layout(path, entries, size - data_start)
    tensors: dict[str, StTensor] = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if dtype not in dtypes:
            raise ModelError(f"{path.name}: tensor {name!r} has dtype {dtype}; kquant reads "
                             f"{', '.join(dtypes)} here")
        tensors[name] = StTensor(path, dtype, shape, data_start + begin, end - begin)
    # the converter (gguf.utility.SafetensorsLocal) orders the tensors of a file by name
    return dict(sorted(tensors.items(), key=lambda t: t[0]))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """json object hook: a name given twice is refused (json keeps the last one silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"{dup!r} is given twice")
    return out


def _read_json_header(path: Path) -> tuple[int, int, dict]:
    """The file's size, its header's length and the header (a JSON object), the length
    checked against the file before anything is read."""
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
            if n > _MAX_HEADER:
                raise ModelError(f"{path.name}: bad safetensors header: {n} bytes, more than "
                                 f"the format's {_MAX_HEADER}")
            raw = f.read(n)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # UTF-8 and JSON errors are ValueErrors
        raise ModelError(f"{path.name}: bad safetensors header: "
                         f"{e if isinstance(e, ValueError) else 'nested too deeply'}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path.name}: bad safetensors header: not a JSON object")
    return size, n, header


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(path: Path, name: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
    """One tensor's (dtype, shape, begin, end), each part checked for its type."""
    where = f"{path.name}: bad safetensors header entry for tensor {name!r}"
    if not isinstance(info, dict):
        raise ModelError(f"{where}: not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_BITS:
        raise ModelError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ModelError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ModelError(f"{where}: data_offsets {offsets!r} are not two integers begin <= end")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _check_layout(path: Path, entries: dict[str, tuple], data_size: int) -> None:
    """safetensors' rules: each byte range holds exactly dtype x shape, and the ranges, in
    offset order, follow one another from 0 to the end of the file: no overlap, no gap."""
    at = 0
    for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda e: e[1][2:]):
        bits = math.prod(shape) * _ST_BITS[dtype]
        if bits % 8 or end - begin != bits // 8:
            raise ModelError(f"{path.name}: tensor {name!r}: data_offsets {begin}..{end} do not "
                             f"match shape {list(shape)} {dtype} ({bits / 8:g} bytes)")
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else "leaves a gap before it"
            raise ModelError(f"{path.name}: tensor {name!r}: data_offsets {begin}..{end} {what} "
                             f"(expected to start at {at})")
        if end > data_size:
            raise ModelError(f"{path.name}: truncated safetensors file: tensor {name!r} ends at "
                             f"byte {end} of the data section, which holds {data_size} bytes")
        at = end
    if at < data_size:
        raise ModelError(f"{path.name}: bad safetensors file: {data_size - at} bytes after the "
                         "last tensor's data (the tensors must cover the data section)")


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
        for name, part in weight_map.items():
            # a shard is a file of this folder: not a path elsewhere, not a number
            if not isinstance(part, str) or not part or Path(part).name != part or part in (".", ".."):
                raise ModelError(f"{index_file.name}: tensor {name!r} is mapped to {part!r}, "
                                 "not a file name of the folder")
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
