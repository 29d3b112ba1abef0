"""kquant.files.atomic: the one atomic writer and the one "output is an input" check."""
from __future__ import annotations

import os

import pytest

from kquant.errors import ModelError
from kquant.files.atomic import atomic_path, refuse_input_as_output, same_file, write_atomic


def test_atomic_path_replaces_only_when_complete(tmp_path):
    out = tmp_path / "x.bin"
    out.write_bytes(b"earlier")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert out.read_bytes() == b"earlier"
    assert os.listdir(tmp_path) == ["x.bin"]
    write_atomic(out, [b"new ", b"file"])
    assert out.read_bytes() == b"new file"
    assert os.listdir(tmp_path) == ["x.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600


def test_atomic_path_refuses_folders(tmp_path):
    with pytest.raises(ModelError, match="is a directory"):
        write_atomic(tmp_path, [b""])
    with pytest.raises(ModelError, match="does not exist"):
        write_atomic(tmp_path / "no" / "x.bin", [b""])


def test_output_that_is_an_input(tmp_path):
    a = tmp_path / "model.gguf"
    a.write_bytes(b"x")
    link = tmp_path / "link.gguf"
    link.symlink_to(a)
    assert same_file(a, link) and same_file(a, tmp_path / "." / "model.gguf")
    assert not same_file(a, tmp_path / "other.gguf")
    for out in (a, link, tmp_path / "." / "model.gguf"):
        with pytest.raises(ModelError, match="is also an input"):
            refuse_input_as_output(out, [tmp_path / "text.txt", a])
    refuse_input_as_output(tmp_path / "new.gguf", [a, None])
