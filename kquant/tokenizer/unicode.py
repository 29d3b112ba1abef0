"""llama.cpp's code point classes (src/unicode.cpp, unicode-data.cpp) and GPT-2's byte <-> unicode map.

llama.cpp classifies every code point with one category flag from UnicodeData.txt (\\p{N}, \\p{L},
\\p{Z}, \\p{M}, \\p{P}, \\p{S}, \\p{C}, or "undefined" for unassigned ones) plus a whitespace bit from
its own fixed list.  The categories here come from Python's `unicodedata`; llama.cpp's table was
generated from Unicode 15.1, so the code points assigned since the Unicode of this Python (14.0 for
Python 3.11) are patched in from `_NEWER` (the difference, found by comparing the two tables).
"""
from __future__ import annotations

import bisect
import unicodedata

import numpy as np

UNDEFINED = 0x0001
NUMBER = 0x0002
LETTER = 0x0004
SEPARATOR = 0x0008
MARK = 0x0010
PUNCTUATION = 0x0020
SYMBOL = 0x0040
CONTROL = 0x0080
CATEGORIES = 0x00FF
WHITESPACE = 0x0100

_CATEGORY_FLAG = {
    "Cn": UNDEFINED, "Cc": CONTROL, "Cf": CONTROL, "Co": CONTROL, "Cs": CONTROL,
    "Ll": LETTER, "Lm": LETTER, "Lo": LETTER, "Lt": LETTER, "Lu": LETTER,
    "Mc": MARK, "Me": MARK, "Mn": MARK,
    "Nd": NUMBER, "Nl": NUMBER, "No": NUMBER,
    "Pc": PUNCTUATION, "Pd": PUNCTUATION, "Pe": PUNCTUATION, "Pf": PUNCTUATION,
    "Pi": PUNCTUATION, "Po": PUNCTUATION, "Ps": PUNCTUATION,
    "Sc": SYMBOL, "Sk": SYMBOL, "Sm": SYMBOL, "So": SYMBOL,
    "Zl": SEPARATOR, "Zp": SEPARATOR, "Zs": SEPARATOR,
}

# llama.cpp's unicode_set_whitespace (PropList.txt White_Space)
WHITESPACE_CPTS = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                             0x2028, 0x2029, 0x202F, 0x205F, 0x3000])

# (first, last, flag): code points unassigned in Unicode 14.0 that llama.cpp's Unicode 15.1 table
# classifies; used only where `unicodedata` says "Cn"
_NEWER = [
    (0xcf3, 0xcf3, 0x10), (0xece, 0xece, 0x10), (0x2ffc, 0x2fff, 0x40),
    (0x31ef, 0x31ef, 0x40), (0x10efd, 0x10eff, 0x10), (0x1123f, 0x11240, 0x4),
    (0x11241, 0x11241, 0x10), (0x11b00, 0x11b09, 0x20), (0x11f00, 0x11f01, 0x10),
    (0x11f02, 0x11f02, 0x4), (0x11f03, 0x11f03, 0x10), (0x11f04, 0x11f10, 0x4),
    (0x11f12, 0x11f33, 0x4), (0x11f34, 0x11f3a, 0x10), (0x11f3e, 0x11f42, 0x10),
    (0x11f43, 0x11f4f, 0x20), (0x11f50, 0x11f59, 0x2), (0x1342f, 0x1342f, 0x4),
    (0x13439, 0x1343f, 0x80), (0x13440, 0x13440, 0x10), (0x13441, 0x13446, 0x4),
    (0x13447, 0x13455, 0x10), (0x1b132, 0x1b132, 0x4), (0x1b155, 0x1b155, 0x4),
    (0x1d2c0, 0x1d2d3, 0x2), (0x1df25, 0x1df2a, 0x4), (0x1e030, 0x1e06d, 0x4),
    (0x1e08f, 0x1e08f, 0x10), (0x1e4d0, 0x1e4eb, 0x4), (0x1e4ec, 0x1e4ef, 0x10),
    (0x1e4f0, 0x1e4f9, 0x2), (0x1f6dc, 0x1f6dc, 0x40), (0x1f774, 0x1f776, 0x40),
    (0x1f77b, 0x1f77f, 0x40), (0x1f7d9, 0x1f7d9, 0x40), (0x1fa75, 0x1fa77, 0x40),
    (0x1fa87, 0x1fa88, 0x40), (0x1faad, 0x1faaf, 0x40), (0x1fabb, 0x1fabd, 0x40),
    (0x1fabf, 0x1fabf, 0x40), (0x1face, 0x1facf, 0x40), (0x1fada, 0x1fadb, 0x40),
    (0x1fae8, 0x1fae8, 0x40), (0x1faf7, 0x1faf8, 0x40), (0x2b739, 0x2b739, 0x4),
    (0x2ebf0, 0x2ee5d, 0x4), (0x31350, 0x323af, 0x4),
]
_NEWER_FIRST = [r[0] for r in _NEWER]


def cpt_flags(cpt: int) -> int:
    """llama.cpp's unicode_cpt_flags_from_cpt(cpt) (the category and whitespace bits)."""
    flags = _CATEGORY_FLAG[unicodedata.category(chr(cpt))]
    if flags == UNDEFINED:
        i = bisect.bisect_right(_NEWER_FIRST, cpt) - 1
        if i >= 0 and _NEWER[i][0] <= cpt <= _NEWER[i][1]:
            flags = _NEWER[i][2]
    if cpt in WHITESPACE_CPTS:
        flags |= WHITESPACE
    return flags


# flags of every code point, filled in as code points are met (0: not computed yet; every
# computed value is non-zero)
_TABLE = np.zeros(0x110000, dtype=np.uint16)
_TABLE[:128] = [cpt_flags(c) for c in range(128)]


def flags_of(cpts: np.ndarray) -> np.ndarray:
    """The flags of each code point of `cpts` (an integer array)."""
    high = cpts[cpts >= 128]
    if high.size:
        uniq = np.unique(high)
        for c in uniq[_TABLE[uniq] == 0].tolist():
            _TABLE[c] = cpt_flags(c)
    return _TABLE[cpts]


def codepoints(text: str) -> np.ndarray:
    """The code points of `text` as an int64 array."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (llama.cpp's unicode_byte_to_utf8_map)."""
    bs = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in bs}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}
# str.translate table: a latin-1 decoded byte string -> its byte-level (GPT-2) spelling
BYTE_ENCODE = {b: c for b, c in enumerate(BYTE_TO_UNICODE)}


def byte_encode(text: str) -> str:
    """llama.cpp's unicode_byte_encoding_process for one word: each UTF-8 byte as its character."""
    return text.encode("utf-8").decode("latin-1").translate(BYTE_ENCODE)
