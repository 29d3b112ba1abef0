"""Writing outputs safely: every file kquant writes (GGUF models, imatrices, logits) goes
through here.

An output is written to a temporary file in its own folder (so the rename cannot cross file
systems), flushed to disk, and renamed over the target only when complete: an error, Ctrl-C or
a kill leaves any earlier file as it was, never half a file. Outputs that are also inputs are
refused before anything is written.
"""
from __future__ import annotations

import os
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


def refuse_input_as_output(out: PathLike, inputs: Iterable[PathLike | None]) -> None:
    """The one check and wording for an output path that names one of the inputs."""
    for inp in inputs:
        if inp and same_file(out, inp):
            raise ModelError(f"the output {out} is also an input ({inp}): choose another output path")


def check_writable(out: Path) -> None:
    if out.is_dir():
        raise ModelError(f"{out} is a directory")
    if not out.parent.is_dir():
        raise ModelError(f"folder {out.parent} does not exist")


def temporary_beside(out: Path) -> Path:
    """An empty temporary file next to `out`, with an ordinary file's permissions."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600; an output is an ordinary file
    return Path(name)


def commit(tmp: Path, out: Path) -> None:
    """Flush the finished temporary file to disk and rename it over `out`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """`with atomic_path(out) as tmp:` write the whole output to `tmp` (by path); it becomes
    `out` when the block ends without an error, and is removed when it raises."""
    out = Path(path)
    check_writable(out)
    tmp = temporary_beside(out)
    try:
        yield tmp
        commit(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: PathLike, chunks: Iterable[bytes]) -> Path:
    """Write the byte chunks as the file `path`, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
    return Path(path)
