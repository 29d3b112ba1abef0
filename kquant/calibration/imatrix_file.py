"""Importance-matrix files as llama.cpp reads and writes them.

Two formats (common/imatrix-loader.cpp, tools/imatrix/imatrix.cpp):
- GGUF (current): general.type = "imatrix", imatrix.datasets / chunk_count / chunk_size, and
  per weight `<name>.in_sum2` (sum of squared activations per column, F32, ne = [n, n_mat])
  and `<name>.counts` (activations counted, F32, ne = [1, n_mat]; n_mat > 1 for experts).
- legacy .dat: int32 entry count; per entry the name, ncall, nval and nval float32 values
  already divided by count and multiplied by ncall; optionally the chunk count and dataset.

`load_imatrix` reads either as stored (`Imatrix.is_legacy` tells which). `weights_for_quantize`
turns either into the per-column weights llama-quantize passes as `quant_weights`, with its
arithmetic (float32 division by the count, 1 where nothing counted).

llama-imatrix's own in-memory form (IMatrixCollector::m_stats) is the GGUF one: raw float32
sums per column and int64 counts per matrix. `accumulate` adds a loaded file into it as
IMatrixCollector::load_imatrix does (`--in-file`, legacy files scaled back by the chunk size),
and `save_imatrix` writes it as llama-imatrix does, byte for byte: GGUF (save_imatrix) or
legacy .dat (save_imatrix_legacy, `--output-format dat`). Files are written atomically: a
temporary file next to the target, renamed over it only once complete.

A `kquant-imatrix --in-file a --in-file b -o out` run is::

    im = Imatrix()
    for f in in_files:
        accumulate(im, load_imatrix(f), chunk_size)   # chunk_size = n_ctx / n_parallel
    save_imatrix(im, out, fmt, prompt_file)
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import ModelError
from ..files.atomic import write_atomic
from ..files.gguf_read import read_gguf

IN_SUM2, COUNTS = ".in_sum2", ".counts"


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32 (n_mat * n,)
    counts: np.ndarray  # int64 (n_mat,): per expert; legacy files hold one ncall


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False
    has_metadata: bool = False
    path: str = ""  # the file it was loaded from, for messages


def load_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF or legacy .dat imatrix (what common_imatrix_load accepts)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such imatrix file")
    with open(p, "rb") as f:
        magic = f.read(4)
    im = _load_gguf(p) if magic == b"GGUF" else _load_legacy(p)
    im.path = str(path)
    return im


def _load_gguf(p: Path) -> Imatrix:
    """What common_imatrix_load reads from a GGUF imatrix, through kquant's validated reader."""
    kv, tensors = read_gguf(p)
    values = {k.key: k for k in kv}
    im = Imatrix()
    datasets = values.get("imatrix.datasets")
    # as common_imatrix_load: the datasets are taken only as an array of strings
    if datasets is not None and datasets.sub_type == GGUFValueType.STRING:
        im.datasets = list(datasets.value)
    im.chunk_count = _u32_value(p, values, "imatrix.chunk_count")
    im.chunk_size = _u32_value(p, values, "imatrix.chunk_size")
    im.has_metadata = all(k in values for k in ("imatrix.datasets", "imatrix.chunk_count",
                                                "imatrix.chunk_size"))
    if not tensors:
        raise ModelError(f"{p}: the imatrix holds no data")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in tensors:
        for suffix in (IN_SUM2, COUNTS):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                if t.type != GGMLQuantizationType.F32:
                    raise ModelError(f"{p}: {t.name} must be F32")
                pairs.setdefault(t.name[:-len(suffix)], {})[suffix] = t.load().view("<f4")
    if not pairs:  # llama-imatrix's "no data" for a GGUF that holds no entries: a model, say
        kind = values.get("general.type")
        what = f" (general.type = {kind.value})" if kind is not None else ""
        raise ModelError(f"{p}: not an imatrix: no .in_sum2 / .counts tensors{what}")
    for name in sorted(pairs):
        sc = pairs[name]
        if IN_SUM2 not in sc or COUNTS not in sc:
            raise ModelError(f"{p}: mismatched sums and counts for {name}")
        # std::lround: half away from zero
        counts = np.floor(np.abs(sc[COUNTS].astype(np.float64)) + 0.5) * np.sign(sc[COUNTS])
        im.entries[name] = ImatrixEntry(sc[IN_SUM2].astype(np.float32), counts.astype(np.int64))
    return im


