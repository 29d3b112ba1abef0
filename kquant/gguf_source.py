"""A GGUF file (or a set of split files) as a `ModelSource`, read through gguf's GGUFReader.

The reader memory-maps the file, so a tensor's bytes are read from disk only when its
`load()` is called. Split models (`name-00001-of-00003.gguf`) are read as one model the way
llama.cpp's loader does: metadata from the first file, tensors from all of them.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from .source import KV, ModelError, ModelSource, SourceTensor

_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def split_paths(path: str | Path) -> list[Path]:
    """All files of a split model given any of them (just [path] for a single file)."""
    p = Path(path)
    m = _SPLIT_NAME.match(p.name)
    if not m:
        return [p]
    count = int(m["count"])
    paths = [p.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [q.name for q in paths if not q.is_file()]
    if missing:
        raise ModelError(f"{p}: split file(s) missing: {', '.join(missing)}")
    return paths


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, OSError, UnicodeDecodeError, KeyError) as e:
        # GGUFReader raises these on a bad magic, a header running past the end of the file,
        # tensor data past the end (truncation), or an unknown type id
        raise ModelError(f"{path}: not a readable GGUF file ({e})") from None


def _kv(field) -> KV:
    types = field.types
    value = field.contents()
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 2:
            raise ModelError(f"metadata {field.name}: nested arrays are not supported")
        return KV(field.name, value, GGUFValueType.ARRAY, types[-1])
    return KV(field.name, value, types[0])


def _tensor(t) -> SourceTensor:
    qtype = GGMLQuantizationType(t.tensor_type)
    shape = tuple(int(n) for n in t.shape)
    data = t.data

    def load() -> np.ndarray:
        return data

    st = SourceTensor(t.name, shape, qtype, load)
    if data.nbytes != st.nbytes:
        raise ModelError(f"tensor {t.name}: {data.nbytes} bytes stored, {st.nbytes} expected")
    return st


def load_gguf(path: str | Path) -> ModelSource:
    """The model in a GGUF file, or in all files of a split model."""
    paths = split_paths(path)
    readers = [_open(p) for p in paths]
    kv = [_kv(f) for f in readers[0].fields.values() if not f.name.startswith("GGUF.")]
    tensors = [_tensor(t) for r in readers for t in r.tensors]
    arch = next((k.value for k in kv if k.key == "general.architecture"), None)
    if not arch:
        raise ModelError(f"{path}: no general.architecture in the metadata")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ModelError(f"{path}: duplicate tensor names")
    expected = next((k.value for k in kv if k.key == "split.tensors.count"), None)
    if expected is not None and int(expected) != len(tensors):
        raise ModelError(f"{path}: split files hold {len(tensors)} tensors, the first says "
                         f"{expected}")
    return ModelSource(arch=str(arch), kv=kv, tensors=tensors, path=str(paths[0]))
