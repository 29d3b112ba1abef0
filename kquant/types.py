"""The ggml types kquant handles: one record per type, registered under its GGMLQuantizationType
(in the spirit of gguf-py's quants.py).

A record says everything kquant's per-type code needs to know about a type: its block geometry,
which codec (kquant.codecs) encodes it, which activation type ggml's CPU dot product pairs it
with (type_traits_cpu's vec_dot_type), which CPU block kernel (kquant.matmul) and CUDA family
(kquant.matmul.cuda_blocks) multiply it, and from how many tokens kquant.matmul.dot takes the
dequantize + BLAS path. The per-type tables of the other modules (kquant.codecs.CODECS,
kquant.matmul.cpu's VEC_DOT_TYPE / WEIGHT_TYPES / BLAS_MIN_TOKENS, cuda_blocks.FAMILIES, ...)
are views of these records, so a new type is its codec module plus one `register(...)` here.

Kernels and codecs are named, not imported: this module imports nothing of kquant, so every
layer can read it, and `import kquant` compiles nothing. The names resolve on first use.

    from kquant.types import get_type
    get_type("q4_k").type_size       # 144; also get_type(12), get_type(GGMLQuantizationType.Q4_K)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

from gguf import GGMLQuantizationType

T = GGMLQuantizationType
QType = GGMLQuantizationType | str | int


@dataclass(frozen=True, eq=False)
class QuantType:
    """One ggml type as kquant handles it."""

    qtype: GGMLQuantizationType
    block_size: int                  # values per block (1 for the float types)
    type_size: int                   # bytes per block
    #: the kquant.codecs class that drives its kernels ("BlockCodec", "LegacyCodec",
    #: "IQ4Codec", "IQ3Codec", "IQ2Codec", "IQ1Codec", "HalfCodec", "F32Codec"), and the module
    #: of kquant.codecs holding them; None: no codec (an activation-only type)
    codec_class: str | None = None
    codec_module: str | None = None
    uses_imatrix: bool = False       # whether an importance matrix changes the result
    vec_dot: GGMLQuantizationType | None = None  # activation type; None: not a matmul weight
    cpu_kernel: str | None = None    # "module.function" under kquant.matmul
    blas_min_tokens: int | None = None  # kquant.matmul.dot's crossover (see matmul/cpu.py)
    #: how kquant.matmul.cuda_blocks slices its blocks across lanes ("2bit", "4bit", "legacy",
    #: "q8_0", "iq4_nl", "iq4_xs", "iq3_xxs", "iq3_s", "f32", "half"; the decoder is
    #: cuda_blocks.deq_<name>); None: no CUDA kernel
    cuda_family: str | None = None

    @property
    def name(self) -> str:
        return self.qtype.name

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.type_size

    @cached_property
    def codec(self) -> Any:
        """Its kquant.codecs.Codec (quantize/dequantize rows), or None."""
        from .codecs import CODECS
        return CODECS.get(self.qtype)

    @cached_property
    def matmul_kernel(self) -> Callable | None:
        """Its CPU block kernel (a Numba function of kquant.matmul), or None."""
        return _resolve("kquant.matmul", self.cpu_kernel)

    def __repr__(self) -> str:
        return f"<QuantType {self.name}: {self.block_size} values in {self.type_size} bytes>"


def _resolve(package: str, dotted: str | None) -> Any:
    if dotted is None:
        return None
    module, attr = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(f"{package}.{module}"), attr)


#: every record, by type id, in registration order
TYPES: dict[GGMLQuantizationType, QuantType] = {}


def register(record: QuantType) -> QuantType:
    if record.qtype in TYPES:
        raise ValueError(f"{record.name} is registered twice")
    TYPES[record.qtype] = record
    return record


def find_type(qtype: Any) -> QuantType | None:
    """The record of a type given as a GGMLQuantizationType, its name in any case ("q4_k") or
    its number (12), or None when kquant does not know it."""
    try:
        t = T[qtype.strip().upper()] if isinstance(qtype, str) else T(qtype)
    except (KeyError, ValueError, TypeError):
        return None
    return TYPES.get(t)


def get_type(qtype: QType) -> QuantType:
    """find_type's record; ValueError naming the known types if there is none."""
    record = find_type(qtype)
    if record is None:
        known = ", ".join(names_with("codec_class"))
        raise ValueError(f"unsupported ggml type {qtype!r}; kquant handles {known}")
    return record


