"""Importance-matrix files as llama.cpp reads and writes them.

Two formats (common/imatrix-loader.cpp, tools/imatrix/imatrix.cpp):
- GGUF (current): general.type = "imatrix", imatrix.datasets / chunk_count / chunk_size, and
  per weight `<name>.in_sum2` (sum of squared activations per column, F32, ne = [n, n_mat])
  and `<name>.counts` (activations counted, F32, ne = [1, n_mat]; n_mat > 1 for experts).
- legacy .dat: int32 entry count; per entry the name, ncall, nval and nval float32 values
  already divided by count and multiplied by ncall; optionally the chunk count and dataset.

`weights_for_quantize` turns either into the per-column weights llama-quantize passes as
`quant_weights`, with its arithmetic (float32 division by the count, 1 where nothing counted).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from .source import ModelError

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


def load_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF or legacy .dat imatrix (what common_imatrix_load accepts)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such imatrix file")
    with open(p, "rb") as f:
        magic = f.read(4)
    return _load_gguf(p) if magic == b"GGUF" else _load_legacy(p)


def _load_gguf(p: Path) -> Imatrix:
    try:
        reader = GGUFReader(p, "r")
    except (ValueError, IndexError, OSError, KeyError) as e:
        raise ModelError(f"{p}: not a readable GGUF imatrix ({e})") from None
    fields = reader.fields
    im = Imatrix()
    if "imatrix.datasets" in fields:
        im.datasets = list(fields["imatrix.datasets"].contents())
    im.chunk_count = int(fields["imatrix.chunk_count"].contents()) if "imatrix.chunk_count" in fields else 0
    im.chunk_size = int(fields["imatrix.chunk_size"].contents()) if "imatrix.chunk_size" in fields else 0
    im.has_metadata = all(k in fields for k in ("imatrix.datasets", "imatrix.chunk_count",
                                                "imatrix.chunk_size"))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        for suffix in (IN_SUM2, COUNTS):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise ModelError(f"{p}: {t.name} must be F32")
                pairs.setdefault(t.name[:-len(suffix)], {})[suffix] = np.asarray(t.data).ravel()
    if not reader.tensors:
        raise ModelError(f"{p}: the imatrix holds no data")
    for name in sorted(pairs):
        sc = pairs[name]
        if IN_SUM2 not in sc or COUNTS not in sc:
            raise ModelError(f"{p}: mismatched sums and counts for {name}")
        # std::lround: half away from zero
        counts = np.floor(np.abs(sc[COUNTS].astype(np.float64)) + 0.5) * np.sign(sc[COUNTS])
        im.entries[name] = ImatrixEntry(sc[IN_SUM2].astype(np.float32), counts.astype(np.int64))
    return im


def _load_legacy(p: Path) -> Imatrix:
    data = p.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ModelError(f"{p}: truncated imatrix (legacy .dat) file")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ModelError(f"{p}: not an imatrix file (neither GGUF nor legacy .dat with entries)")
    im = Imatrix(is_legacy=True)
    for _ in range(n_entries):
        (length,) = take("<i")
        if length < 0 or pos + length > len(data):
            raise ModelError(f"{p}: truncated or corrupt imatrix (legacy .dat) file")
        name = data[pos:pos + length].split(b"\0")[0].decode("utf-8", "replace")
        pos += length
        ncall, nval = take("<ii")
        if nval < 1:
            raise ModelError(f"{p}: entry {name} has no values")
        sums = np.frombuffer(data, np.float32, nval, pos).copy() if pos + 4 * nval <= len(data) else None
        if sums is None:
            raise ModelError(f"{p}: truncated imatrix (legacy .dat) file")
        pos += 4 * nval
        im.entries[name] = ImatrixEntry(sums, np.array([ncall], np.int64))
    if pos < len(data):
        try:
            (im.chunk_count,) = take("<i")
            (length,) = take("<i")
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


def save_imatrix_gguf(im: Imatrix, path: str | Path) -> None:
    """Write the GGUF imatrix layout llama-imatrix writes (entries in name order)."""
    w = GGUFWriter(str(path), arch="")
    w.kv_data[0].clear()  # an imatrix file has no general.architecture
    w.add_key_value("general.type", "imatrix", GGUFValueType.STRING)
    w.add_key_value("imatrix.datasets", list(im.datasets), GGUFValueType.ARRAY, GGUFValueType.STRING)
    w.add_key_value("imatrix.chunk_count", int(im.chunk_count), GGUFValueType.UINT32)
    w.add_key_value("imatrix.chunk_size", int(im.chunk_size), GGUFValueType.UINT32)
    arrays = []
    for name in sorted(im.entries):
        e = im.entries[name]
        n_mat = max(1, e.counts.size)
        sums = e.sums.astype(np.float32).reshape(n_mat, -1)
        counts = e.counts.astype(np.float32).reshape(n_mat, 1)
        for suffix, a in ((IN_SUM2, sums), (COUNTS, counts)):
            w.add_tensor_info(name + suffix, a.shape, a.dtype, a.nbytes)
            arrays.append(a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for a in arrays:
        w.write_tensor_data(a)
    w.close()
