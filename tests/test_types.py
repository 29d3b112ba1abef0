"""kquant.types, the one record per ggml type, and the per-type tables that are views of it."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

import kquant
from kquant.matmul import cpu
from kquant.matmul.activations import block_geometry
from kquant.matmul.cuda_blocks import FAMILIES
from kquant.types import TYPES, find_type, get_type

NAMES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
         "Q8_1", "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S",
         "IQ1_M", "F16", "BF16", "F32"]


def test_one_record_per_type_with_gguf_geometry():
    assert sorted(r.name for r in TYPES.values()) == sorted(NAMES)
    for r in TYPES.values():
        if r.qtype == T.Q8_1:   # ggml's block_q8_1 has fp16 d and s; gguf-py's table float32
            assert (r.block_size, r.type_size) == (32, 36) != GGML_QUANT_SIZES[T.Q8_1]
        else:
            assert (r.block_size, r.type_size) == GGML_QUANT_SIZES[r.qtype], r.name
        assert block_geometry(r.qtype) == (r.block_size, r.type_size)


@pytest.mark.parametrize("spelling", [T.Q5_1, "Q5_1", "q5_1", " q5_1 ", int(T.Q5_1),
                                      np.int64(T.Q5_1)])
def test_names_any_case_numbers_and_the_enum(spelling):
    assert get_type(spelling) is TYPES[T.Q5_1]
    assert kquant.get_codec(spelling).qtype == T.Q5_1
    assert cpu.qtype_of(spelling) == T.Q5_1


@pytest.mark.parametrize("bad", ["Q4_K_M", "TQ2_0", 99, 3.5, None])
def test_unknown_types(bad):
    assert find_type(bad) is None
    with pytest.raises(ValueError, match="unsupported ggml type"):
        get_type(bad)


def test_codecs_are_a_view():
    assert {t: c.name for t, c in kquant.CODECS.items()} == {
        r.qtype: r.name for r in TYPES.values() if r.codec_class is not None}
    for t, c in kquant.CODECS.items():
        r = TYPES[t]
        assert (c.block_size, c.type_size, c.uses_imatrix) == (r.block_size, r.type_size,
                                                               r.uses_imatrix)
        assert r.codec is c
    assert TYPES[T.Q8_1].codec is None   # an activation type only: no file codec
    with pytest.raises(ValueError, match="unsupported ggml type"):
        kquant.get_codec("Q8_1")


def test_matmul_tables_are_views():
    weights = [r for r in TYPES.values() if r.vec_dot is not None]
    assert cpu.WEIGHT_TYPES == tuple(r.qtype for r in weights)
    for r in weights:
        assert cpu.VEC_DOT_TYPE[r.qtype] == r.vec_dot == cpu.vec_dot_type(r.name)
        assert cpu.BLAS_MIN_TOKENS[r.qtype] == r.blas_min_tokens
        assert cpu.kernel(r.qtype) is r.matmul_kernel
    for t in (T.Q8_K, T.Q8_1):
        with pytest.raises(ValueError, match="unsupported weight type"):
            cpu.qtype_of(t)


def test_cuda_families_are_a_view():
    assert list(FAMILIES) == [r.name for r in TYPES.values() if r.cuda_family is not None]
    for name, fam in FAMILIES.items():
        r = get_type(name)
        assert fam.name == name and fam.block_bytes == r.type_size
        assert fam.qk == (r.block_size if r.block_size > 1 else 128)
        assert fam.tail == (r.block_size == 1)
