"""Write a `ModelSource` as one GGUF file, streaming: one tensor in memory at a time.

The layout is gguf.cpp's (and gguf's GGUFWriter's): header, the key-value pairs in the
source's order, the tensor infos, then each tensor's data padded to the alignment. The
data goes to a temporary file in the output's folder that is renamed into place only when
everything is written; an error or Ctrl-C removes it and leaves any earlier file alone.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from gguf import GGUF_DEFAULT_ALIGNMENT, GGUFValueType, GGUFWriter
from tqdm import tqdm

from .source import ModelError, ModelSource


def _raw(value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None) -> Any:
    """Strings as bytes, so that text read with surrogateescape (not UTF-8) goes back as it came."""
    if vtype == GGUFValueType.STRING:
        return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if vtype == GGUFValueType.ARRAY and sub_type == GGUFValueType.STRING:
        return [v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v for v in value]
    return value


def _writer(source: ModelSource, path: Path) -> GGUFWriter:
    w = GGUFWriter(str(path), arch=source.arch)
    w.kv_data[0].clear()  # GGUFWriter puts general.architecture first; keep the source's order
    for kv in source.kv:
        w.add_key_value(kv.key, _raw(kv.value, kv.type, kv.sub_type), kv.type, kv.sub_type)
    alignment = source.get("general.alignment")
    if alignment is not None:
        w.data_alignment = int(alignment)
    for t in source.tensors:
        # GGUFWriter takes numpy-order shapes and reverses them into ne order
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), None, t.nbytes, raw_dtype=t.type)
    return w


def write_gguf(source: ModelSource, path: str | Path, progress: bool = True,
               on_tensor: Callable[[str, int], None] | None = None) -> int:
    """Write `source` to `path` atomically; returns the file size. A tqdm bar counts bytes."""
    out = Path(path)
    if source.path and out.exists() and os.path.samefile(out, source.path):
        raise ModelError(f"output {out} is the input: choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a finished model is an ordinary file
    try:
        w = _writer(source, tmp)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total = sum(t.nbytes for t in source.tensors)
        with tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                  desc=out.name, leave=False) as bar:
            for t in source.tensors:
                bar.set_postfix_str(t.name, refresh=False)
                data = t.load()
                if data.nbytes != t.nbytes:
                    raise ModelError(f"tensor {t.name}: {data.nbytes} bytes produced, "
                                     f"{t.nbytes} expected")
                w.write_tensor_data(data.reshape(-1).view("uint8"))
                bar.update(t.nbytes)
                if on_tensor is not None:
                    on_tensor(t.name, t.nbytes)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out.stat().st_size


__all__ = ["write_gguf", "GGUF_DEFAULT_ALIGNMENT"]
