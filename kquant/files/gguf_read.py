"""A GGUF file (or a set of split files) as a `ModelSource`.

The file is memory-mapped, so a tensor's bytes are read from disk only when its `load()` is
called. Split models (`name-00001-of-00003.gguf`) are read as one model the way llama.cpp's
loader does: metadata from the first file, tensors from all of them.

Every file is validated as llama.cpp's gguf_init_from_file_impl (ggml/src/gguf.cpp) does
before anything is trusted: counts and lengths against the bytes left in the file, value and
tensor types, names, shapes, alignment, and the tensor data layout. A file that fails any check
raises `ModelError` naming the file and the key or tensor at fault, never a traceback, a huge
allocation or a silently wrong tensor. `read_gguf` is that reader for any GGUF file (imatrix
files too); `load_gguf` adds what a model needs.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from pathlib import Path
from typing import NamedTuple, NoReturn

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from ..errors import ModelError
from .source import KV, ModelSource, SourceTensor

_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")

# gguf.cpp's limits
GGUF_MAX_STRING_LENGTH = 1024 * 1024 * 1024
GGUF_MAX_ARRAY_ELEMENTS = 1024 * 1024 * 1024
GGML_MAX_NAME = 64
GGML_MAX_DIMS = 4
_INT64_MAX = 2**63 - 1

# scalar value types: struct and numpy dtype (bool is a byte, true when not 0, as gguf.cpp reads it)
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<B", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_STRUCT = {t: struct.Struct(f) for t, f in _SCALAR.items()}
_NUMPY = {t: np.dtype(f) for t, f in _SCALAR.items()}
_VTYPES = {t.value: t for t in GGUFValueType}
_U32, _U64, _I32 = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<i")
_HEADER = struct.Struct("<4sIqq")  # magic, version, n_tensors, n_kv (gguf.cpp reads the counts as int64)

# ggml ids that gguf-py may still list but ggml removed (their type_traits have block size 0:
# Q4_2, Q4_3, the Q4_0_x_y and IQ4_NL_x_y repacks): llama.cpp refuses them in a file
_REMOVED_TYPES = {4: "Q4_2", 5: "Q4_3", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8",
                  36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8"}
_GGML_TYPES = {t.value: t for t in GGMLQuantizationType
               if t.value not in _REMOVED_TYPES and GGML_QUANT_SIZES.get(t, (0, 0))[0] > 0}

# the smallest KV pair (key length, type, 1-byte value) and tensor info (name length, n_dims,
# one dimension, type, offset): bounds for the counts before any loop
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8


class TensorInfo(NamedTuple):
    """One tensor as its GGUF file describes it, checked: `start` is its absolute byte offset."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    start: int
    nbytes: int


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
    on a 50k-token vocabulary, and trusts every count it reads; this reads the same layout
    (gguf.cpp's) in milliseconds, checks each count against the bytes left before using it,
    and leaves the tensor data mapped and untouched."""

    def __init__(self, path: Path):
        self.path = path
        self.end = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
        if head[:4] != b"GGUF":
            shown = "".join(chr(c) if 32 <= c < 127 else "?" for c in head[:4])
            raise ModelError(f"{path}: not a GGUF file (bad magic '{shown}', expected 'GGUF')")
        self.where = "header"
        if len(head) < _HEADER.size:
            self._corrupt(f"the file ends inside the {_HEADER.size}-byte header")
        self.mm = np.memmap(path, np.uint8, "r")
        self.buf = memoryview(self.mm)
        _, version, n_tensors, n_kv = _HEADER.unpack(head)
        self.pos = _HEADER.size
        self._check_version(version)
        self._check_counts(n_tensors, n_kv)
        self.kv = self._read_kvs(n_kv)
        self.alignment = self._alignment()
        self.infos = self._read_infos(n_tensors)
        self.data_offset = -(-self.pos // self.alignment) * self.alignment
        self._check_data()

    # ---- errors -------------------------------------------------------------------------

    def _fail(self, msg: str) -> NoReturn:
        raise ModelError(f"{self.path}: {msg}")

    def _corrupt(self, msg: str) -> NoReturn:
        # "truncated or corrupt": what kquant has always said of an unreadable header
        self._fail(f"truncated or corrupt GGUF header: {self.where}: {msg}")

    def _need(self, n: int, what: str) -> None:
        left = self.end - self.pos
        if n > left:
            self._corrupt(f"{what} needs {n} bytes, the file has {left} left")

    # ---- primitives ---------------------------------------------------------------------

    def _u32(self, what: str) -> int:
        self._need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def _u64(self, what: str) -> int:
        self._need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def _str(self, what: str) -> str:
        n = self._u64(f"the length of {what}")
        if n > GGUF_MAX_STRING_LENGTH:
            self._corrupt(f"{what}: string length {n} exceeds maximum {GGUF_MAX_STRING_LENGTH}")
        if n > self.end - self.pos:
            self._corrupt(f"{what}: string length {n} exceeds remaining file size "
                          f"{self.end - self.pos} bytes")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "surrogateescape")  # kept byte for byte when written back

    # ---- header -------------------------------------------------------------------------

    def _check_version(self, version: int) -> None:
        if version == 0:
            self._fail(f"bad GGUF version: {version}")
        if version & 0xFFFF == 0:
            self._fail(f"GGUF version {version} is extremely large: is there a mismatch between "
                       "the host and model endianness? (kquant reads little-endian files)")
        if version == 1:
            self._fail("GGUFv1 is not supported, please use a more up-to-date version")
        if version > 3:
            self._fail(f"GGUF version {version} is not supported (this file is version "
                       f"{version}, kquant reads up to version 3)")

    def _check_counts(self, n_tensors: int, n_kv: int) -> None:
        if n_tensors < 0:
            self._corrupt(f"number of tensors is {n_tensors} but must not be negative")
        if n_kv < 0:
            self._corrupt(f"number of key value pairs is {n_kv} but must not be negative")
        # before looping: n_kv and n_tensors cannot claim more than the file can hold
        need = n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES
        if need > self.end - self.pos:
            self._corrupt(f"{n_kv} key value pairs and {n_tensors} tensors need at least {need} "
                          f"bytes, the file has {self.end - self.pos} left")

    # ---- metadata -----------------------------------------------------------------------

    def _read_kvs(self, n_kv: int) -> list[KV]:
        out, seen = [], set()
        for i in range(n_kv):
            self.where = f"KV pair {i}"
            key = self._str("the key")
            if not key:
                self._corrupt(f"key {i} is empty")
            if key in seen:
                self._corrupt(f"duplicate key '{key}' for KV pair {i}")
            seen.add(key)
            self.where = f"key '{key}'"
            out.append(self._value(key))
        return out

    def _vtype(self, key: str, what: str) -> GGUFValueType:
        raw = self._u32(what)
        vtype = _VTYPES.get(raw)
        if vtype is None:
            self._corrupt(f"key '{key}' has invalid GGUF type {raw}")
        return vtype

    def _value(self, key: str) -> KV:
        vtype = self._vtype(key, "the value type")
        if vtype == GGUFValueType.STRING:
            return KV(key, self._str("the value"), vtype)
        if vtype != GGUFValueType.ARRAY:
            s = _STRUCT[vtype]
            self._need(s.size, "the value")
            (v,) = s.unpack_from(self.buf, self.pos)
            self.pos += s.size
            return KV(key, bool(v) if vtype == GGUFValueType.BOOL else v, vtype)
        sub = self._vtype(key, "the array's element type")
        if sub == GGUFValueType.ARRAY:
            self._corrupt(f"key '{key}' has invalid GGUF type {sub.value} (nested arrays are "
                          "not supported)")
        n = self._u64("the array length")
        if n > GGUF_MAX_ARRAY_ELEMENTS:
            self._corrupt(f"array of {n} elements exceeds maximum {GGUF_MAX_ARRAY_ELEMENTS}")
        value = self._str_array(n) if sub == GGUFValueType.STRING else self._num_array(sub, n)
        return KV(key, value, GGUFValueType.ARRAY, sub)

    def _num_array(self, sub: GGUFValueType, n: int) -> list:
        dt = _NUMPY[sub]
        self._need(n * dt.itemsize, f"an array of {n} {sub.name}")
        a = np.frombuffer(self.buf, dt, n, self.pos)
        self.pos += a.nbytes
        return (a != 0).tolist() if sub == GGUFValueType.BOOL else a.tolist()

    def _str_array(self, n: int) -> list[str]:
        # one bound before the loop (each string has an 8-byte length), then a tight loop: a
        # 50k-token vocabulary is read in milliseconds
        self._need(8 * n, f"an array of {n} strings")
        buf, pos, end, unpack = self.buf, self.pos, self.end, _U64.unpack_from
        out = []
        for i in range(n):
            if pos + 8 > end:
                self.pos = pos
                self._need(8, f"the length of string {i}")
            (k,) = unpack(buf, pos)
            pos += 8
            if k > end - pos:
                self.pos = pos
                self._corrupt(f"string {i}: string length {k} exceeds remaining file size "
                              f"{end - pos} bytes")
            out.append(bytes(buf[pos:pos + k]).decode("utf-8", "surrogateescape"))
            pos += k
        self.pos = pos
        return out

    def _alignment(self) -> int:
        self.where = "key 'general.alignment'"
        kv = next((k for k in self.kv if k.key == "general.alignment"), None)
        if kv is None:
            return GGUF_DEFAULT_ALIGNMENT
        if kv.type != GGUFValueType.UINT32:
            got = kv.type.name if kv.sub_type is None else f"ARRAY of {kv.sub_type.name}"
            self._corrupt(f"must be of type UINT32 but is {got}")
        if kv.value == 0 or kv.value & (kv.value - 1):
            self._corrupt(f"alignment {kv.value} is not a power of 2")
        return kv.value

    # ---- tensor infos -------------------------------------------------------------------

    def _read_infos(self, n_tensors: int) -> list[tuple]:
        infos, seen = [], set()
        for i in range(n_tensors):
            self.where = f"tensor {i}"
            name = self._str("the tensor name")
            if len(name.encode("utf-8", "surrogateescape")) >= GGML_MAX_NAME:
                self._corrupt(f"tensor name {i} is too long: "
                              f"{len(name.encode('utf-8', 'surrogateescape'))} >= {GGML_MAX_NAME}")
            if not name:
                # gguf.cpp lets an empty name through; no model has one and kquant finds
                # tensors by name, so it refuses it
                self._corrupt(f"tensor {i} has an empty name")
            if name in seen:
                self._corrupt(f"duplicate tensor name '{name}' for tensor {i}")
            seen.add(name)
            self.where = f"tensor '{name}'"
            shape = self._shape(name)
            qtype = self._ggml_type(name, shape)
            offset = self._u64("the data offset")
            infos.append((name, shape, qtype, offset))
        return infos

    def _shape(self, name: str) -> tuple[int, ...]:
        n_dims = self._u32("the number of dimensions")
        if n_dims > GGML_MAX_DIMS:
            self._corrupt(f"tensor '{name}' has invalid number of dimensions: {n_dims} > "
                          f"{GGML_MAX_DIMS}")
        if n_dims == 0:
            # gguf.cpp reads 0 dimensions as a scalar; ggml's writers never write one (ggml_n_dims
            # is at least 1), so kquant refuses it rather than guess a shape
            self._corrupt(f"tensor '{name}' has 0 dimensions")
        shape = tuple(self._u64(f"dimension {j}") for j in range(n_dims))
        for j, ne in enumerate(shape):
            if ne > _INT64_MAX:
                self._corrupt(f"tensor '{name}' dimension {j} has invalid number of elements: "
                              f"{ne - 2**64} < 0")
            if ne == 0:
                # gguf.cpp accepts empty tensors; no model weight is one, and kquant's
                # quantizers and writers assume rows, so kquant refuses them on purpose
                self._corrupt(f"tensor '{name}' dimension {j} is 0 (kquant refuses zero-sized "
                              "tensors)")
        if math.prod(shape) > _INT64_MAX:
            self._corrupt(f"incorrect shape for a tensor '{name}' may cause overflow errors: "
                          f"{shape} is >= INT64_MAX ({_INT64_MAX})")
        return shape

    def _ggml_type(self, name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
        self._need(4, "the ggml type")
        (raw,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        qtype = _GGML_TYPES.get(raw)
        if qtype is None:
            why = f" ({_REMOVED_TYPES[raw]}, removed from ggml)" if raw in _REMOVED_TYPES else ""
            self._corrupt(f"tensor '{name}' has invalid ggml type {raw}{why}")
        block = GGML_QUANT_SIZES[qtype][0]
        if shape[0] % block:
            self._corrupt(f"tensor '{name}' of type {raw} ({qtype.name}) has {shape[0]} elements "
                          f"per row, not a multiple of block size ({block})")
        return qtype

    # ---- data section -------------------------------------------------------------------

    def _check_data(self) -> None:
        """gguf.cpp's layout rule: tensors lie in order, each at the running sum of the
        padded sizes before it. This refuses misaligned and overlapping offsets and a type
        or shape that does not match the bytes; then every tensor must fit in the file."""
        if self.infos and self.data_offset > self.end:
            self._fail(f"truncated: the data section would start at byte {self.data_offset}, "
                       f"past the end of the file ({self.end} bytes)")
        expected, checked, before = 0, [], "the start of the data section"
        for name, shape, qtype, offset in self.infos:
            block, size = GGML_QUANT_SIZES[qtype]
            nbytes = math.prod(shape) // block * size
            if offset != expected:
                self._fail(f"tensor '{name}' has offset {offset}, expected {expected} (after "
                           f"{before}, padded to {self.alignment} bytes: a misplaced or "
                           "overlapping tensor, or a type or shape that does not match the "
                           "bytes)")
            start = self.data_offset + offset
            if start + nbytes > self.end:
                self._fail(f"truncated: tensor '{name}' runs past the end of the file (bytes "
                           f"{start}..{start + nbytes} of {self.end})")
            checked.append(TensorInfo(name, shape, qtype, start, nbytes))
            expected += -(-nbytes // self.alignment) * self.alignment
            before = f"tensor '{name}', {qtype.name} {list(shape)}, {nbytes} bytes"
        self.infos = checked
        self._check_end(self.data_offset + expected, before)

    def _check_end(self, end: int, last: str) -> None:
        # llama.cpp ignores bytes after the data section; every GGUF writer (gguf.cpp, gguf-py,
        # llama-quantize) ends the file there, so kquant refuses them: they are what is left
        # when the last tensor is declared smaller than its bytes (F32 data declared F16)
        if not self.infos:
            end = -(-self.pos // self.alignment) * self.alignment
        if self.end > end:
            self._fail(f"{self.end - end} bytes after the end of the data section at byte "
                       f"{end} (after {last}): a tensor declared smaller than its bytes?")

    def drop_pages(self, start: int, nbytes: int) -> None:
        """Let the kernel drop a used tensor's pages from this process's memory (they stay
        in the page cache), as llama-quantize unmaps each weight once it is written."""
        page = mmap.PAGESIZE
        lo = start // page * page
        mm = getattr(self.mm, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED, lo, min(start + nbytes, len(mm)) - lo)


def _open(path: Path) -> _Header:
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        return _Header(path)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None


def _tensors(h: _Header, split: int) -> list[SourceTensor]:
    out = []
    for info in h.infos:
        def load(start: int = info.start, nbytes: int = info.nbytes) -> np.ndarray:
            return h.mm[start:start + nbytes]

        def release(start: int = info.start, nbytes: int = info.nbytes) -> None:
            h.drop_pages(start, nbytes)

        out.append(SourceTensor(info.name, info.shape, info.type, load, split, release))
    return out


def read_gguf(path: str | Path) -> tuple[list[KV], list[SourceTensor]]:
    """The metadata and tensors of one GGUF file of any kind (a model, an imatrix), validated
    as llama.cpp's gguf_init_from_file does; `ModelError` naming the file and the key or
    tensor at fault otherwise."""
    p = Path(path)
    h = _open(p)
    return h.kv, _tensors(h, 0)


def _typed(kv: list[KV], key: str, types: tuple[GGUFValueType, ...], path: Path):
    """The value of `key` (None when absent), refused unless of one of `types`."""
    found = next((k for k in kv if k.key == key), None)
    if found is None:
        return None
    if found.type not in types:
        raise ModelError(f"{path}: key '{key}' must be of type "
                         f"{' or '.join(t.name for t in types)} but is {found.type.name}")
    return found.value


_INTEGER_TYPES = (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16,
                  GGUFValueType.INT16, GGUFValueType.UINT32, GGUFValueType.INT32,
                  GGUFValueType.UINT64, GGUFValueType.INT64)


def load_gguf(path: str | Path) -> ModelSource:
    """The model in a GGUF file, or in all files of a split model."""
    paths = split_paths(path)
    headers = [_open(p) for p in paths]
    kv = headers[0].kv
    tensors = [t for i, h in enumerate(headers) for t in _tensors(h, i)]
    arch = _typed(kv, "general.architecture", (GGUFValueType.STRING,), paths[0])
    if not arch:
        raise ModelError(f"{path}: no general.architecture in the metadata")
    seen: set[str] = set()
    for t in tensors:  # each file refuses its own duplicates; this catches them across splits
        if t.name in seen:
            raise ModelError(f"{path}: duplicate tensor name '{t.name}' across the split files")
        seen.add(t.name)
    expected = _typed(kv, "split.tensors.count", _INTEGER_TYPES, paths[0])
    if expected is not None and int(expected) != len(tensors):
        raise ModelError(f"{path}: split files hold {len(tensors)} tensors, the first says "
                         f"{expected}")
    return ModelSource(arch=str(arch), kv=kv, tensors=tensors, path=str(paths[0]))
