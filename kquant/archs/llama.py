"""llama (LlamaForCausalLM, and MistralForCausalLM and MixtralForCausalLM, which llama.cpp converts to
the same GGUF arch).

Conversion follows convert_hf_to_gguf.py's LlamaModel: Q/K rows permuted to GGML's rope layout
(so the runtime rotates adjacent pairs, NORM), rope_freqs generated for rope_type llama3,
general vocab_size and rope.dimension_count written, and the tokenizer quirks of llama-family
folders (SentencePiece or BPE, CodeLlama's infill tokens, SmolLM's add_bos_token).

Mixtral is a llama with experts: the converter stacks each block's block_sparse_moe.experts.X.w1/w2/w3
into ffn_gate_exps / ffn_down_exps / ffn_up_exps (n_ff rows each: llama.cpp sizes a llama's
experts by feed_forward_length) beside the router (block_sparse_moe.gate -> ffn_gate_inp), and
llama.cpp's loader creates those in place of the dense FFN wherever expert_count > 0; its graph
routes with softmax gating, top expert_used_count, weights renormalized (norm_w).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR

from ..errors import ModelError
from ..files import hf_vocab
from ..files.safetensors import read_json
from dataclasses import replace

from .base import Arch, ExpertStacking, HParams, TensorSpec as T


def _head_dim(hp: HParams) -> int:
    """The head size LlamaModel reads: config.json's head_dim, else hidden_size / heads."""
    dim = hp.get("head_dim")
    return hp["hidden_size"] // hp["num_attention_heads"] if dim is None else dim


def _llama3_rope_factors(rope: dict[str, Any], hp: HParams) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: rope_freqs for rope_type llama3, in float32 as torch does."""
    base = rope.get("rope_theta", 10000.0)
    dim = _head_dim(hp)
    exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    freqs = (np.float32(1.0) / np.power(np.float32(base), exps, dtype=np.float32)).astype(np.float32)
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = np.float32(2 * math.pi) / freq
        if wavelen < high_freq_wavelen:
            out.append(1.0)
        elif wavelen > low_freq_wavelen:
            out.append(float(factor))
        else:
            smooth = (np.float32(old_context_len) / wavelen - np.float32(low_freq_factor)) / np.float32(high_freq_factor - low_freq_factor)
            smooth = np.float32(smooth)
            out.append(np.float32(1) / ((np.float32(1) - smooth) / np.float32(factor) + smooth))
    return np.array(out, dtype=np.float32)


def _extra_tensors(hp: HParams) -> list[tuple[MODEL_TENSOR, np.ndarray]]:
    """LlamaModel.generate_extra_tensors: llama3 rope scaling as per-frequency factors."""
    rope = hp["rope_parameters"]
    rp = rope.get("full_attention", rope)
    if rp and str(rp.get("rope_type", "")).lower() == "llama3":
        return [(MODEL_TENSOR.ROPE_FREQS, _llama3_rope_factors(rp, hp))]
    return []


def _set_params(w: gguf.GGUFWriter, folder: Path, hp: HParams) -> None:
    """LlamaModel.set_gguf_parameters' additions."""
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(_head_dim(hp))


