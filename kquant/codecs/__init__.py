"""The codecs of the ggml types kquant encodes and decodes, by `gguf.GGMLQuantizationType`.

Each codec turns float32 rows (nrows, n_per_row) into the bytes of ggml's blocks and back.
The Numba kernels live in one module per family; a codec here only allocates and dispatches.
Which codec class and module serve a type is its record's business (kquant.types).
"""
from __future__ import annotations

import importlib
from types import ModuleType

import numba
import numpy as np
from gguf import GGMLQuantizationType

from ..types import TYPES, QuantType, find_type
from . import floats, iq4, legacy
from .threads import for_row_slices

_NO_WEIGHTS = np.zeros(0, np.float32)


class vectorizing:
    """Compile with LLVM's SLP vectorizer, which Numba leaves off by default.

    The scale searches (search.py) keep one trial per SIMD lane in fully unrolled loops that
    only SLP turns into AVX2 code (about 10x on those loops). Kernels compile lazily on their
    first call, so every kernel call goes through here; cached kernels are unaffected.
    SLP never reorders floating-point sums without fast-math, so results are unchanged.
    (A class rather than a contextlib generator: a token's decode step enters it ~400 times.)
    """

    __slots__ = ("before",)

    def __enter__(self) -> None:
        self.before = numba.config.SLP_VECTORIZE
        numba.config.SLP_VECTORIZE = 1

    def __exit__(self, *exc) -> bool:
        numba.config.SLP_VECTORIZE = self.before
        return False


