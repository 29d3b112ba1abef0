"""A GGUF file (or a set of split files) as a `ModelSource`.

The file is memory-mapped, so a tensor's bytes are read from disk only when its `load()` is
called. Split models (`name-00001-of-00003.gguf`) are read as one model the way llama.cpp's
loader does: metadata from the first file, tensors from all of them.
"""
from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from ..errors import ModelError
from .source import KV, ModelSource, SourceTensor

_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")

# scalar value types: struct format and numpy dtype
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {t: np.dtype(f.replace("<?", "?")) for t, f in _SCALAR.items()}


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


class _Header:
    """GGUF header, metadata and tensor infos, parsed straight from the mapped bytes.

    gguf's GGUFReader builds numpy views for every part of every value, which takes seconds
    on a 50k-token vocabulary; this reads the same layout (gguf.cpp's) in milliseconds and
    leaves the tensor data mapped and untouched."""

    def __init__(self, path: Path):
        self.mm = np.memmap(path, np.uint8, "r")
        self.buf = memoryview(self.mm)
        self.pos = 0
        if bytes(self.buf[:4]) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (bad magic)")
        version, n_tensors, n_kv = self._unpack("<4xIQQ")
        if version not in (2, 3):
            raise ModelError(f"{path}: GGUF version {version} is not supported")
        self.kv = [self._kv() for _ in range(n_kv)]
        self.infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = next((int(k.value) for k in self.kv if k.key == "general.alignment"),
                         GGUF_DEFAULT_ALIGNMENT)
        self.data_offset = -(-self.pos // alignment) * alignment

    def drop_pages(self, start: int, nbytes: int) -> None:
        """Let the kernel drop a used tensor's pages from this process's memory (they stay
        in the page cache), as llama-quantize unmaps each weight once it is written."""
        page = mmap.PAGESIZE
        lo = start // page * page
        mm = getattr(self.mm, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED, lo, min(start + nbytes, len(mm)) - lo)

    def _unpack(self, fmt: str):
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def _str(self) -> str:
        (n,) = self._unpack("<Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        if len(raw) != n:
            raise struct.error("a string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8", "surrogateescape")  # kept byte for byte when written back

    def _kv(self) -> KV:
        key = self._str()
        (vtype,) = self._unpack("<I")
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return KV(key, self._str(), vtype)
        if vtype != GGUFValueType.ARRAY:
            return KV(key, self._unpack(_SCALAR[vtype])[0], vtype)
        sub, n = self._unpack("<IQ")
        sub = GGUFValueType(sub)
        if sub == GGUFValueType.STRING:
            value = [self._str() for _ in range(n)]
        elif sub == GGUFValueType.ARRAY:
            raise ModelError(f"metadata {key}: nested arrays are not supported")
        else:
            a = np.frombuffer(self.buf, _NUMPY[sub], n, self.pos)
            self.pos += a.nbytes
            value = a.tolist()
        return KV(key, value, GGUFValueType.ARRAY, sub)

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._str()
        (n_dims,) = self._unpack("<I")
        shape = self._unpack(f"<{n_dims}Q")
        qtype, offset = self._unpack("<IQ")
        return name, tuple(int(n) for n in shape), GGMLQuantizationType(qtype), offset


def _open(path: Path) -> _Header:
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        return _Header(path)
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as e:
        raise ModelError(f"{path}: truncated or corrupt GGUF header ({e})") from None


def _tensors(h: _Header, path: Path, split: int) -> list[SourceTensor]:
    out = []
    for name, shape, qtype, offset in h.infos:
        block, size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape, dtype=np.int64))
        if shape and shape[0] % block:
            raise ModelError(f"{path}: tensor {name}: rows of {shape[0]} are not whole "
                             f"{qtype.name} blocks")
        start, nbytes = h.data_offset + offset, n // block * size
        if start + nbytes > h.mm.size:
            raise ModelError(f"{path}: truncated: tensor {name} runs past the end of the file")

        def load(start: int = start, nbytes: int = nbytes) -> np.ndarray:
            return h.mm[start:start + nbytes]

        def release(start: int = start, nbytes: int = nbytes) -> None:
            h.drop_pages(start, nbytes)

        out.append(SourceTensor(name, shape, qtype, load, split, release))
    return out


def load_gguf(path: str | Path) -> ModelSource:
    """The model in a GGUF file, or in all files of a split model."""
    paths = split_paths(path)
    headers = [_open(p) for p in paths]
    kv = headers[0].kv
    tensors = [t for i, (h, p) in enumerate(zip(headers, paths)) for t in _tensors(h, p, i)]
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