def names_with(field: str) -> list[str]:
    """Names of the registered types whose `field` is set, in registration order."""
    return [r.name for r in TYPES.values() if getattr(r, field) is not None]


def weight_types() -> tuple[GGMLQuantizationType, ...]:
    """The types kquant.matmul multiplies (those with an activation type)."""
    return tuple(r.qtype for r in TYPES.values() if r.vec_dot is not None)


# --- the records -----------------------------------------------------------------------------
# The K-quants', the 32-value types' and the i-quants' byte layouts are drawn in their codec
# modules (kquant/codecs/q*_k.py, legacy.py, iq4.py, iq3.py, iq2.py, iq1.py); the others
# are drawn here.


def _kquant(qtype: T, type_size: int, blas_min_tokens: int, cuda_family: str) -> QuantType:
    """Q2_K..Q6_K: 256-value super-blocks (kquant/codecs/<name>.py), Q8_K activations."""
    name = qtype.name.lower()
    return register(QuantType(qtype, 256, type_size, "BlockCodec", name, True, T.Q8_K,
                              f"kquants.mm_{name}", blas_min_tokens, cuda_family))


def _legacy(qtype: T, type_size: int, vec_dot: T, blas_min_tokens: int) -> QuantType:
    """Q4_0..Q8_0: 32-value blocks (kquant/codecs/legacy.py). Q8_0: ggml ignores an imatrix,
    and its CUDA lanes read plain bytes (cuda_blocks' "q8_0" slicing)."""
    return register(QuantType(qtype, 32, type_size, "LegacyCodec", "legacy", qtype != T.Q8_0,
                              vec_dot, f"legacy.mm_{qtype.name.lower()}", blas_min_tokens,
                              "q8_0" if qtype == T.Q8_0 else "legacy"))


def _float(qtype: T, type_size: int, codec_class: str, blas_min_tokens: int) -> QuantType:
    """F32/F16/BF16: one value a block, their own activation type; the CUDA kernels cut rows
    into virtual 128-value blocks (cuda_blocks.py)."""
    codec_module = "floats" if codec_class == "HalfCodec" else None
    return register(QuantType(qtype, 1, type_size, codec_class, codec_module, False, qtype,
                              f"floats.mm_{qtype.name.lower()}", blas_min_tokens,
                              "f32" if qtype == T.F32 else "half"))


Q2_K = _kquant(T.Q2_K, 84, 128, "2bit")
Q3_K = _kquant(T.Q3_K, 110, 128, "2bit")
Q4_K = _kquant(T.Q4_K, 144, 128, "4bit")
Q5_K = _kquant(T.Q5_K, 176, 128, "4bit")
Q6_K = _kquant(T.Q6_K, 210, 256, "2bit")

# block_q8_K (292 bytes), an activation format llama.cpp never stores (kquant/codecs/q8_k.py):
#   0      4                                260                 292
#   | d f32 | qs: 256 x int8                 | bsums: 16 x int16 |   bsums[i] = sum of qs[16i..]
Q8_K = register(QuantType(T.Q8_K, 256, 292, "BlockCodec", "q8_k"))

Q4_0 = _legacy(T.Q4_0, 18, T.Q8_0, 128)
Q4_1 = _legacy(T.Q4_1, 20, T.Q8_1, 64)
Q5_0 = _legacy(T.Q5_0, 22, T.Q8_0, 64)
Q5_1 = _legacy(T.Q5_1, 24, T.Q8_1, 64)
Q8_0 = _legacy(T.Q8_0, 34, T.Q8_0, 64)

