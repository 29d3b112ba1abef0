"""Write a `ModelSource` as one GGUF file, streaming: one tensor in memory at a time.

The layout is gguf.cpp's (and gguf's GGUFWriter's): header, the key-value pairs in the
source's order with their own value types, the tensor infos, then each tensor's data padded
to the alignment. The data goes to a temporary file in the output's folder that is renamed
into place only when everything is written; an error or Ctrl-C removes it and leaves any
earlier file alone.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType, GGUFWriter
from tqdm import tqdm

from ..errors import ModelError
from .source import ModelSource

__all__ = ["write_gguf"]


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


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one existing file (links and relative paths included)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _temporary(out: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600; a finished model is an ordinary file
    return Path(name)


def write_gguf(source: ModelSource, path: str | os.PathLike[str], progress: bool = True) -> Path:
    """Write `source` to `path` atomically and return the path. Refuses to write over the
    source's own file. `progress` shows a tqdm bar over the bytes."""
    out = Path(path)
    if source.path and same_file(Path(source.path), out):
        raise ModelError(f"output {out} is the input: choose another output path")
    if out.is_dir():
        raise ModelError(f"{out} is a directory")
    if not out.parent.is_dir():
        raise ModelError(f"folder {out.parent} does not exist")
    writer = _writer(source)
    tmp = _temporary(out)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(t.nbytes for t in source.tensors)
        with tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                  desc=out.name, leave=False) as bar:
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
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        try:
            writer.close()
        except Exception:  # already failing: the first error is the one to report
            pass
        tmp.unlink(missing_ok=True)
        raise
    return out
