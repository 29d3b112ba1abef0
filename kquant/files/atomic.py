"""Writing outputs safely: every file kquant writes (GGUF models, imatrices, logits) goes
through here.

An output is written to a temporary file in its own folder (so the rename cannot cross file
systems), flushed to disk, and renamed over the target only when complete: an error, Ctrl-C or
a kill leaves any earlier file as it was, never half a file. Outputs that are also inputs are
refused before anything is written.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import ModelError

PathLike = str | os.PathLike[str]


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file (links and relative paths included), or would."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _folder_file_named(out: Path, folder: Path) -> Path | None:
    """The file of an input folder (a Hugging Face model: config, weights, tokenizer, ...) that
    `out` would overwrite, through any link. GGUF files are left out: a folder's reader never
    reads them, and they are where kquant-convert writes by default, run after run."""
    if not out.exists():
        return None
    for f in folder.rglob("*"):
        if f.is_file() and same_file(out, f) and not _is_gguf(f):
            return f
    return None


def refuse_input_as_output(out: PathLike, inputs: Iterable[PathLike | None]) -> None:
    """The one check and wording for an output path that names one of the inputs, or a file
    of an input folder (hard links and symlinks included)."""
    for inp in inputs:
        if not inp:
            continue
        if same_file(out, inp):
            raise ModelError(f"the output {out} is also an input ({inp}): choose another output path")
        if Path(inp).is_dir() and (hit := _folder_file_named(Path(out), Path(inp))) is not None:
            raise ModelError(f"the output {out} would overwrite {hit}, a file of the input folder "
                             f"{inp}: choose another output path")


def check_writable(out: Path) -> None:
    if out.is_dir():
        raise ModelError(f"{out} is a directory")
    if not out.parent.is_dir():
        raise ModelError(f"folder {out.parent} does not exist")


def temporary_beside(out: Path) -> Path:
    """An empty temporary file next to `out`, with an ordinary file's permissions."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600; an output is an ordinary file
    except BaseException:  # a signal here too leaves nothing behind
        os.unlink(name)
        raise
    return Path(name)


def commit(tmp: Path, out: Path) -> None:
    """Flush the finished temporary file to disk and rename it over `out`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_space(out: Path, size: int | None) -> None:
    """Refuse before writing when the output's folder has less room than the output needs."""
    free = _free_bytes(out.parent)
    if size is not None and free is not None and size > free:
        raise ModelError(f"not enough space for {out}: it needs {_bytes(size)}, {out.parent} has "
                         f"{_bytes(free)} free")


def _bytes(n: int) -> str:
    return f"{n} bytes" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB ({n} bytes)"


def _disk_full(e: OSError) -> bool:
    # numpy's tofile reports a short write as "N requested and M written", with no errno
    return e.errno in (errno.ENOSPC, errno.EDQUOT) or "requested and" in str(e)


def _no_space(out: Path, tmp: Path | None, size: int | None) -> ModelError:
    written = tmp.stat().st_size if tmp is not None and tmp.exists() else 0
    need = f", of the {_bytes(size)} it needs" if size is not None else ""
    return ModelError(f"no space left on the device: writing {out} stopped after "
                      f"{_bytes(written)}{need}; {out} was left as it was")


@contextmanager
def atomic_path(path: PathLike, size: int | None = None) -> Iterator[Path]:
    """`with atomic_path(out) as tmp:` write the whole output to `tmp` (by path); it becomes
    `out` when the block ends without an error, and is removed when it raises. `size`, when
    known, is checked against the free space first; a full disk is a ModelError saying so."""
    out = Path(path)
    check_writable(out)
    check_space(out, size)
    tmp: Path | None = None
    try:
        tmp = temporary_beside(out)
        yield tmp
        commit(tmp, out)
    except OSError as e:
        err = _no_space(out, tmp, size) if _disk_full(e) else None
        _remove(tmp)
        if err is not None:
            raise err from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path | None) -> None:
    if tmp is not None:
        tmp.unlink(missing_ok=True)


def write_atomic(path: PathLike, chunks: Iterable[bytes]) -> Path:
    """Write the byte chunks as the file `path`, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
    return Path(path)
