"""kquant.quantization.mixes against llama.cpp's own type-selection snapshots, plus unit tests of its rules.

The snapshots (tests/data/snapshots/*.schema, copied from llama.cpp's tests/snapshots, MIT) are
what llama.cpp's tests/test-quant-type-selection.cpp compares against.  That test downloads the
GGUF *headers* of the real models from Hugging Face, keeps the tensors that
``llama_quant_tensor_allows_quantization`` accepts, sorts them like the model loader, and for
every ``[FTYPE] default_type`` section checks each tensor's type: the one listed in the section,
else the section's default type; every listed tensor must exist.  Sections cover all ftypes
llama.cpp knows (K-quants, legacy, IQ, TQ, MXFP4_MOE, F16, BF16, F32).

Without network access, the tensor lists are rebuilt here from each architecture's tensor layout
(gguf's MODEL_TENSORS / TENSOR_NAMES, every name checked to belong to the arch) and the models'
published configurations (hidden size, heads, head dim, FFN size, vocab, layers; the schema header
gives most of them and ``_check_header`` checks they agree).  The ModelInfo is what the C++ test
passes to llama_quant_model_from_metadata: arch, n_layer, n_head, n_head_kv, n_expert.

The snapshots also check the rebuilt lists: in a MXFP4_MOE section every quantizable tensor that
is not 3-D is listed (as q8_0), so for dense models the set of names must match exactly, and for
MoE models all but the stacked experts; row lengths that are not multiples of 256 show up as
fallback types (gpt-oss 2880, Nemotron 2688/1856/3712, GLM 10944/1408, DeepSeek attn_k_b 128),
so those must be right too.  Sizes that no rule looks at (ne[1], most head counts) are taken
from the configurations but not checked by anything.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F
from gguf import MODEL_ARCH as A
from gguf import MODEL_TENSOR as MT

from kquant.quantization import mixes
from kquant.quantization.mixes import FTYPES, ModelInfo, TensorInfo, choose_types, parse_ftype

SNAPSHOT_DIR = Path(__file__).parent / "data" / "snapshots"

# ---------------------------------------------------------------------------------------------
# snapshot files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    ftype_name: str
    default: T
    listed: dict[str, T]


def _ggml_type(name: str) -> T:
    return T[name.upper()]


@functools.lru_cache(maxsize=None)
def read_snapshot(name: str) -> tuple[dict[str, int], tuple[Section, ...]]:
    """The header hyper-parameters and the sections of a .schema file (parse_snapshot_file)."""
    header: dict[str, int] = {}
    sections: list[Section] = []
    for line in (SNAPSHOT_DIR / f"{name}.schema").read_text().splitlines():
        if line.startswith("# n_embd="):
            header = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            ftype_name, default = re.fullmatch(r"\[(\w+)\]\s*(\S+)", line).groups()
            sections.append(Section(ftype_name, _ggml_type(default), {}))
        else:
            tensor, _, qtype = line.rpartition(" ")
            sections[-1].listed[tensor] = _ggml_type(qtype)
    return header, tuple(sections)


# ---------------------------------------------------------------------------------------------
# tensor lists rebuilt from the architectures' layouts
# ---------------------------------------------------------------------------------------------

# (tensor, ggml shape, name suffix): the suffix is "weight" but for biases and the few tensors
# stored without one (ssm_a / ssm_d of Mamba2 blocks)
Entry = tuple[MT, tuple[int, ...], str]
Spec = list[Entry]


def w(tensor: MT, *shape: int) -> Entry:
    return (tensor, shape, "weight")


def bias(tensor: MT, *shape: int) -> Entry:
    return (tensor, shape, "bias")


def bare(tensor: MT, *shape: int) -> Entry:
    return (tensor, shape, "")


@dataclass(frozen=True)
class Layout:
    """How to rebuild one snapshot model's tensor list."""
    arch: A
    model: ModelInfo
    n_ff: int                        # as the schema header shows it (0 where an array)
    n_vocab: int                     # as the schema header shows it
    top: Spec                        # tensors outside the blocks
    block: Callable[[int], Spec]     # the tensors of block i

    def tensors(self) -> list[TensorInfo]:
        allowed = gguf.MODEL_TENSORS[self.arch]
        out = []
        for bid, spec in [(None, self.top)] + [(i, self.block(i)) for i in range(self.model.n_layer)]:
            for tensor, shape, suffix in spec:
                assert tensor in allowed, f"{tensor} is not a {self.arch.name} tensor"
                name = gguf.TENSOR_NAMES[tensor].format(bid=bid) + (f".{suffix}" if suffix else "")
                # norms and other 1-D tensors are F32 in a GGUF, the rest F16/BF16 (irrelevant:
                # the C++ test creates them all as F32, and only unquantized ones keep it)
                qtype = T.F32 if len(shape) == 1 else T.F16
                out.append(TensorInfo(name, shape, qtype))
        return out


def _top(n_embd: int, n_vocab: int, tied: bool = False, rope_freqs: int = 0) -> Spec:
    spec = [w(MT.TOKEN_EMBD, n_embd, n_vocab), w(MT.OUTPUT_NORM, n_embd)]
    if not tied:
        spec.append(w(MT.OUTPUT, n_embd, n_vocab))
    if rope_freqs:
        spec.append(w(MT.ROPE_FREQS, rope_freqs))
    return spec


def _attention(n_embd: int, n_head: int, n_head_kv: int, head_dim: int, *, qk_norm: bool,
               q_gate: bool = False) -> Spec:
    """q/k/v/o projections (q doubled where it carries a gate, Qwen3.5/Next), q/k norms."""
    spec = [w(MT.ATTN_Q, n_embd, n_head * head_dim * (2 if q_gate else 1)),
            w(MT.ATTN_K, n_embd, n_head_kv * head_dim),
            w(MT.ATTN_V, n_embd, n_head_kv * head_dim),
            w(MT.ATTN_OUT, n_head * head_dim, n_embd)]
    if qk_norm:
        spec += [w(MT.ATTN_Q_NORM, head_dim), w(MT.ATTN_K_NORM, head_dim)]
    return spec