def _set_vocab(w: gguf.GGUFWriter, folder: Path, hp: HParams) -> None:
    """LlamaModel.set_vocab."""
    tc_path = folder / "tokenizer_config.json"
    if (folder / "tekken.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise ModelError(f"{folder}: Mistral tekken.json tokenizers are not supported")
    if tc_path.is_file():
        tc = read_json(tc_path, "tokenizer config")
        if (add_prefix_space := tc.get("add_prefix_space")) is not None:
            w.add_add_space_prefix(add_prefix_space)
        if tc.get("tokenizer_class") == "HybridDNATokenizer":
            raise ModelError(f"{folder}: HybridDNATokenizer is not supported")
    if (folder / "tokenizer.model").is_file():
        hf_vocab.set_vocab_sentencepiece(w, folder, hp)
    else:
        tj_path = folder / "tokenizer.json"
        if tj_path.is_file():
            tj = read_json(tj_path, "tokenizer")
            m = tj.get("model") or {}
            is_llama3 = m.get("type") == "BPE" and m.get("ignore_merges", False) and not m.get("byte_fallback", True)
            if not is_llama3 and m.get("type") == "BPE" and m.get("byte_fallback", False) \
                    and (tj.get("decoder") or {}).get("type") == "Sequence":
                raise ModelError(f"{folder}: a byte-fallback BPE tokenizer.json without tokenizer.model "
                                 "(llama.cpp's LlamaHfVocab) is not supported; add the tokenizer.model")
        hf_vocab.set_vocab_gpt2(w, folder, hp)
    vocab_size = hp.get("vocab_size", 32000)
    if vocab_size == 32016:  # CodeLlama
        sv = hf_vocab.SpecialVocab(folder, load_merges=False, special_token_types=['prefix', 'suffix', 'middle', 'eot'])
        for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            sv.set_special_token(typ, tid)
        sv.add_to(w)
    if vocab_size == 49152:  # granite small models / SmolLM
        w.add_add_bos_token(False)


# llama-model.cpp's LLM_ARCH_LLAMA tensors, in its order; shapes in ggml order (kquant.archs.base.Dims).
# DENSE is what qwen2 and qwen3 share with it.
DENSE = (
    T(MODEL_TENSOR.TOKEN_EMBD, "n_embd n_vocab"),
    T(MODEL_TENSOR.OUTPUT_NORM, "n_embd"),
    T(MODEL_TENSOR.OUTPUT, "n_embd n_vocab", required=False),  # absent: tied to token_embd
    T(MODEL_TENSOR.ROPE_FREQS, "n_rot_half", required=False),  # llama3 rope scaling
    T(MODEL_TENSOR.ATTN_NORM, "n_embd"),
    T(MODEL_TENSOR.ATTN_Q, "n_embd n_q"),
    T(MODEL_TENSOR.ATTN_K, "n_embd n_k"),
    T(MODEL_TENSOR.ATTN_V, "n_embd n_v"),
    T(MODEL_TENSOR.ATTN_OUT, "n_q n_embd"),
    T(MODEL_TENSOR.ATTN_Q, "n_q", "bias", required=False),
    T(MODEL_TENSOR.ATTN_K, "n_k", "bias", required=False),
    T(MODEL_TENSOR.ATTN_V, "n_v", "bias", required=False),
    T(MODEL_TENSOR.ATTN_OUT, "n_embd", "bias", required=False),
    T(MODEL_TENSOR.FFN_NORM, "n_embd"),
    T(MODEL_TENSOR.FFN_GATE, "n_embd n_ff"),
    T(MODEL_TENSOR.FFN_DOWN, "n_ff n_embd"),
    T(MODEL_TENSOR.FFN_UP, "n_embd n_ff"),
)
_DENSE_FFN = (MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_DOWN, MODEL_TENSOR.FFN_UP)
# a llama block has the dense FFN where the model has no experts (expert_count 0), else these
EXPERTS = (
    T(MODEL_TENSOR.FFN_GATE_INP, "n_embd n_expert", experts=True),
    # TENSOR_NOT_REQUIRED in llama.cpp (an up-only expert FFN); kquant's runtime needs it
    T(MODEL_TENSOR.FFN_GATE_EXP, "n_embd n_ff n_expert", required=False, experts=True),
    T(MODEL_TENSOR.FFN_DOWN_EXP, "n_ff n_embd n_expert", experts=True),
    T(MODEL_TENSOR.FFN_UP_EXP, "n_embd n_ff n_expert", experts=True),
)
TENSORS = tuple(replace(t, experts=False) if t.key in _DENSE_FFN else t for t in DENSE) + (
    # mlp_bias checkpoints: llama.cpp adds them, kquant's runtime has no FFN biases
    T(MODEL_TENSOR.FFN_GATE, "n_ff", "bias", required=False, runs=False, experts=False),
    T(MODEL_TENSOR.FFN_DOWN, "n_embd", "bias", required=False, runs=False, experts=False),
    T(MODEL_TENSOR.FFN_UP, "n_ff", "bias", required=False, runs=False, experts=False),
) + EXPERTS

# LlamaModel.modify_tensors (Mixtral): w1 = gate, w2 = down, w3 = up
STACKING = ExpertStacking(
    marker="block_sparse_moe.experts",
    per_expert="model.layers.{bid}.block_sparse_moe.experts.{xid}.{kind}.weight",
    merged="layers.{bid}.feed_forward.experts.{kind}.weight",
    kinds=("w1", "w2", "w3"),
    count_keys=("num_local_experts",),
)

ARCH = Arch(
    model_arch=MODEL_ARCH.LLAMA,
    hf_classes=("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"),
    config_defaults={
        "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=None),
        "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=None,
                        max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False),
        "mixtral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=None,
                        max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        num_experts_per_tok=2, num_local_experts=8, rope_theta=1e6),
    },
    head_dim_from_heads=("llama", "mistral"),
    permute_qk=True,
    hf_name_drop=("text_model.",),
    set_params=_set_params,
    set_vocab=_set_vocab,
    extra_tensors=_extra_tensors,
    hf_experts=STACKING,
    tensors=TENSORS,
    rope_neox=False,
    expert_norm=True,
)