# block_q8_1 (36 bytes), the activations of Q4_1/Q5_1 products (kquant.matmul.activations).
# gguf-py's GGML_QUANT_SIZES still has its old 40-byte form (float32 d and s):
#   0       2       4                        36
#   | d f16 | s f16 | qs: 32 x int8          |   s = fp16(d * sum(qs)), d before fp16 rounding
Q8_1 = register(QuantType(T.Q8_1, 32, 36))

# IQ4_NL (32 values, 18 bytes) and IQ4_XS (256 values, 136 bytes): 4-bit indices into ggml's
# non-linear table (layouts drawn in kquant/codecs/iq4.py). Multiplied like the type of their
# block size (IQ4_NL against Q8_0, IQ4_XS against Q8_K: kquant/matmul/iq4.py; their BLAS
# crossovers those of Q4_0 / Q4_K); the model pipeline does not write them yet.
IQ4_NL = register(QuantType(T.IQ4_NL, 32, 18, "IQ4Codec", "iq4", True, T.Q8_0, "iq4.mm_iq4_nl",
                            128, "iq4_nl"))
IQ4_XS = register(QuantType(T.IQ4_XS, 256, 136, "IQ4Codec", "iq4", True, T.Q8_K,
                            "iq4.mm_iq4_xs", 128, "iq4_xs"))

# IQ3_XXS (256 values, 98 bytes) and IQ3_S (256 values, 110 bytes): groups of 4 values as
# points of a 3-bit grid, with signs (layouts drawn in kquant/codecs/iq3.py). Multiplied
# against Q8_K like the K-quants (kquant/matmul/iq3.py; the BLAS crossover of Q3_K, their
# size); their CUDA decoders give each of 16 lanes 16 consecutive values (cuda_blocks.py).
IQ3_XXS = register(QuantType(T.IQ3_XXS, 256, 98, "IQ3Codec", "iq3", True, T.Q8_K,
                             "iq3.mm_iq3_xxs", 128, "iq3_xxs"))
IQ3_S = register(QuantType(T.IQ3_S, 256, 110, "IQ3Codec", "iq3", True, T.Q8_K,
                           "iq3.mm_iq3_s", 128, "iq3_s"))

# IQ2_XXS (256 values, 66 bytes), IQ2_XS (74) and IQ2_S (82): groups of 8 values as points of
# a 2-bit grid, with signs (layouts drawn in kquant/codecs/iq2.py); IQ2_XXS / IQ2_XS need an
# imatrix (as in ggml). IQ1_S (50 bytes) and IQ1_M (56): groups of 8 values as points of a
# ternary grid, shifted by +-1/8 (kquant/codecs/iq1.py); IQ1_S needs an imatrix. All five are
# multiplied against Q8_K (kquant/matmul/iq2.py, iq1.py; the K-quants' BLAS crossover), their
# CUDA decoders the "grid" slicing of kquant.matmul.cuda_blocks.
IQ2_XXS = register(QuantType(T.IQ2_XXS, 256, 66, "IQ2Codec", "iq2", True, T.Q8_K,
                             "iq2.mm_iq2_xxs", 128, "grid"))
IQ2_XS = register(QuantType(T.IQ2_XS, 256, 74, "IQ2Codec", "iq2", True, T.Q8_K,
                            "iq2.mm_iq2_xs", 128, "grid"))
IQ2_S = register(QuantType(T.IQ2_S, 256, 82, "IQ2Codec", "iq2", True, T.Q8_K,
                           "iq2.mm_iq2_s", 128, "grid"))
IQ1_S = register(QuantType(T.IQ1_S, 256, 50, "IQ1Codec", "iq1", True, T.Q8_K,
                           "iq1.mm_iq1_s", 128, "grid"))
IQ1_M = register(QuantType(T.IQ1_M, 256, 56, "IQ1Codec", "iq1", True, T.Q8_K,
                           "iq1.mm_iq1_m", 128, "grid"))

# F16 / BF16: | 2 bytes | a value (IEEE half / the upper half of a float32); F32: | 4 bytes |
F16 = _float(T.F16, 2, "HalfCodec", 128)
BF16 = _float(T.BF16, 2, "HalfCodec", 64)
F32 = _float(T.F32, 4, "F32Codec", 2)