def _mlp(n_embd: int, n_ff: int) -> Spec:
    return [w(MT.FFN_GATE, n_embd, n_ff), w(MT.FFN_UP, n_embd, n_ff), w(MT.FFN_DOWN, n_ff, n_embd)]


def _moe(n_embd: int, n_expert: int, n_ff_exp: int, n_ff_shexp: int, *, gate: bool = True,
         probs_bias: bool = False, shexp_gate_inp: bool = False) -> Spec:
    """Router, stacked experts (3-D: ne[2] = n_expert) and shared expert."""
    spec = [w(MT.FFN_GATE_INP, n_embd, n_expert),
            w(MT.FFN_UP_EXP, n_embd, n_ff_exp, n_expert),
            w(MT.FFN_DOWN_EXP, n_ff_exp, n_embd, n_expert)]
    if gate:
        spec.append(w(MT.FFN_GATE_EXP, n_embd, n_ff_exp, n_expert))
    if probs_bias:
        spec.append(bias(MT.FFN_EXP_PROBS_B, n_expert))
    if n_ff_shexp:
        spec += [w(MT.FFN_UP_SHEXP, n_embd, n_ff_shexp), w(MT.FFN_DOWN_SHEXP, n_ff_shexp, n_embd)]
        if gate:
            spec.append(w(MT.FFN_GATE_SHEXP, n_embd, n_ff_shexp))
    if shexp_gate_inp:
        spec.append(w(MT.FFN_GATE_INP_SHEXP, n_embd))
    return spec


def _llama_like(arch: A, arch_name: str, n_embd: int, n_layer: int, n_head: int, n_head_kv: int,
                head_dim: int, n_ff: int, n_vocab: int, *, qk_norm: bool, tied: bool = False,
                rope_freqs: int = 0, post_norms: bool = False) -> Layout:
    def block(i: int) -> Spec:
        spec = [w(MT.ATTN_NORM, n_embd)]
        spec += _attention(n_embd, n_head, n_head_kv, head_dim, qk_norm=qk_norm) + _mlp(n_embd, n_ff)
        if post_norms:  # gemma3: norms before and after attention and FFN
            spec += [w(MT.FFN_PRE_NORM, n_embd), w(MT.ATTN_POST_NORM, n_embd),
                     w(MT.FFN_POST_NORM, n_embd)]
        else:
            spec.append(w(MT.FFN_NORM, n_embd))
        return spec
    return Layout(arch, ModelInfo(arch_name, n_layer, n_head, n_head_kv, 0, n_embd), n_ff, n_vocab,
                  _top(n_embd, n_vocab, tied, rope_freqs), block)


def _qwen_hybrid(arch: A, arch_name: str, n_embd: int, n_layer: int, n_head: int, n_head_kv: int,
                 n_ff: int, n_vocab: int, *, k_heads: int, v_heads: int, ffn: Spec,
                 split_ba: bool, n_expert: int = 0) -> Layout:
    """Qwen3-Next / Qwen3.5(-MoE): three gated-DeltaNet blocks (fused attn_qkv, attn_gate, ssm_*)
    then one gated full-attention block; head_dim 256, linear heads of 128."""
    d_k, d_v = k_heads * 128, v_heads * 128

    def block(i: int) -> Spec:
        spec = [w(MT.ATTN_NORM, n_embd), w(MT.ATTN_POST_NORM, n_embd)] + ffn
        if i % 4 == 3:
            return spec + _attention(n_embd, n_head, n_head_kv, 256, qk_norm=True, q_gate=True)
        spec += [w(MT.ATTN_QKV, n_embd, 2 * d_k + d_v), w(MT.ATTN_GATE, n_embd, d_v),
                 w(MT.SSM_CONV1D, 4, 2 * d_k + d_v), bare(MT.SSM_A, v_heads),
                 bias(MT.SSM_DT, v_heads), w(MT.SSM_NORM, 128), w(MT.SSM_OUT, d_v, n_embd)]
        if split_ba:
            spec += [w(MT.SSM_ALPHA, n_embd, v_heads), w(MT.SSM_BETA, n_embd, v_heads)]
        else:
            spec.append(w(MT.SSM_BETA_ALPHA, n_embd, 2 * v_heads))
        return spec
    return Layout(arch, ModelInfo(arch_name, n_layer, n_head, n_head_kv, n_expert, n_embd), n_ff,
                  n_vocab, _top(n_embd, n_vocab), block)


def _glm_4_6v() -> Layout:
    # zai-org/GLM-4.6V (GLM-4.5-Air text model): hidden 4096, 46 layers, 96 heads, 8 KV heads,
    # head_dim 128, layer 0 dense (FFN 10944), then 128 experts of 1408 + a shared one
    def block(i: int) -> Spec:
        spec = [w(MT.ATTN_NORM, 4096), w(MT.ATTN_POST_NORM, 4096),
                bias(MT.ATTN_Q, 96 * 128), bias(MT.ATTN_K, 8 * 128), bias(MT.ATTN_V, 8 * 128)]
        spec += _attention(4096, 96, 8, 128, qk_norm=False)
        return spec + (_mlp(4096, 10944) if i == 0 else _moe(4096, 128, 1408, 1408, probs_bias=True))
    return Layout(A.GLM4_MOE, ModelInfo("glm4moe", 46, 96, 8, 128, 4096), 10944, 151552,
                  _top(4096, 151552), block)


def _step_3_5_flash() -> Layout:
    # stepfun-ai/Step-3.5-Flash: hidden 4096, 45 layers, 64 heads (layer 0), 8 KV heads,
    # head_dim 128, a per-head attention gate, layers 0-2 dense (FFN 11264), then 288 experts
    # of 1280 + a shared one
    def block(i: int) -> Spec:
        spec = [w(MT.ATTN_NORM, 4096), w(MT.FFN_NORM, 4096), w(MT.ATTN_GATE, 4096, 64)]
        spec += _attention(4096, 64, 8, 128, qk_norm=True)
        return spec + (_mlp(4096, 11264) if i < 3 else _moe(4096, 288, 1280, 1280, probs_bias=True))
    return Layout(A.STEP35, ModelInfo("step35", 45, 64, 8, 288, 4096), 11264, 128896,
                  _top(4096, 128896), block)