def _u32_value(p: Path, values: dict, key: str) -> int:
    """A UINT32 key's value, 0 when absent (llama.cpp's gguf_get_val_u32 aborts on another
    type; a clear error here)."""
    kv = values.get(key)
    if kv is None:
        return 0
    if kv.type != GGUFValueType.UINT32:
        raise ModelError(f"{p}: key '{key}' must be of type UINT32 but is {kv.type.name}")
    return int(kv.value)


# the smallest legacy entry: name length, ncall, nval and one value
_MIN_DAT_ENTRY = 4 + 4 + 4 + 4


def _load_legacy(p: Path) -> Imatrix:
    data = p.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ModelError(f"{p}: truncated imatrix (legacy .dat) file: it ends inside {what}")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1:
        raise ModelError(f"{p}: not an imatrix file (neither GGUF nor legacy .dat with entries)")
    if n_entries * _MIN_DAT_ENTRY > len(data) - pos:  # before looping over a corrupt count
        raise ModelError(f"{p}: truncated or corrupt imatrix (legacy .dat) file: {n_entries} "
                         f"entries cannot fit in its {len(data)} bytes")
    im = Imatrix(is_legacy=True)
    for i in range(1, n_entries + 1):
        where = f"entry {i} of {n_entries}"
        (length,) = take("<i", f"the name length of {where}")
        if length < 0 or length > len(data) - pos:
            raise ModelError(f"{p}: truncated or corrupt imatrix (legacy .dat) file: {where} "
                             f"has a name of {length} bytes, {len(data) - pos} are left")
        name = data[pos:pos + length].split(b"\0")[0].decode("utf-8", "replace")
        pos += length
        if not name:
            raise ModelError(f"{p}: {where} has an empty name")
        if name in im.entries:  # llama.cpp keeps the last silently; one of them is wrong
            raise ModelError(f"{p}: {where} repeats the name {name}")
        ncall, nval = take("<ii", f"the counts of {where} ({name})")
        if nval < 1:
            raise ModelError(f"{p}: {where} ({name}) has {nval} values, it needs at least 1")
        if 4 * nval > len(data) - pos:
            raise ModelError(f"{p}: truncated imatrix (legacy .dat) file: {where} ({name}) "
                             f"has {nval} values, {len(data) - pos} bytes are left")
        sums = np.frombuffer(data, "<f4", nval, pos).astype(np.float32)
        pos += 4 * nval
        im.entries[name] = ImatrixEntry(sums, np.array([ncall], np.int64))
    if pos < len(data):
        try:
            (im.chunk_count,) = take("<i", "the chunk count")
            (length,) = take("<i", "the dataset name length")
            if length > 0 and pos + length <= len(data):
                im.datasets.append(data[pos:pos + length].split(b"\0")[0].decode("utf-8", "replace"))
        except ModelError:
            pass  # the trailer is optional and read as far as it goes, as the C++ does
    return im


def weights_for_quantize(im: Imatrix) -> dict[str, np.ndarray]:
    """Per-column quantization weights by tensor name, as llama-quantize's load_imatrix makes
    them: GGUF sums divided by each expert's count (1.0 where it counted nothing); legacy
    values divided by ncall (as they are when ncall is 0)."""
    out = {}
    for name, e in im.entries.items():
        if im.is_legacy:
            ncall = int(e.counts[0]) if e.counts.size else 0
            out[name] = e.sums / np.float32(ncall) if ncall > 0 else e.sums.copy()
            continue
        n_mat = e.counts.size
        if n_mat == 0 or e.sums.size % n_mat:
            raise ModelError(f"imatrix entry {name}: {e.sums.size} sums do not split into "
                             f"{n_mat} counts")
        sums = e.sums.reshape(n_mat, -1)
        w = np.ones_like(sums)
        for j, c in enumerate(e.counts):
            if np.float32(c) > 0:
                w[j] = sums[j] / np.float32(c)
        out[name] = w.ravel()
    return out


