"""Write a `ModelSource` as one GGUF file, streaming: one tensor in memory at a time.

The layout is gguf.cpp's (and gguf's GGUFWriter's): header, the key-value pairs in the
source's order with their own value types, the tensor infos, then each tensor's data padded
to the alignment. The file is written atomically (kquant.files.atomic).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType, GGUFWriter
from tqdm import tqdm

from ..errors import ModelError
from .atomic import atomic_path, check_writable, refuse_input_as_output
from .source import ModelSource

__all__ = ["write_gguf", "gguf_header_size", "gguf_file_size"]


def _raw(value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None) -> Any:
    """Strings as bytes, so text read with surrogateescape (not UTF-8) goes back as it came."""
    if vtype == GGUFValueType.STRING:
        return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if vtype == GGUFValueType.ARRAY and sub_type == GGUFValueType.STRING:
        return [v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v for v in value]
    return value


def _writer(source: ModelSource) -> GGUFWriter:
    w = GGUFWriter(path=None, arch=source.arch)
    w.kv_data = [{}]  # GGUFWriter puts general.architecture first; keep the source's order
    for kv in source.kv:
        w.add_key_value(kv.key, _raw(kv.value, kv.type, kv.sub_type), kv.type, kv.sub_type)
    alignment = source.get("general.alignment")
    if alignment is not None:
        w.data_alignment = int(alignment)
    for t in source.tensors:
        # numpy-order shape (GGUFWriter reverses it into ggml's ne order); dtype None so
        # the shape is taken as given for every type
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), None, t.nbytes, raw_dtype=t.type)
    return w


def write_gguf(source: ModelSource, path: str | os.PathLike[str], progress: bool = True) -> Path:
    """Write `source` to `path` atomically and return the path. Refuses to write over the
    source's own file. `progress` shows a tqdm bar over the bytes."""
    out = Path(path)
    if source.path:
        refuse_input_as_output(out, [source.path])
    check_writable(out)
    writer = _writer(source)
    with atomic_path(out, gguf_file_size(source)) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_tensors(writer, source, out.name, progress)
        except BaseException:
            with contextlib.suppress(Exception):  # already failing: report the first error
                writer.close()
            raise
        writer.close()
    return out


def _write_tensors(writer: GGUFWriter, source: ModelSource, label: str, progress: bool) -> None:
    """Each tensor's data in turn, loaded, checked, written and released."""
    total = sum(t.nbytes for t in source.tensors)
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
              desc=label, leave=False) as bar:
        for t in source.tensors:
            bar.set_postfix_str(t.name, refresh=False)
            data = np.ascontiguousarray(t.load())
            if data.nbytes != t.nbytes:
                raise ModelError(f"tensor {t.name}: {data.nbytes} bytes of data, {t.nbytes} "
                                 f"expected ({t.type.name} {list(t.shape)})")
            writer.write_tensor_data(data.reshape(-1).view(np.uint8))
            del data
            if t.release is not None:
                t.release()
            bar.update(t.nbytes)


def gguf_header_size(source: ModelSource) -> int:
    """The bytes before the first tensor's data in the file write_gguf makes of `source`: the
    header, pairs and tensor infos, padded to the alignment (measured on a scratch file; no
    tensor is loaded, and the tensors' types do not change it)."""
    import tempfile

    writer = _writer(source)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "header.gguf"
        writer.write_header_to_file(path=scratch)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        head = scratch.stat().st_size
    return _padded(head, writer.data_alignment)


def gguf_file_size(source: ModelSource) -> int:
    """The size in bytes of the file write_gguf makes of `source`: gguf_header_size, then each
    tensor's data padded to the alignment (gguf-py's layout)."""
    align = int(source.get("general.alignment") or 32)
    return gguf_header_size(source) + sum(_padded(t.nbytes, align) for t in source.tensors)


def _padded(n: int, align: int) -> int:
    return (n + align - 1) // align * align