def _deepseek_v3_1() -> Layout:
    # deepseek-ai/DeepSeek-V3.1: hidden 7168, 61 layers, 128 heads with MLA (q_lora 1536,
    # kv_lora 512, rope dims 64, nope 128, v 128; GGUF stores one KV head and the split,
    # 3-D attn_k_b / attn_v_b), layers 0-2 dense (FFN 18432), then 256 experts of 2048 + shared
    def block(i: int) -> Spec:
        spec = [w(MT.ATTN_NORM, 7168), w(MT.FFN_NORM, 7168),
                w(MT.ATTN_Q_A, 7168, 1536), w(MT.ATTN_Q_A_NORM, 1536),
                w(MT.ATTN_Q_B, 1536, 128 * 192), w(MT.ATTN_KV_A_MQA, 7168, 512 + 64),
                w(MT.ATTN_KV_A_NORM, 512), w(MT.ATTN_K_B, 128, 512, 128),
                w(MT.ATTN_V_B, 512, 128, 128), w(MT.ATTN_OUT, 128 * 128, 7168)]
        return spec + (_mlp(7168, 18432) if i < 3 else _moe(7168, 256, 2048, 2048, probs_bias=True))
    return Layout(A.DEEPSEEK2, ModelInfo("deepseek2", 61, 128, 1, 256, 7168), 18432, 129280,
                  _top(7168, 129280), block)


def _gpt_oss_120b() -> Layout:
    # openai/gpt-oss-120b: hidden 2880 (not a multiple of 256: everything on it falls back),
    # 36 layers, 64 heads of 64, 8 KV heads, 128 experts of 2880, attention sinks, biases.
    # The schema header shows n_vocab=0 (the split GGUF's token_embd is not in its first part).
    def block(i: int) -> Spec:
        spec = [w(MT.ATTN_NORM, 2880), w(MT.ATTN_POST_NORM, 2880), w(MT.ATTN_SINKS, 64),
                bias(MT.ATTN_Q, 4096), bias(MT.ATTN_K, 512), bias(MT.ATTN_V, 512),
                bias(MT.ATTN_OUT, 2880)]
        return spec + _attention(2880, 64, 8, 64, qk_norm=False) + _moe(2880, 128, 2880, 0)
    return Layout(A.GPT_OSS, ModelInfo("gpt-oss", 36, 64, 8, 128, 2880), 2880, 0,
                  _top(2880, 201088), block)


# nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B's hybrid_override_pattern: Mamba2, MoE, attention
NEMOTRON_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


def _nemotron_3_nano() -> Layout:
    # hidden 2688 (not a multiple of 256), 52 layers; Mamba2 with 64 heads of 64 (d_inner 4096,
    # 8 groups, state 128); attention 32 heads of 128, 2 KV heads; 128 relu^2 experts of 1856
    # (no gate) + a shared one of 3712.  Per-layer head counts are arrays: the schema header shows
    # their first element (layer 0 is Mamba: 0 KV heads), as llama.cpp's n_gqa() sees them.
    def block(i: int) -> Spec:
        kind = NEMOTRON_PATTERN[i]
        spec = [w(MT.ATTN_NORM, 2688)]
        if kind == "M":
            return spec + [w(MT.SSM_IN, 2688, 2 * 4096 + 2 * 8 * 128 + 64),
                           w(MT.SSM_CONV1D, 4, 4096 + 2 * 8 * 128), bias(MT.SSM_DT, 64),
                           bare(MT.SSM_A, 1, 64), bare(MT.SSM_D, 1, 64), w(MT.SSM_NORM, 512, 8),
                           w(MT.SSM_OUT, 4096, 2688)]
        if kind == "E":
            return spec + _moe(2688, 128, 1856, 3712, gate=False, probs_bias=True)
        return spec + _attention(2688, 32, 2, 128, qk_norm=False)
    return Layout(A.NEMOTRON_H_MOE, ModelInfo("nemotron_h_moe", 52, 32, 0, 128, 2688), 0, 131072,
                  _top(2688, 131072), block)


LAYOUTS: dict[str, Layout] = {
    # Qwen/Qwen3-0.6B: hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128, FFN 3072.
    # The ggml-org GGUF stores output.weight though the model ties it (the snapshot's
    # output.weight lines show it), so it is not tied here.
    "qwen3-0.6b": _llama_like(A.QWEN3, "qwen3", 1024, 28, 16, 8, 128, 3072, 151936, qk_norm=True),
    # Qwen/Qwen3-14B: hidden 5120, 40 layers, 40 heads, 8 KV heads, head_dim 128, FFN 17408
    "qwen3-14b": _llama_like(A.QWEN3, "qwen3", 5120, 40, 40, 8, 128, 17408, 151936, qk_norm=True),
    # meta-llama/Llama-3.1-70B-Instruct: hidden 8192, 80 layers, 64 heads, 8 KV heads, head_dim
    # 128, FFN 28672, vocab 128256, untied; its GGUF also has rope_freqs.weight (1-D, 64)
    "meta-llama-3.1-70b-instruct": _llama_like(A.LLAMA, "llama", 8192, 80, 64, 8, 128, 28672, 128256,
                                               qk_norm=False, rope_freqs=64),
    # google/gemma-3-4b-it (text part): hidden 2560, 34 layers, 8 heads, 4 KV heads, head_dim 256,
    # FFN 10240, vocab 262144, tied embeddings (no output.weight), pre and post norms
    "gemma-3-4b-it": _llama_like(A.GEMMA3, "gemma3", 2560, 34, 8, 4, 256, 10240, 262144,
                                 qk_norm=True, tied=True, post_norms=True),
    # Qwen/Qwen3.6-27B (the schema says Qwen3.5-27B): hidden 5120, 64 layers, 24 heads, 4 KV
    # heads, FFN 17408, vocab 248320; linear attention 16 key / 48 value heads
    "qwen3.6-27b": _qwen_hybrid(A.QWEN35, "qwen35", 5120, 64, 24, 4, 17408, 248320, k_heads=16,
                                v_heads=48, ffn=_mlp(5120, 17408),
                                split_ba=True),
    # Qwen/Qwen3-Coder-Next: hidden 2048, 48 layers, 16 heads, 2 KV heads, 512 experts of 512 +
    # a shared one of 512 (FFN 5120 in the header), linear attention 16 key / 32 value heads
    "qwen3-coder-next": _qwen_hybrid(A.QWEN3NEXT, "qwen3next", 2048, 48, 16, 2, 5120, 151936,
                                     k_heads=16, v_heads=32, n_expert=512, split_ba=False,
                                     ffn=_moe(2048, 512, 512, 512, shexp_gate_inp=True)),
    # Qwen/Qwen3.5-397B-A17B: hidden 4096, 60 layers, 32 heads, 2 KV heads, 512 experts of 1024 +
    # a shared one of 1024, linear attention 16 key / 64 value heads
    "qwen3.5-397b-a17b": _qwen_hybrid(A.QWEN35MOE, "qwen35moe", 4096, 60, 32, 2, 0, 248320,
                                      k_heads=16, v_heads=64, n_expert=512, split_ba=True,
                                      ffn=_moe(4096, 512, 1024, 1024, shexp_gate_inp=True)),
    "glm-4.6v": _glm_4_6v(),
    "step-3.5-flash": _step_3_5_flash(),
    "deepseek-v3.1": _deepseek_v3_1(),
    "gpt-oss-120b": _gpt_oss_120b(),
    "nvidia-nemotron-3-nano-30b-a3b": _nemotron_3_nano(),
}


