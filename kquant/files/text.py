"""Text inputs (calibration and evaluation files), read as llama.cpp's `-f` reads them."""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelError


def read_text(path: str | Path) -> str:
    """The calibration text as llama.cpp's -f reads it: the whole file, less one final newline."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: cannot read the text file ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not UTF-8 text ({e})") from None
    return text[:-1] if text.endswith("\n") else text
