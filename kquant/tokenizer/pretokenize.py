"""BPE pre-tokenization: llama.cpp's unicode_regex_split for the pre-tokenizers kquant supports.

llama.cpp splits text with a list of regexes, each cutting the pieces the previous one made.  The
common GPT-2 / Llama-3 / Qwen2 / Qwen3.5 patterns have hand-written splitters in llama.cpp's
unicode.cpp (unicode_regex_split_custom_*); they are ported here one to one, as Numba kernels over
the text's code points and their flags (kquant.tokenizer.unicode).  GPT-4o's pattern runs through
std::regex on the collapsed text (below); its splitter here is that regex's backtracking worked
out by hand (_step_gpt4o).  The remaining regexes of the
supported pre-tokenizers go through std::regex in llama.cpp, on a "collapsed" text where each
code point >= 128 stands for its category; those used here are single character classes
(`\\p{N}`, `\\p{N}+`, `[0-9][0-9][0-9]`, punctuation runs, the Bloom word class) and are written out
with the same matching rules (leftmost, greedy, unmatched stretches kept as pieces).

Every splitter takes (cpts, flags, lengths) and returns new lengths: the text as consecutive
pieces, each given by its length in code points.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import unicode as U

OUT_OF_RANGE = 0xFFFFFFFF

_WS = U.WHITESPACE
_L = U.LETTER
_N = U.NUMBER
_M = U.MARK
_P = U.PUNCTUATION

# custom splitter kinds
GPT2, LLAMA3, QWEN2, QWEN35, GPT4O, TEKKEN = 0, 1, 2, 3, 4, 5
# character-class splitter kinds
NUMBER_EACH, NUMBER_RUN, PUNCT_RUN, PUNCT_RUN_BACKTICK, NEWLINE_RUN, DIGITS3, BLOOM_WORD = range(7)


@njit(cache=True)
def _gf(fl, ini, end, p):
    return np.int64(fl[p]) if ini <= p < end else np.int64(0)


@njit(cache=True)
def _gc(cp, ini, end, p):
    return cp[p] if ini <= p < end else np.int64(OUT_OF_RANGE)


@njit(cache=True)
def _run_end(fl, ini, end, p, mask):
    """The end of the run from p of code points with a flag in `mask`."""
    while _gf(fl, ini, end, p) & mask:
        p += 1
    return p


@njit(cache=True)
def _other_end(fl, ini, end, p, mask):
    """The end of the run from p of code points with no flag in `mask` (and in range)."""
    while not (_gf(fl, ini, end, p) & mask) and _gf(fl, ini, end, p) != 0:
        p += 1
    return p


@njit(cache=True)
def _lower_ascii(c):
    return c + 32 if 65 <= c <= 90 else c


# GPT-4o's pattern as llama.cpp runs it (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT4O), through
# std::regex on the collapsed text, where \p{L} is [A-Za-z] plus the one byte every non-ASCII
# letter becomes, \p{N} likewise, and \s is ASCII whitespace plus the byte every non-ASCII space
# becomes:
#   [^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?
#  |[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:...)?
#  |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
# Tekken's (Mistral Nemo) is the same without the contractions and with \p{N} for \p{N}{1,3}.
# "Upper" letters are those not a-z (A-Z and every non-ASCII letter), "lower" ones those not A-Z
# (a-z and every non-ASCII letter): a non-ASCII letter is both.

@njit(cache=True)
def _c_letter(cp, fl, end, p):
    if p >= end:
        return False
    c = cp[p]
    if c < 128:
        return (65 <= c <= 90) or (97 <= c <= 122)
    f = np.int64(fl[p])
    return not (f & _WS) and (f & U.CATEGORIES) == _L


@njit(cache=True)
def _c_number(cp, fl, end, p):
    if p >= end:
        return False
    c = cp[p]
    if c < 128:
        return 48 <= c <= 57
    f = np.int64(fl[p])
    return not (f & _WS) and (f & U.CATEGORIES) == _N


@njit(cache=True)
def _c_space(cp, fl, end, p):
    if p >= end:
        return False
    c = cp[p]
    if c < 128:
        return (9 <= c <= 13) or c == 32
    return (np.int64(fl[p]) & _WS) != 0


@njit(cache=True)
def _c_upper(cp, fl, end, p):
    return _c_letter(cp, fl, end, p) and not (97 <= cp[p] <= 122)


@njit(cache=True)
def _c_lower(cp, fl, end, p):
    return _c_letter(cp, fl, end, p) and not (65 <= cp[p] <= 90)


@njit(cache=True)
def _contraction_end(cp, end, p):
    """p past (?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])? at p."""
    if p + 1 >= end or cp[p] != 39:
        return p
    c1 = _lower_ascii(cp[p + 1])
    if c1 == 115 or c1 == 116 or c1 == 109 or c1 == 100:
        return p + 2
    if p + 2 < end:
        c2 = _lower_ascii(cp[p + 2])
        if (c1 == 114 and c2 == 101) or (c1 == 118 and c2 == 101) or (c1 == 108 and c2 == 108):
            return p + 3
    return p


@njit(cache=True)
def _letters_gpt4o(cp, fl, end, s):
    """The end of upper* lower+ (greedy, backtracking as std::regex does) from s, or -1."""
    k = s
    while _c_upper(cp, fl, end, k):
        k += 1
    # upper* gives back letters until lower+ can start: at k itself (a-z), else at the last
    # non-ASCII letter of the run (both upper and lower)
    j = k
    while j >= s and not _c_lower(cp, fl, end, j):
        j -= 1
    if j < s:
        return -1
    while _c_lower(cp, fl, end, j):
        j += 1
    return j


@njit(cache=True)
def _step_gpt4o(cp, fl, ini, end, pos, tekken):
    c = cp[pos]
    prefix = not (c == 13 or c == 10 or _c_letter(cp, fl, end, pos) or _c_number(cp, fl, end, pos))
    s = pos + 1 if prefix else pos
    # [^\r\n\p{L}\p{N}]? upper* lower+ contraction?
    e = _letters_gpt4o(cp, fl, end, s)
    if e >= 0:
        return e if tekken else _contraction_end(cp, end, e)
    # [^\r\n\p{L}\p{N}]? upper+ lower* contraction?  (upper+ here are A-Z only: had the run
    # held a lower letter, the first branch would have matched)
    if _c_upper(cp, fl, end, s):
        e = s
        while _c_upper(cp, fl, end, e):
            e += 1
        while _c_lower(cp, fl, end, e):
            e += 1
        return e if tekken else _contraction_end(cp, end, e)
    # \p{N}{1,3}  (tekken: \p{N})
    if _c_number(cp, fl, end, pos):
        e = pos + 1
        while not tekken and e < pos + 3 and _c_number(cp, fl, end, e):
            e += 1
        return e
    #  ?[^\s\p{L}\p{N}]+[\r\n/]*
    q = pos + 1 if c == 32 else pos
    if q < end and not (_c_space(cp, fl, end, q) or _c_letter(cp, fl, end, q) or _c_number(cp, fl, end, q)):
        e = q + 1
        while e < end and not (_c_space(cp, fl, end, e) or _c_letter(cp, fl, end, e) or _c_number(cp, fl, end, e)):
            e += 1
        while e < end and (cp[e] == 13 or cp[e] == 10 or cp[e] == 47):
            e += 1
        return e
    # the whitespace run from pos
    e = pos
    last_r_or_n = -1
    while _c_space(cp, fl, end, e):
        if cp[e] == 13 or cp[e] == 10:
            last_r_or_n = e + 1
        e += 1
    # \s*[\r\n]+
    if last_r_or_n >= 0:
        return last_r_or_n
    # \s+(?!\S)
    if e < end and e - pos > 1:
        return e - 1
    # \s+
    return e


@njit(cache=True)
def _step(cp, fl, ini, end, pos, kind):
    """End of the piece that starts at `pos` (one iteration of llama.cpp's splitter loop)."""
    if kind == GPT4O or kind == TEKKEN:
        return _step_gpt4o(cp, fl, ini, end, pos, kind == TEKKEN)
    cpt = cp[pos]
    flags = np.int64(fl[pos])

    # 's|'t|'re|'ve|'m|'ll|'d  (case-insensitive but for gpt2)
    if cpt == 39 and pos + 1 < end:
        c1 = cp[pos + 1]
        if kind != GPT2:
            c1 = _lower_ascii(c1)
        if c1 == 115 or c1 == 116 or c1 == 109 or c1 == 100:
            return pos + 2
        if pos + 2 < end:
            c2 = cp[pos + 2]
            if kind != GPT2:
                c2 = _lower_ascii(c2)
            if (c1 == 114 and c2 == 101) or (c1 == 118 and c2 == 101) or (c1 == 108 and c2 == 108):
                return pos + 3

    if kind == GPT2:
        flags2 = _gf(fl, ini, end, pos + 1) if cpt == 32 else flags
        p = pos + (1 if cpt == 32 else 0)
        # <space>?\p{L}+
        if flags2 & _L:
            return _run_end(fl, ini, end, p, _L)
        # <space>?\p{N}+
        if flags2 & _N:
            return _run_end(fl, ini, end, p, _N)
        # <space>?[^\s\p{L}\p{N}]+
        if not (flags2 & (_WS | _L | _N)) and flags2 != 0:
            return _other_end(fl, ini, end, p, _WS | _L | _N)
        n = 0
        while _gf(fl, ini, end, pos + n) & _WS:
            n += 1
        # \s+(?!\S)
        if n > 1 and _gc(cp, ini, end, pos + n) != OUT_OF_RANGE:
            return pos + n - 1
        # \s+
        if n > 0:
            return pos + n
        return pos + 1

    letter = _L | _M if kind == QWEN35 else _L
    # [^\r\n\p{L}\p{N}]?\p{L}+   (qwen35: [\p{L}\p{M}]+)
    if not (cpt == 13 or cpt == 10 or (flags & _N)):
        if (flags & letter) or (_gf(fl, ini, end, pos + 1) & letter):
            return _run_end(fl, ini, end, pos + 1, letter)
    # \p{N}{1,3}  (qwen2, qwen35: \p{N})
    if flags & _N:
        if kind == LLAMA3:
            p = pos
            while (_gf(fl, ini, end, p) & _N) and p - pos < 3:
                p += 1
            return p
        return pos + 1
    # <space>?[^\s\p{L}\p{N}]+[\r\n]*
    mask = _WS | letter | _N
    flags2 = _gf(fl, ini, end, pos + 1) if cpt == 32 else flags
    if not (flags2 & mask) and flags != 0:
        p = _other_end(fl, ini, end, pos + (1 if cpt == 32 else 0), mask)
        c2 = _gc(cp, ini, end, p)
        while c2 == 13 or c2 == 10:
            p += 1
            c2 = _gc(cp, ini, end, p)
        return p
    n = 0
    last_r_or_n = 0
    while _gf(fl, ini, end, pos + n) & _WS:
        c2 = _gc(cp, ini, end, pos + n)
        if c2 == 13 or c2 == 10:
            last_r_or_n = pos + n + 1
        n += 1
    # \s*[\r\n]+
    if last_r_or_n > 0:
        return last_r_or_n
    # \s+(?!\S)
    if n > 1 and _gc(cp, ini, end, pos + n) != OUT_OF_RANGE:
        return pos + n - 1
    # \s+
    if n > 0:
        return pos + n
    return pos + 1


@njit(cache=True, inline="always")
def _pieces(cp, fl, lengths, kind, step):
    """Cut each piece [ini, end) of `lengths` where step(cp, fl, ini, end, pos, kind), the end of
    the piece starting at pos, says; the new lengths."""
    out = np.empty(cp.shape[0] + 1, dtype=np.int64)
    n_out = 0
    start = 0
    for k in range(lengths.shape[0]):
        ini = start
        end = start + lengths[k]
        start = end
        pos = ini
        while pos < end:
            nxt = step(cp, fl, ini, end, pos, kind)
            out[n_out] = nxt - pos
            n_out += 1
            pos = nxt
    return out[:n_out]


@njit(cache=True)
def split_custom(cp, fl, lengths, kind):
    return _pieces(cp, fl, lengths, kind, _step)


@njit(cache=True)
def _in_class(c, f, kind):
    if kind == NUMBER_EACH or kind == NUMBER_RUN:
        # collapsed [\xD1\x30-\x39]
        if c < 128:
            return 48 <= c <= 57
        return not (f & _WS) and (f & 0xFF) == _N
    if kind == PUNCT_RUN or kind == PUNCT_RUN_BACKTICK:
        # collapsed [\p{P}\$\+<=>\^~\|] (falcon adds `): !-#%-*,-/:-;?-@[-]_{} and $+<=>^~|
        if c < 128:
            return ((33 <= c <= 35) or (37 <= c <= 42) or (44 <= c <= 47) or c == 58 or c == 59
                    or c == 63 or c == 64 or (91 <= c <= 93) or c == 95 or c == 123 or c == 125
                    or c == 36 or c == 43 or (60 <= c <= 62) or c == 94 or c == 126 or c == 124
                    or (c == 96 and kind == PUNCT_RUN_BACKTICK))
        return not (f & _WS) and (f & 0xFF) == _P
    if kind == NEWLINE_RUN:
        return c == 10
    # BLOOM_WORD: [^(\s|.,!?…。，、।۔،)] with std::wregex's \s (ASCII; other whitespace was
    # replaced by \v)
    if (9 <= c <= 13) or c == 32 or (c >= 128 and (f & _WS)):
        return False
    return not (c == 40 or c == 41 or c == 124 or c == 46 or c == 44 or c == 33 or c == 63
                or c == 0x2026 or c == 0x3002 or c == 0xFF0C or c == 0x3001 or c == 0x0964
                or c == 0x06D4 or c == 0x060C)


@njit(cache=True)
def _match_end(cp, fl, end, pos, kind):
    """The end of the class regex's match starting at pos, or -1 if none starts there."""
    m_end = -1
    if kind == DIGITS3:
        if (pos + 2 < end and 48 <= cp[pos] <= 57 and 48 <= cp[pos + 1] <= 57
                and 48 <= cp[pos + 2] <= 57):
            m_end = pos + 3
    elif kind == NEWLINE_RUN:
        # [^\n]+|[\n]+: every run is a match
        q = pos + 1
        while q < end and (cp[q] == 10) == (cp[pos] == 10):
            q += 1
        m_end = q
    elif kind == BLOOM_WORD:
        #  ?[^(\s|.,!?…。，、।۔،)]+
        q = -1
        if cp[pos] == 32 and pos + 1 < end and _in_class(cp[pos + 1], fl[pos + 1], kind):
            q = pos + 1
        elif _in_class(cp[pos], fl[pos], kind):
            q = pos
        if q >= 0:
            q += 1
            while q < end and _in_class(cp[q], fl[q], kind):
                q += 1
            m_end = q
    elif _in_class(cp[pos], fl[pos], kind):
        q = pos + 1
        if kind != NUMBER_EACH:
            while q < end and _in_class(cp[q], fl[q], kind):
                q += 1
        m_end = q
    return m_end


@njit(cache=True)
def _class_step(cp, fl, ini, end, pos, kind):
    """A match starting at pos, else the unmatched stretch up to the next match."""
    m_end = _match_end(cp, fl, end, pos, kind)
    if m_end >= 0:
        return m_end
    q = pos + 1
    while q < end and _match_end(cp, fl, end, q, kind) < 0:
        q += 1
    return q


@njit(cache=True)
def split_class(cp, fl, lengths, kind):
    """Pieces for a std::regex made of one character class: every match, and the text between."""
    return _pieces(cp, fl, lengths, kind, _class_step)


# the splitter steps of each llama.cpp pre-tokenizer type (llm_tokenizer_bpe's regex_exprs)
_C = "custom"
_K = "class"
PRE_TYPE_STEPS: dict[str, tuple[tuple[str, int], ...]] = {
    "default": ((_K, PUNCT_RUN), (_C, GPT2), (_K, NUMBER_RUN), (_K, DIGITS3)),
    "falcon": ((_K, PUNCT_RUN_BACKTICK), (_C, GPT2), (_K, DIGITS3)),
    "gpt2": ((_C, GPT2),),
    "starcoder": ((_K, NUMBER_EACH), (_C, GPT2)),
    "llama3": ((_C, LLAMA3),),
    "qwen2": ((_C, QWEN2),),
    "qwen35": ((_C, QWEN35),),
    "gpt4o": ((_C, GPT4O),),
    "tekken": ((_C, TEKKEN),),
    "laguna": ((_K, NEWLINE_RUN), (_C, QWEN2)),
    "bloom": ((_K, BLOOM_WORD),),
    "viking": ((_K, BLOOM_WORD), (_K, NUMBER_EACH)),
}


def split(cp: np.ndarray, fl: np.ndarray, steps) -> np.ndarray:
    """The lengths (in code points) of the pieces of a text, its code points `cp` (int64) and
    their flags `fl`, after the splitter `steps`."""
    lengths = np.array([cp.shape[0]], dtype=np.int64)
    if cp.shape[0] == 0:
        return lengths[:0]
    for how, kind in steps:
        lengths = (split_custom if how == _C else split_class)(cp, fl, lengths, kind)
    return lengths