def _check_header(layout: Layout, header: dict[str, int]) -> None:
    m = layout.model
    got = dict(n_embd=m.n_embd, n_ff=layout.n_ff, n_vocab=layout.n_vocab, n_layer=m.n_layer,
               n_head=m.n_head, n_head_kv=m.n_head_kv)
    if m.n_expert:
        got["n_expert"] = m.n_expert
    assert got == header


@functools.lru_cache(maxsize=None)
def _model_tensors(snapshot: str) -> tuple[ModelInfo, tuple[TensorInfo, ...]]:
    layout = LAYOUTS[snapshot]
    header, _ = read_snapshot(snapshot)
    _check_header(layout, header)
    return layout.model, tuple(layout.tensors())


SNAPSHOT_CASES = [(snap, s.ftype_name) for snap in LAYOUTS for s in read_snapshot(snap)[1]]


def compare_with_snapshot(snapshot: str, ftype_name: str) -> int:
    """One section of test-quant-type-selection: returns how many tensors were compared."""
    model, tensors = _model_tensors(snapshot)
    section = next(s for s in read_snapshot(snapshot)[1] if s.ftype_name == ftype_name)
    ftype = parse_ftype(ftype_name)
    assert mixes.default_type(ftype) == section.default

    chosen = choose_types(model, tensors, ftype)
    quantizable = [t for t in tensors if mixes.allows_quantization(t, model.arch)]
    wrong = {t.name: (section.listed.get(t.name, section.default).name, chosen[t.name].name)
             for t in quantizable if chosen[t.name] != section.listed.get(t.name, section.default)}
    assert not wrong, f"{len(wrong)} tensors differ (expected, got): {dict(list(wrong.items())[:8])}"
    # every tensor the snapshot lists must be one we have and quantize
    missing = set(section.listed) - {t.name for t in quantizable}
    assert not missing, f"snapshot tensors not rebuilt/quantizable: {sorted(missing)[:8]}"
    # the others keep their type
    quantizable_names = {t.name for t in quantizable}
    for t in tensors:
        if t.name not in quantizable_names:
            assert chosen[t.name] == t.type, t.name
    return len(quantizable)


@pytest.mark.parametrize("snapshot,ftype_name", SNAPSHOT_CASES)
def test_snapshot_section(snapshot: str, ftype_name: str) -> None:
    assert compare_with_snapshot(snapshot, ftype_name) > 0


def test_snapshot_files_cover_kquant_ftypes() -> None:
    # the comparison above must not silently run on an empty or truncated snapshot
    kquant_ftypes = {"Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S",
                     "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"}
    for snap in ("qwen3-0.6b", "qwen3-14b", "meta-llama-3.1-70b-instruct"):
        header, sections = read_snapshot(snap)
        assert kquant_ftypes <= {s.ftype_name for s in sections}, snap
        assert header["n_layer"] > 0
        q4_k_m = next(s for s in sections if s.ftype_name == "Q4_K_M")
        assert len(q4_k_m.listed) > header["n_layer"]  # attn_v and ffn_down of many layers


def test_rebuilt_tensor_counts() -> None:
    # 7 quantizable matrices per block plus token_embd and output, nothing else (norms,
    # rope_freqs and q/k norms stay out)
    for snap, n_layer in (("qwen3-0.6b", 28), ("qwen3-14b", 40), ("meta-llama-3.1-70b-instruct", 80)):
        model, tensors = _model_tensors(snap)
        quantizable = [t for t in tensors if mixes.allows_quantization(t, model.arch)]
        assert len(quantizable) == 7 * n_layer + 2


def test_snapshot_comparison_detects_a_wrong_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    # sanity check of the harness: with use_more_bits broken, Q4_K_M must no longer match
    monkeypatch.setattr(mixes, "use_more_bits", lambda i_layer, n_layers: False)
    with pytest.raises(AssertionError, match="tensors differ"):
        compare_with_snapshot("qwen3-0.6b", "Q4_K_M")


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M: rows of 576 are not a multiple of 256
# ---------------------------------------------------------------------------------------------

SMOL = ModelInfo("llama", n_layer=30, n_head=9, n_head_kv=3, n_expert=0, n_embd=576)


def smollm2_tensors() -> list[TensorInfo]:
    """SmolLM2-135M's tensors (head_dim 64, FFN 1536, vocab 49152, tied: no output.weight)."""
    tensors = [TensorInfo("token_embd.weight", (576, 49152), T.BF16),
               TensorInfo("output_norm.weight", (576,))]
    for i in range(30):
        p = f"blk.{i}."
        tensors += [TensorInfo(p + "attn_norm.weight", (576,)),
                    TensorInfo(p + "attn_q.weight", (576, 576), T.BF16),
                    TensorInfo(p + "attn_k.weight", (576, 192), T.BF16),
                    TensorInfo(p + "attn_v.weight", (576, 192), T.BF16),
                    TensorInfo(p + "attn_output.weight", (576, 576), T.BF16),
                    TensorInfo(p + "ffn_norm.weight", (576,)),
                    TensorInfo(p + "ffn_gate.weight", (576, 1536), T.BF16),
                    TensorInfo(p + "ffn_up.weight", (576, 1536), T.BF16),
                    TensorInfo(p + "ffn_down.weight", (1536, 576), T.BF16)]
    return tensors