# --------------------------------------------------------------------------------------------
# llama-imatrix's collector: --in-file accumulation and the two writers


def _c_div(a: int, b: int) -> int:
    """C integer division (truncation toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _i32(v: int) -> int:
    """A value stored in an int32_t (two's complement wrap)."""
    return (int(v) + 2**31) % 2**32 - 2**31


def accumulate(dst: Imatrix, src: Imatrix, chunk_size: int) -> None:
    """Add the loaded imatrix `src` into `dst` (the collector's form: raw sums, counts per
    matrix) as IMatrixCollector::load_imatrix does for each `--in-file`:

    - legacy .dat entries are scaled back to raw form: sums * chunk_size (float32) and
      counts += ncall * chunk_size;
    - GGUF sums and counts are added; a single earlier count is first broadcast over a
      file's several (experts); a different number of sums or counts for one tensor raises ModelError naming
      the tensor and the file (and leaves `dst` unchanged);
    - src's datasets are appended, `dst.chunk_size = chunk_size` and `dst.chunk_count` becomes
      the largest count // chunk_size (m_last_chunk).

    `chunk_size` is llama-imatrix's n_ctx / n_parallel (see kquant-imatrix)."""
    chunk_size = int(chunk_size)
    if chunk_size <= 0:
        raise ModelError(f"chunk size {chunk_size}: it must be positive (n_ctx / n_parallel)")
    if dst.is_legacy and dst.entries:
        raise ModelError("accumulate adds into llama-imatrix's raw form: start from Imatrix(), "
                         "not from a loaded legacy .dat file")
    where = src.path or "the imatrix"
    work = dict(dst.entries)  # entries are replaced, not modified: dst stays intact on errors
    c32 = np.float32(chunk_size)
    for name in sorted(src.entries):
        entry = src.entries[name]
        sums = np.asarray(entry.sums, np.float32).ravel()
        counts = np.asarray(entry.counts, np.int64).ravel()
        e = work.get(name)
        values = e.sums if e is not None else np.zeros(0, np.float32)
        have = e.counts if e is not None else np.zeros(0, np.int64)
        if src.is_legacy:
            if values.size == 0:
                values, have = np.zeros(sums.size, np.float32), np.zeros(1, np.int64)
            if values.size < sums.size:
                # the C++ writes past its buffer here; a clear error instead
                raise ModelError(f"{where}: mismatched sums size for {name}: {sums.size} != "
                                 f"{values.size}")
            values = values.copy()
            # C++: e.values[j] += entry.sums[j] * chunk_size (float arithmetic); a longer
            # earlier entry keeps its tail, as there
            values[:sums.size] += sums * c32
            ncall = int(counts[0]) if counts.size else 0
            have = have + np.int64(ncall * chunk_size)
        else:
            if values.size == 0:
                values = np.zeros(sums.size, np.float32)
            elif sums.size != values.size:
                raise ModelError(f"{where}: mismatched sums size for {name}: {sums.size} != "
                                 f"{values.size} (the imatrix files are of different models)")
            if have.size == 0:
                have = np.zeros(counts.size, np.int64)
            elif have.size == 1 and counts.size > 1:
                have = np.full(counts.size, have[0], np.int64)
            elif counts.size != have.size:
                raise ModelError(f"{where}: mismatched counts size for {name}: {counts.size} != "
                                 f"{have.size} (the imatrix files are of different models)")
            values = values + sums
            have = have + counts
        work[name] = ImatrixEntry(values.astype(np.float32, copy=False), have.astype(np.int64))
    max_count = 0
    for e in work.values():
        if e.counts.size:
            max_count = max(max_count, int(e.counts.max()))
    dst.entries = work
    dst.datasets = list(dst.datasets) + list(src.datasets)
    dst.chunk_count = _i32(max_count // chunk_size)
    dst.chunk_size = chunk_size
    dst.is_legacy = False
    dst.has_metadata = True


def at_path(path: str | os.PathLike[str], n_chunk: int) -> str:
    """The name of llama-imatrix's periodic copy after `n_chunk` chunks (--save-frequency):
    `path + ".at_" + str(n_chunk)`; the plain path for n_chunk <= 0."""
    path = os.fspath(path)
    return f"{path}.at_{n_chunk}" if n_chunk > 0 else path


def _c_str(s: str) -> bytes:
    """A string as the C++ passes it (const char *): UTF-8, cut at a NUL."""
    return s.encode("utf-8", "surrogateescape").split(b"\0")[0]


def _f32_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def _check_form(im: Imatrix, name: str, e: ImatrixEntry) -> tuple[np.ndarray, np.ndarray]:
    sums = np.asarray(e.sums, np.float32).ravel()
    counts = np.asarray(e.counts, np.int64).ravel()
    if counts.size and sums.size and (sums.size % counts.size or sums.size < counts.size):
        raise ModelError(f"imatrix entry {name}: {sums.size} sums do not split into "
                         f"{counts.size} counts")
    return sums, counts


_GGUF_ALIGN = 32
_T_U32, _T_STRING, _T_ARRAY = 4, 8, 9


def _gguf_chunks(im: Imatrix, datasets: list[str]) -> Iterator[bytes]:
    def s(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    tensors = []  # (name, ne, data)
    for name in sorted(im.entries):
        sums, counts = _check_form(im, name, im.entries[name])
        nval, nmat = sums.size, counts.size
        if nval > 0 and nmat > 0:
            tensors.append((name + IN_SUM2, (nval // nmat, nmat), sums))
            tensors.append((name + COUNTS, (1, nmat), counts.astype(np.float32)))
    kv = [s(b"general.type") + struct.pack("<I", _T_STRING) + s(b"imatrix"),
          s(b"imatrix.datasets") + struct.pack("<IIQ", _T_ARRAY, _T_STRING, len(datasets))
          + b"".join(s(_c_str(d)) for d in datasets),
          s(b"imatrix.chunk_count") + struct.pack("<II", _T_U32, im.chunk_count % 2**32),
          s(b"imatrix.chunk_size") + struct.pack("<II", _T_U32, im.chunk_size % 2**32)]
    meta = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(kv))] + kv
    offset = 0
    for name, ne, data in tensors:
        n_dims = 2 if ne[1] != 1 else 1  # ggml_n_dims: trailing 1s dropped
        meta.append(s(name.encode("utf-8", "surrogateescape")) + struct.pack("<I", n_dims)
                    + struct.pack(f"<{n_dims}Q", *ne[:n_dims]) + struct.pack("<IQ", 0, offset))
        offset += -(-data.nbytes // _GGUF_ALIGN) * _GGUF_ALIGN
    head = b"".join(meta)
    yield head + bytes(-len(head) % _GGUF_ALIGN)
    for _, _, data in tensors:
        raw = _f32_bytes(data)
        yield raw + bytes(-len(raw) % _GGUF_ALIGN)


def save_imatrix_gguf(im: Imatrix, path: str | os.PathLike[str], prompt_file: str = "") -> Path:
    """Write `im` (the collector's raw form) as llama-imatrix's save_imatrix does, byte for
    byte: KV general.type, imatrix.datasets (im.datasets, then `prompt_file` if given),
    imatrix.chunk_count, imatrix.chunk_size; per entry in name order `<name>.in_sum2`
    ([n, n_mat]) and `<name>.counts` ([1, n_mat]) F32, 32-byte aligned. Atomic."""
    if im.is_legacy and im.entries:
        raise ModelError("a legacy .dat imatrix holds normalized values: accumulate() it into "
                         "Imatrix() before writing it as GGUF")
    datasets = list(im.datasets) + ([prompt_file] if prompt_file else [])
    for name in im.entries:  # shape errors before the target is touched
        _check_form(im, name, im.entries[name])
    return write_atomic(path, _gguf_chunks(im, datasets))


def _legacy_chunks(im: Imatrix, dataset: str) -> Iterator[bytes]:
    chunk_size = int(im.chunk_size)
    to_store = []
    for name, e in im.entries.items():
        counts = np.asarray(e.counts, np.int64).ravel()
        if counts.size == 0:
            continue
        # C++: `for (const int c : counts)`, the counts narrowed to int
        if np.all(counts.astype(np.int32) == 0):
            continue
        to_store.append(name)
    to_store.sort(key=lambda n: n.encode("utf-8", "surrogateescape"))
    out = [struct.pack("<i", len(to_store))]
    for name in to_store:
        sums, counts = _check_form(im, name, im.entries[name])
        b = name.encode("utf-8", "surrogateescape")
        ncall = _i32(_c_div(int(counts.max()) + (chunk_size - 1), chunk_size))
        nval, nmat = sums.size, counts.size
        out.append(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, _i32(nval)))
        if nval > 0 and nmat > 0:
            count = np.repeat(counts.astype(np.float32), nval // nmat)
            value = sums.copy()
            empty = count == np.float32(0)
            value[empty] = np.float32(1)  # store 1 for partial data
            count[empty] = np.float32(1)
            out.append(_f32_bytes((value / count) * np.float32(ncall)))
        yield b"".join(out)
        out = []
    d = _c_str(dataset)
    yield b"".join(out) + struct.pack("<ii", _i32(im.chunk_count), len(d)) + d


def save_imatrix_legacy(im: Imatrix, path: str | os.PathLike[str],
                        dataset: str | None = None) -> Path:
    """Write `im` (the collector's raw form) as llama-imatrix's save_imatrix_legacy does
    (`--output-format dat`), byte for byte: entries with every count zero are left out, the
    rest in name order with ncall = ceil(max count / im.chunk_size) and values
    sum / count * ncall (1 * ncall for an expert that counted nothing); then im.chunk_count and
    the dataset name: `dataset` (llama-imatrix's prompt file) if given and not empty, else the
    last of im.datasets, else empty. Atomic."""
    if im.is_legacy and im.entries:
        raise ModelError("a loaded legacy .dat imatrix must be accumulate()d into Imatrix() "
                         "before it is written again")
    if int(im.chunk_size) <= 0:
        raise ModelError(f"imatrix chunk size {im.chunk_size}: the .dat format needs a positive "
                         "one (n_ctx / n_parallel)")
    for name in im.entries:
        _check_form(im, name, im.entries[name])
    if not dataset:
        dataset = im.datasets[-1] if im.datasets else ""
    return write_atomic(path, _legacy_chunks(im, dataset))


def save_imatrix(im: Imatrix, path: str | os.PathLike[str], fmt: str = "gguf",
                 prompt_file: str = "") -> Path:
    """llama-imatrix's IMatrixCollector::save_imatrix: write `im` to `path` as `fmt` ("gguf",
    the default, or "dat" for `--output-format dat`); the format does not follow the
    suffix. `prompt_file` is llama-imatrix's `-f` file name ("" when only combining
    --in-files): GGUF lists it after im.datasets, .dat stores it (else the last of
    im.datasets). For the periodic copies pass `at_path(path, n_chunk)`. The write is atomic."""
    if fmt == "gguf":
        return save_imatrix_gguf(im, path, prompt_file)
    if fmt == "dat":
        return save_imatrix_legacy(im, path, prompt_file or None)
    raise ValueError(f"invalid output format {fmt!r}: gguf or dat")