class Codec:
    """One ggml type: its block geometry and row-wise quantize/dequantize."""

    def __init__(self, record: QuantType):
        self.qtype = record.qtype
        self.name = record.name
        self.block_size, self.type_size = record.block_size, record.type_size
        #: whether an importance matrix changes the result (ggml ignores it for some types)
        self.uses_imatrix = record.uses_imatrix
        #: whether the type is quantized only with one (ggml_quantize_requires_imatrix)
        self.requires_imatrix = record.qtype in (GGMLQuantizationType.IQ2_XXS,
                                                 GGMLQuantizationType.IQ2_XS,
                                                 GGMLQuantizationType.IQ1_S)

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.type_size

    #: why a row can fail, for the codecs whose grid search finds no point where ggml aborts
    #: (their kernels set failed[r]); None: every finite or infinite row quantizes
    failure: str | None = None

    def prepare(self) -> None:
        """Build what the kernels read (lattice tables) once, before the threads start."""

    def quantize_rows(self, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        if imatrix is None and self.requires_imatrix:  # ggml asserts quant_weights
            raise ValueError(f"{self.name} needs an importance matrix (ggml quantizes it only "
                             f"with quant_weights): pass imatrix=")
        out = np.empty((x.shape[0], self.row_bytes(x.shape[1])), np.uint8)
        failed = np.zeros(x.shape[0], np.int64)
        self.prepare()
        with vectorizing():
            for_row_slices(len(x), lambda a, b: self._quantize(x[a:b], imatrix, out[a:b], failed[a:b]))
        if failed.any():
            raise ValueError(f"{self.name}: row {int(np.argmax(failed))} cannot be quantized "
                             f"({self.failure})")
        return out

    def dequantize_rows(self, q: np.ndarray, n_per_row: int) -> np.ndarray:
        out = np.empty((q.shape[0], n_per_row), np.float32)
        self.prepare()
        with vectorizing():
            for_row_slices(len(q), lambda a, b: self._dequantize(q[a:b], out[a:b]))
        return out

    def kernels(self, dequantize: bool = False, imatrix: bool = True) -> list:
        """The Numba dispatchers quantize_rows (with or without an imatrix) or dequantize_rows
        calls: what kquant.codecs.warm checks against Numba's cache."""
        return []

    def __repr__(self) -> str:
        return f"<Codec {self.name}: {self.block_size} values in {self.type_size} bytes>"


class BlockCodec(Codec):
    """K-quants: the record's module, with quantize_rows(x, qw, use_qw, out) and
    dequantize_rows(q, out)."""

    def __init__(self, record: QuantType):
        super().__init__(record)
        self.module: ModuleType = importlib.import_module(f".{record.codec_module}", __package__)
        self._ready_kernels: set = set()  # row kernels compiled or cached (see _row_kernel)

    def kernels(self, dequantize=False, imatrix=True):
        if dequantize:
            return [self.module.dequantize_rows]
        kernel, _ = self._row_kernel(imatrix, quick=True)
        return [kernel]

    def _row_kernel(self, use_qw: bool, quick: bool):
        """The module's row kernel for these rows, and whether it takes (qw, use_qw): both
        fits, or the reference fit alone for rows without an imatrix (it compiles in half the
        time) until the both-fits kernel is compiled or cached (which then serves them at no
        cost); quick (no literal fallback, search.py) where the module has such kernels."""
        m = self.module
        tail = "_quick" if quick and hasattr(m, "quantize_rows_quick") else ""
        both = getattr(m, "quantize_rows" + tail)
        ref = getattr(m, "quantize_rows_ref" + tail, None)
        if use_qw or ref is None or self._ready(both):
            return both, True
        return ref, False

    def _ready(self, kernel) -> bool:
        if kernel not in self._ready_kernels:
            from .warm import is_cached
            if not (kernel.signatures or is_cached(kernel)):
                return False
            self._ready_kernels.add(kernel)
        return True

    def _quantize(self, x, imatrix, out, failed):
        use_qw = imatrix is not None and self.uses_imatrix
        qw = imatrix if use_qw else _NO_WEIGHTS
        fell_back = np.zeros(1, np.int64)
        kernel, takes_weights = self._row_kernel(use_qw, quick=True)
        quick = kernel.py_func.__name__.endswith("_quick")
        args = (x, qw, use_qw, out) if takes_weights else (x, out)
        kernel(*args, fell_back) if quick else kernel(*args)
        if fell_back[0]:  # an inf, NaN or overflowing row: again, with the searches' literal ports
            kernel, takes_weights = self._row_kernel(use_qw, quick=False)
            kernel(*((x, qw, use_qw, out) if takes_weights else (x, out)))

    def _dequantize(self, q, out):
        self.module.dequantize_rows(q, out)


class LegacyCodec(Codec):
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: the family's kernels, a quantizer per type and a
    dequantizer selected by `kind` (legacy's constant named after the type)."""

    def __init__(self, record: QuantType):
        super().__init__(record)
        self.kind = getattr(legacy, record.name)

    def kernels(self, dequantize=False, imatrix=True):
        if not dequantize:
            return [legacy.QUANTIZE_ROWS[self.kind]]
        return [legacy.dequantize_q8_0_rows if self.kind == legacy.Q8_0 else legacy.dequantize_rows]

    def _quantize(self, x, imatrix, out, failed):
        use_qw = imatrix is not None and self.uses_imatrix
        legacy.QUANTIZE_ROWS[self.kind](x, imatrix if use_qw else _NO_WEIGHTS, use_qw, out)

    def _dequantize(self, q, out):
        if self.kind == legacy.Q8_0:
            legacy.dequantize_q8_0_rows(q, out)
        else:
            legacy.dequantize_rows(self.kind, q, out)


class IQ4Codec(Codec):
    """IQ4_NL (32-value blocks) and IQ4_XS (256-value super-blocks): kquant/codecs/iq4.py."""

    def __init__(self, record: QuantType):
        super().__init__(record)
        suffix = "nl" if record.qtype == GGMLQuantizationType.IQ4_NL else "xs"
        self._quantize_rows = getattr(iq4, f"quantize_{suffix}_rows")
        self._dequantize_rows = getattr(iq4, f"dequantize_{suffix}_rows")

    def kernels(self, dequantize=False, imatrix=True):
        return [self._dequantize_rows if dequantize else self._quantize_rows]

    def _quantize(self, x, imatrix, out, failed):
        use_qw = imatrix is not None and self.uses_imatrix
        self._quantize_rows(x, imatrix if use_qw else _NO_WEIGHTS, use_qw, out)

    def _dequantize(self, q, out):
        self._dequantize_rows(q, out)


class IQ3Codec(Codec):
    """IQ3_XXS and IQ3_S (256-value super-blocks, 3-bit grids): kquant/codecs/iq3.py, imported
    (and its lattice tables built) on first use."""

    failure = "inf/NaN values or an overflowing x^2: ggml's IQ3 search finds no grid point and aborts"

    def __init__(self, record: QuantType):
        super().__init__(record)
        self.suffix = "xxs" if record.qtype == GGMLQuantizationType.IQ3_XXS else "s"

    def kernels(self, dequantize=False, imatrix=True):
        from . import iq3
        return [getattr(iq3, f"{'dequantize' if dequantize else 'quantize'}_{self.suffix}_rows")]

    def _quantize(self, x, imatrix, out, failed):
        from . import iq3
        quantize_rows = getattr(iq3, f"quantize_{self.suffix}_rows")
        quantize_rows(x, _NO_WEIGHTS if imatrix is None else imatrix, imatrix is not None, out, failed)

    def _dequantize(self, q, out):
        from . import iq3
        getattr(iq3, f"dequantize_{self.suffix}_rows")(q, out)


class IQ1Codec(Codec):
    """IQ1_S and IQ1_M (256-value super-blocks, a ternary grid of 8-value points):
    kquant/codecs/iq1.py, imported and its tables built on first use."""

    failure = "inf values or overflowing weights: ggml's IQ1 search finds no grid point and aborts"

    def __init__(self, record: QuantType):
        super().__init__(record)
        self.small = self.requires_imatrix = record.qtype == GGMLQuantizationType.IQ1_S

    def kernels(self, dequantize=False, imatrix=True):
        from . import iq1, lattice
        kind = "s" if self.small else "m"
        return [getattr(iq1, f"{'dequantize' if dequantize else 'quantize'}_{kind}_rows"),
                lattice._neighbour_lists]

    def prepare(self):
        from . import iq1
        iq1.tables()

    def _quantize(self, x, imatrix, out, failed):
        from . import iq1
        qw = _NO_WEIGHTS if imatrix is None else imatrix
        if self.small:
            iq1.quantize_s_rows(x, qw, out, failed, *iq1.tables())
        else:
            iq1.quantize_m_rows(x, qw, imatrix is not None, out, failed, *iq1.tables())

    def _dequantize(self, q, out):
        from . import iq1
        deq = iq1.dequantize_s_rows if self.small else iq1.dequantize_m_rows
        deq(q, out, iq1.grid_values())


class IQ2Codec(Codec):
    """IQ2_XXS, IQ2_XS and IQ2_S (256-value super-blocks, 2-bit grids of 8 values):
    kquant/codecs/iq2.py, imported and its tables built on first use."""

    failure = "inf/NaN values or an overflowing x^2: ggml's IQ2 search finds no grid point and aborts"

    def __init__(self, record: QuantType):
        super().__init__(record)
        self.kind = {GGMLQuantizationType.IQ2_XXS: "xxs", GGMLQuantizationType.IQ2_XS: "xs",
                     GGMLQuantizationType.IQ2_S: "s"}[record.qtype]

    def kernels(self, dequantize=False, imatrix=True):
        from . import iq2, lattice
        kind = "xxs" if self.kind == "xxs" else "x16"
        return [getattr(iq2, f"{'dequantize' if dequantize else 'quantize'}_{kind}_rows"),
                lattice._neighbour_lists]

    def prepare(self):
        from . import iq2
        iq2.tables(self.kind)

    def _quantize(self, x, imatrix, out, failed):
        from . import iq2
        qw = _NO_WEIGHTS if imatrix is None else imatrix
        t = iq2.tables(self.kind)
        if self.kind == "xxs":
            iq2.quantize_xxs_rows(x, qw, out, failed, *t)
        else:
            iq2.quantize_x16_rows(x, qw, imatrix is not None, self.kind == "s", out, failed, *t)

    def _dequantize(self, q, out):
        from . import iq2
        if self.kind == "xxs":
            iq2.dequantize_xxs_rows(q, out, iq2.DGRIDS["xxs"])
        else:
            iq2.dequantize_x16_rows(q, out, self.kind == "s", iq2.DGRIDS[self.kind])


class HalfCodec(Codec):
    """F16 and BF16: 2-byte floats rounded to nearest even (floats' constant of that name)."""

    def __init__(self, record: QuantType):
        super().__init__(record)
        self.kind = getattr(floats, record.name)

    def kernels(self, dequantize=False, imatrix=True):
        return [floats.dequantize_rows if dequantize else floats.quantize_rows]

    def _quantize(self, x, imatrix, out, failed):
        floats.quantize_rows(self.kind, x, out.view(np.uint16))

    def _dequantize(self, q, out):
        floats.dequantize_rows(self.kind, q.view(np.uint16), out)


class F32Codec(Codec):
    def _quantize(self, x, imatrix, out, failed):
        out.view(np.float32)[...] = x

    def _dequantize(self, q, out):
        out[...] = q.view(np.float32)


#: a view of kquant.types: the codec of every registered type that names one
CODECS: dict[GGMLQuantizationType, Codec] = {
    r.qtype: globals()[r.codec_class](r) for r in TYPES.values() if r.codec_class is not None}


def get_codec(qtype: GGMLQuantizationType | str | int) -> Codec:
    """The codec of a type given as a GGMLQuantizationType, its name ("q4_k") or its id."""
    record = find_type(qtype)
    if record is None or record.qtype not in CODECS:
        known = ", ".join(c.name for c in CODECS.values())
        raise ValueError(f"unsupported ggml type {qtype!r}; kquant handles {known}")
    return CODECS[record.qtype]