def _more_bits_layers(n: int) -> set[int]:
    # use_more_bits by hand for n = 30: first 3 (30/8), last 4 (>= 7*30/8 = 26), and i with
    # (i - 3) % 3 == 2, i.e. 5, 8, ..., 23
    assert n == 30
    return set(range(3)) | set(range(26, 30)) | set(range(5, 26, 3))


def test_smollm2_q4_k_m_fallbacks() -> None:
    """Q4_K_M on rows of 576 (576 % 256 = 64, 576 % 32 = 0):

    - token_embd is tied (no output.weight), so it takes the output rule; its row does not fit
      Q4_K's 256-blocks, so the rule gives Q8_0 (not Q6_K), which fits.
    - attn_q/k/output, ffn_gate/up: Q4_K -> fallback Q5_0.
    - attn_v: Q6_K on the use_more_bits layers -> fallback Q8_0, else Q4_K -> Q5_0.
    - ffn_down (rows of 1536 = 6 x 256) is the only one that keeps K-quants: Q6_K on the
      use_more_bits layers, Q4_K on the others.
    - norms stay F32.
    """
    chosen = choose_types(SMOL, smollm2_tensors(), "Q4_K_M")
    more = _more_bits_layers(30)
    assert chosen["token_embd.weight"] == T.Q8_0
    assert chosen["output_norm.weight"] == T.F32
    for i in range(30):
        p = f"blk.{i}."
        assert chosen[p + "attn_norm.weight"] == T.F32
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert chosen[p + name + ".weight"] == T.Q5_0, (i, name)
        assert chosen[p + "attn_v.weight"] == (T.Q8_0 if i in more else T.Q5_0), i
        assert chosen[p + "ffn_down.weight"] == (T.Q6_K if i in more else T.Q4_K), i
    k_quants = {n for n, t in chosen.items() if t in (T.Q4_K, T.Q6_K)}
    assert k_quants == {f"blk.{i}.ffn_down.weight" for i in range(30)}


@pytest.mark.parametrize("ftype,fallback", [
    ("Q2_K", T.Q4_0), ("Q3_K_S", T.Q4_0), ("Q4_K_S", T.Q5_0), ("Q5_K_S", T.Q5_1),
    ("Q6_K", T.Q8_0), ("IQ4_XS", T.IQ4_NL),
])
def test_fallback_of_each_k_type(ftype: str, fallback: T) -> None:
    # attn_q has no rule in these ftypes, so it is the base type and falls back as the
    # switch in tensor_type_fallback says
    chosen = choose_types(SMOL, smollm2_tensors(), ftype)
    assert chosen["blk.10.attn_q.weight"] == fallback


def test_fallback_to_f16_when_not_a_multiple_of_32() -> None:
    t = TensorInfo("blk.0.attn_q.weight", (100, 64))
    assert mixes.fallback_type(t, T.Q4_K) == T.F16      # Q5_0 does not fit either
    assert mixes.fallback_type(t, T.Q8_0) == T.F16      # a 32-block type itself
    assert mixes.fallback_type(t, T.F16) == T.F16
    assert mixes.fallback_type(TensorInfo("x.weight", (96, 4)), T.Q6_K) == T.Q8_0
    assert mixes.fallback_type(TensorInfo("x.weight", (512, 4)), T.Q6_K) == T.Q6_K
    with pytest.raises(ValueError, match="no tensor type fallback"):
        mixes.fallback_type(TensorInfo("x.weight", (96, 4)), T.Q1_0)  # 128-blocks, no entry


def test_smollm2_legacy_ftypes_need_no_fallback() -> None:
    # 32-block types fit 576; only the tied token_embd moves: the output rule gives Q6_K (576 is
    # a multiple of the base type's 32-block), which falls back to Q8_0 (576 % 256 != 0); for
    # Q8_0 files the output rule keeps Q8_0
    for ftype, base in (("Q4_0", T.Q4_0), ("Q5_1", T.Q5_1), ("Q8_0", T.Q8_0)):
        chosen = choose_types(SMOL, smollm2_tensors(), ftype)
        assert chosen["token_embd.weight"] == T.Q8_0, ftype
        others = {t for n, t in chosen.items() if n != "token_embd.weight" and "norm" not in n}
        assert others == {base}, ftype


def test_real_smollm2_q4_1_file_matches() -> None:
    """The SmolLM2-135M Q4_1 GGUF that the other tests use was made by llama-quantize: its
    stored types are exactly what choose_types says for Q4_1 (token_embd Q8_0, rest Q4_1)."""
    path = Path.home() / ".cache" / "kquant" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip("SmolLM2 GGUF not in the cache (tests/conftest.py fetches it)")
    reader = gguf.GGUFReader(path)
    model = mixes.model_info_from_gguf(reader)
    assert model == SMOL
    tensors = mixes.tensor_infos_from_gguf(reader)
    # the file is already quantized; pretend its matrices are F16 as in the source model
    source = [TensorInfo(t.name, t.shape, T.F32 if len(t.shape) == 1 else T.F16) for t in tensors]
    chosen = choose_types(model, source, "Q4_1")
    assert chosen == {t.name: t.type for t in tensors}


def test_model_info_from_a_gguf_with_per_layer_head_counts(tmp_path: Path) -> None:
    # hybrid models store head counts per layer; like llama.cpp's n_gqa() the rules use layer 0
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "nemotron_h_moe")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count([4, 4])
    writer.add_head_count_kv([0, 2])
    writer.add_expert_count(8)
    writer.add_tensor("token_embd.weight", np.zeros((10, 64), dtype=np.float32))
    writer.add_tensor("blk.1.attn_v.weight", np.zeros((32, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    model = mixes.model_info_from_gguf(reader)
    assert model == ModelInfo("nemotron_h_moe", 2, 4, 0, 8, 64)
    assert model.n_gqa == 0
    assert mixes.tensor_infos_from_gguf(reader) == [
        TensorInfo("token_embd.weight", (64, 10), T.F32),
        TensorInfo("blk.1.attn_v.weight", (64, 32), T.F16)]
    names = mixes.types_by_name({"a": T.Q4_K, "b": T.IQ2_XXS, "c": T.BF16, "d": T.Q8_0})
    assert names == {"a": "q4_K", "b": "iq2_xxs", "c": "bf16", "d": "q8_0"}


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------

def _qwen3_small() -> tuple[ModelInfo, tuple[TensorInfo, ...]]:
    return _model_tensors("qwen3-0.6b")


def test_pure_uses_the_base_type_except_embeddings_options() -> None:
    model, tensors = _qwen3_small()
    chosen = choose_types(model, tensors, "Q4_K_M", pure=True)
    quantized = {n: t for n, t in chosen.items() if "norm" not in n}
    assert set(quantized.values()) == {T.Q4_K}  # output.weight too: no Q6_K rule
    chosen = choose_types(model, tensors, "Q4_K_M", pure=True, output_tensor_type="q8_0",
                          token_embedding_type=T.Q6_K)
    assert chosen["output.weight"] == T.Q8_0 and chosen["token_embd.weight"] == T.Q6_K


def test_leave_output_tensor() -> None:
    model, tensors = _qwen3_small()
    chosen = choose_types(model, tensors, "Q4_K_M", leave_output_tensor=True)
    assert chosen["output.weight"] == T.F16  # its own type
    assert chosen["token_embd.weight"] == T.Q4_K  # still untied: output.weight exists
    assert choose_types(model, tensors, "Q4_K_M")["output.weight"] == T.Q6_K


def test_output_and_token_embedding_types_skip_the_fallback() -> None:
    # SmolLM2 is tied: --output-tensor-type also decides the token embeddings, through the
    # output rule, and the fallback then applies (576 is no multiple of 256: Q4_K -> Q5_0);
    # --token-embedding-type is returned as is, without a fallback
    tensors = smollm2_tensors()
    assert choose_types(SMOL, tensors, "Q8_0", output_tensor_type=T.Q4_K)["token_embd.weight"] == T.Q5_0
    chosen = choose_types(SMOL, tensors, "Q8_0", output_tensor_type=T.Q4_K, token_embedding_type="q6_k")
    assert chosen["token_embd.weight"] == T.Q6_K
    # with output.weight present, --output-tensor-type is final for it, also without fallback
    out = TensorInfo("output.weight", (576, 49152))
    assert choose_types(SMOL, tensors + [out], "Q8_0", output_tensor_type=T.Q4_K)["output.weight"] == T.Q4_K


def test_embedding_options_apply_to_f16_files() -> None:
    model, tensors = _qwen3_small()
    chosen = choose_types(model, tensors, "F16", token_embedding_type=T.Q8_0, tensor_types=[("attn_v", T.Q4_K)])
    assert chosen["token_embd.weight"] == T.Q8_0
    assert chosen["blk.0.attn_v.weight"] == T.F16  # --tensor-type only for quantized base types
    assert chosen["blk.0.attn_norm.weight"] == T.F32


def test_tensor_type_patterns_first_match_wins_and_skip_counters() -> None:
    model, tensors = _qwen3_small()
    chosen = choose_types(model, tensors, "Q4_K_M", tensor_types=[
        (r"blk\.1\.attn_v", T.Q8_0), (r"attn_v", T.Q5_K), (r"ffn_down", T.Q3_K)])
    assert chosen["blk.1.attn_v.weight"] == T.Q8_0
    assert all(chosen[f"blk.{i}.attn_v.weight"] == T.Q5_K for i in range(28) if i != 1)
    assert all(chosen[f"blk.{i}.ffn_down.weight"] == T.Q3_K for i in range(28))
    assert chosen["blk.5.attn_q.weight"] == T.Q4_K  # unmatched: mix rules
    # a searched, not anchored, regex; and a manual override also gets the fallback
    smol = choose_types(SMOL, smollm2_tensors(), "Q4_K_M", tensor_types=[("q.weight$", T.Q6_K)])
    assert smol["blk.0.attn_q.weight"] == T.Q8_0
    assert smol["blk.0.attn_k.weight"] == T.Q5_0


def test_manual_attn_v_does_not_advance_the_counter() -> None:
    # as in llama.cpp, a tensor set by --tensor-type skips the mix rules and so its counter:
    # with layer 0's attn_v overridden, layer 1's attn_v is counted as the first (Q3_K_M gives
    # Q5_K to the first two attn_v it counts, Q4_K afterwards)
    model, tensors = _qwen3_small()
    plain = choose_types(model, tensors, "Q3_K_M")
    assert [plain[f"blk.{i}.attn_v.weight"] for i in range(3)] == [T.Q5_K, T.Q5_K, T.Q4_K]
    manual = choose_types(model, tensors, "Q3_K_M", tensor_types=[(r"blk\.0\.attn_v", T.Q8_0)])
    assert [manual[f"blk.{i}.attn_v.weight"] for i in range(4)] == [T.Q8_0, T.Q5_K, T.Q5_K, T.Q4_K]


def test_tied_embeddings_and_order_independence() -> None:
    model, tensors = _qwen3_small()
    untied = choose_types(model, tensors, "Q4_0")
    assert untied["token_embd.weight"] == T.Q4_0 and untied["output.weight"] == T.Q6_K
    tied = choose_types(model, [t for t in tensors if t.name != "output.weight"], "Q4_0")
    assert tied["token_embd.weight"] == T.Q6_K
    assert choose_types(model, list(reversed(tensors)), "Q4_K_M") == choose_types(model, tensors, "Q4_K_M")


def test_imatrix_rules() -> None:
    model, tensors = _qwen3_small()  # 28 layers: the first 3 ffn_down get Q4_1/Q5_1 with imatrix
    for ftype, bumped in (("Q4_0", T.Q4_1), ("Q5_0", T.Q5_1)):
        plain = choose_types(model, tensors, ftype)
        with_imatrix = choose_types(model, tensors, ftype, has_imatrix=True)
        assert {plain[f"blk.{i}.ffn_down.weight"] for i in range(28)} == {mixes.default_type(ftype)}
        assert [with_imatrix[f"blk.{i}.ffn_down.weight"] for i in range(4)] == [bumped] * 3 + [mixes.default_type(ftype)]
    assert mixes.requires_imatrix("blk.0.ffn_up.weight", T.Q2_K, "Q2_K_S")
    assert not mixes.requires_imatrix("blk.0.ffn_up.weight", T.Q2_K, "Q2_K")
    assert not mixes.requires_imatrix("token_embd.weight", T.IQ2_XXS, "IQ2_XXS")


def test_imatrix_changes_iq3_xxs_and_iq4_nl() -> None:
    model, tensors = _qwen3_small()  # n_gqa = 2 (< 4), 28 layers: 3 in the first eighth
    plain = choose_types(model, tensors, "IQ3_XXS")
    with_imatrix = choose_types(model, tensors, "IQ3_XXS", has_imatrix=True)
    assert plain["blk.9.attn_v.weight"] == T.IQ3_S and with_imatrix["blk.9.attn_v.weight"] == T.IQ3_XXS
    assert [plain[f"blk.{i}.ffn_down.weight"] for i in (0, 2, 3)] == [T.Q4_K, T.Q4_K, T.Q3_K]
    assert with_imatrix["blk.0.ffn_down.weight"] == T.IQ3_XXS
    assert choose_types(model, tensors, "IQ4_NL")["blk.2.ffn_down.weight"] == T.Q5_K
    assert choose_types(model, tensors, "IQ4_NL", has_imatrix=True)["blk.2.ffn_down.weight"] == T.IQ4_NL


def test_eight_expert_rules() -> None:
    # Mixtral-style: 8 experts, 32 layers; attn_v/attn_k to Q8_0, attn_output to Q5_K for the
    # listed ftypes, IQ2 ftypes: attn_k Q4_K; IQ3_M: ffn_down Q4_K on use_more_bits layers
    model = ModelInfo("llama", 32, 32, 8, n_expert=8)
    assert not model.type_70b
    tensors = []
    for i in range(32):
        tensors += [TensorInfo(f"blk.{i}.attn_v.weight", (4096, 1024)),
                    TensorInfo(f"blk.{i}.attn_k.weight", (4096, 1024)),
                    TensorInfo(f"blk.{i}.attn_output.weight", (4096, 4096)),
                    TensorInfo(f"blk.{i}.ffn_down_exps.weight", (14336, 4096, 8))]
    q4km = choose_types(model, tensors, "Q4_K_M")
    assert q4km["blk.9.attn_v.weight"] == T.Q8_0 and q4km["blk.9.attn_k.weight"] == T.Q8_0
    assert q4km["blk.9.attn_output.weight"] == T.Q5_K
    assert choose_types(model, tensors, "Q6_K")["blk.9.attn_output.weight"] == T.Q6_K
    iq2 = choose_types(model, tensors, "IQ2_XXS", has_imatrix=True)
    assert iq2["blk.9.attn_k.weight"] == T.Q4_K and iq2["blk.9.attn_output.weight"] == T.Q5_K
    assert iq2["blk.9.attn_v.weight"] == T.Q4_K  # n_expert >= 4
    iq3m = choose_types(model, tensors, "IQ3_M")
    assert [iq3m[f"blk.{i}.ffn_down_exps.weight"] for i in (3, 4, 5, 6)] == [T.Q4_K, T.IQ3_S, T.IQ3_S, T.Q4_K]


def test_bailingmoe3_and_glm5_next_special_cases() -> None:
    k_b = TensorInfo("blk.0.attn_k_b.weight", (128, 512, 16))
    experts = TensorInfo("blk.0.ffn_down_exps.weight", (512, 2048, 16))
    for arch, k_b_type in (("deepseek2", T.MXFP4), ("bailingmoe3", T.Q8_0)):
        model = ModelInfo(arch, 1, 16, 1, n_expert=16)
        chosen = choose_types(model, [k_b, experts], "MXFP4_MOE")
        assert chosen == {k_b.name: k_b_type, experts.name: T.MXFP4}, arch
    glm = ModelInfo("glm5-next", 1, 64, 8)
    tensors = [TensorInfo("blk.0.attn_q_a.weight", (4096, 1024)),
               TensorInfo("blk.0.nextn.eh_proj.weight", (8192, 4096)),
               TensorInfo("blk.0.attn_k_b.weight", (128, 512, 64)),
               TensorInfo("blk.0.ffn_up.weight", (4096, 1024))]
    chosen = choose_types(glm, tensors, "Q4_K_M")
    assert chosen == {"blk.0.attn_q_a.weight": T.Q8_0, "blk.0.nextn.eh_proj.weight": T.Q8_0,
                      "blk.0.attn_k_b.weight": T.F32, "blk.0.ffn_up.weight": T.Q4_K}
    assert choose_types(glm, tensors, "Q4_K_M", pure=True)["blk.0.attn_q_a.weight"] == T.Q4_K


def test_70b_and_falcon_special_cases() -> None:
    # the 70B attn_v bump, and falcon's Q4_K_M ffn_down rule (Q6_K for the first 16th)
    llama70, tensors = _model_tensors("meta-llama-3.1-70b-instruct")
    assert llama70.type_70b
    chosen = choose_types(llama70, tensors, "Q3_K_S")
    assert chosen["blk.40.attn_v.weight"] == T.Q5_K  # Q3_K -> Q5_K
    not70 = ModelInfo("llama", 80, 64, 8, is_70b=False)
    assert choose_types(not70, tensors, "Q3_K_S")["blk.40.attn_v.weight"] == T.Q3_K
    falcon = ModelInfo("falcon", 80, 64, 8)
    chosen = choose_types(falcon, tensors, "Q4_K_M")
    assert chosen["blk.0.ffn_down.weight"] == T.Q6_K    # 0 < 80/16
    assert chosen["blk.12.ffn_down.weight"] == T.Q5_K   # use_more_bits, past 80/16
    assert chosen["blk.13.ffn_down.weight"] == T.Q4_K
    assert chosen["output.weight"] == T.Q8_0             # falcon: output Q8_0


def test_mxfp4_moe_and_expert_layers() -> None:
    model = ModelInfo("qwen3moe", n_layer=2, n_head=32, n_head_kv=4, n_expert=128)
    tensors = [TensorInfo("blk.1.ffn_down_exps.weight", (768, 2048, 128)),
               TensorInfo("blk.1.ffn_down_shexp.weight", (768, 2048)),
               TensorInfo("blk.1.attn_v.weight", (2048, 512)),
               TensorInfo("blk.1.ffn_gate_inp.weight", (2048, 128)),
               TensorInfo("output.weight", (2048, 1000)),
               TensorInfo("token_embd.weight", (2048, 1000))]
    chosen = choose_types(model, tensors, "MXFP4_MOE")
    assert chosen["blk.1.ffn_down_exps.weight"] == T.MXFP4
    assert chosen["blk.1.ffn_down_shexp.weight"] == T.Q8_0
    assert chosen["blk.1.ffn_gate_inp.weight"] == T.F32  # router: never quantized
    assert chosen["output.weight"] == T.Q8_0
    # with experts, the layer of ffn_down comes from the name: blk.1 of 2 layers is past 7/8
    assert choose_types(model, tensors, "Q4_K_M")["blk.1.ffn_down_exps.weight"] == T.Q6_K
    bad = [TensorInfo("blk.5.ffn_down_exps.weight", (768, 2048, 128))]
    with pytest.raises(ValueError, match="Bad layer 5"):
        choose_types(model, bad, "Q4_K_M")


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def test_parse_ftype() -> None:
    assert parse_ftype("Q4_K_M") == F.MOSTLY_Q4_K_M
    assert parse_ftype("q4_k_m") == F.MOSTLY_Q4_K_M
    assert parse_ftype("Q4_K") == F.MOSTLY_Q4_K_M
    assert parse_ftype("q3_k") == F.MOSTLY_Q3_K_M
    assert parse_ftype("Q5_K") == F.MOSTLY_Q5_K_M
    assert parse_ftype("15") == F.MOSTLY_Q4_K_M
    assert parse_ftype(7) == F.MOSTLY_Q8_0
    assert parse_ftype(" f16 ") == F.MOSTLY_F16
    assert parse_ftype("0") == F.ALL_F32
    assert FTYPES["Q2_K_S"] == F.MOSTLY_Q2_K_S and FTYPES["BF16"] == F.MOSTLY_BF16


@pytest.mark.parametrize("bad", ["Q4_K_X", "", "q4", "4", "5", "39", "1024", "-1", "7x", "COPY", "Q2_0"])
def test_parse_ftype_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_ftype(bad)


def test_default_type_and_invalid_ftypes() -> None:
    assert mixes.default_type("Q4_K_S") == T.Q4_K
    assert mixes.default_type("IQ2_S") == T.IQ2_XS
    assert mixes.default_type("MXFP4_MOE") == T.MXFP4
    with pytest.raises(ValueError, match="invalid output file type"):
        mixes.default_type(F.MOSTLY_NVFP4)
    with pytest.raises(ValueError):
        choose_types(SMOL, smollm2_tensors(), F.GUESSED)


def test_parse_tensor_type_option() -> None:
    assert mixes.parse_tensor_type_option("Attn_Q=q8_0") == ("attn_q", T.Q8_0)
    assert mixes.parse_tensor_type_option(r"blk\.[0-3]\.ffn_down=Q6_K") == (r"blk\.[0-3]\.ffn_down", T.Q6_K)
    for bad in ("attn_q", "=q8_0", "attn_q=", "attn_q=q9_0"):
        with pytest.raises(ValueError):
            mixes.parse_tensor_type_option(bad)


def test_categories_and_quantizability() -> None:
    cat = mixes.tensor_category
    assert cat("blk.0.attn_qkv.weight") == mixes.Category.ATTENTION_QKV
    assert cat("blk.0.attn_kv_b.weight") == mixes.Category.ATTENTION_KV_B
    assert cat("blk.0.ffn_up_exps.weight") == mixes.Category.FFN_UP
    assert cat("per_layer_token_embd.weight") == mixes.Category.TOKEN_EMBD
    assert cat("blk.0.attn_q_norm.weight") == mixes.Category.OTHER
    ok = mixes.allows_quantization
    assert ok(TensorInfo("blk.0.attn_q.weight", (64, 64)))
    assert not ok(TensorInfo("blk.0.attn_q.bias", (64, 64)))
    assert not ok(TensorInfo("blk.0.attn_q.weight", (64, 1)))        # 1-D for ggml
    assert not ok(TensorInfo("blk.0.ffn_norm.weight", (64, 64)))
    assert not ok(TensorInfo("blk.0.ffn_gate_inp.weight", (64, 8)))
    assert not ok(TensorInfo("position_embd.weight", (64, 64)))
    assert not ok(TensorInfo("blk.0.ssm_conv1d.weight", (4, 64)))
    assert not ok(TensorInfo("output.weight", (64, 64)), quantize_output_tensor=False)
    assert ok(TensorInfo("blk.0.attn_k_b.weight", (64, 64)), "deepseek2")
    assert not ok(TensorInfo("blk.0.attn_k_b.weight", (64, 64)), "glm5-next")
    assert ok(TensorInfo("abcde", (64, 64)))  # llama.cpp's size_t wrap-around, kept
    assert not ok(TensorInfo("blk.0.attn_q.weight", (64, 64)), only_copy=True)


def test_use_more_bits_and_order_key() -> None:
    assert [i for i in range(16) if mixes.use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    names = ["output.weight", "blk.10.attn_q.weight", "blk.2.ffn_up.weight", "blk.2.attn_v.weight",
             "token_embd.weight"]
    assert sorted(names, key=mixes.weight_order_key) == [
        "output.weight", "token_embd.weight", "blk.2.attn_v.weight", "blk.2.ffn_up.weight",
        "blk.10.attn_q.weight"]
