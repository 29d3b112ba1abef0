"""qwen3moe (Qwen3MoeForCausalLM): Qwen 3 mixture-of-experts models (Qwen3-30B-A3B, ...).

Conversion follows convert_hf_to_gguf.py's Qwen3MoeModel, a Qwen2MoeModel (so TextModel's
metadata, byte-level BPE vocabulary, no pooling): qwen3's attention
(NEOX rope, per-head Q/K norms, head_dim from config.json) and, in place of the dense FFN, a
router (mlp.gate -> ffn_gate_inp, kept F32) and per-expert gate/up/down matrices stacked into
one 3-D tensor per kind (ffn_gate_exps / ffn_up_exps / ffn_down_exps), with expert_count,
expert_used_count and expert_feed_forward_length (moe_intermediate_size) written.

The runtime routes as llama.cpp's build_moe_ffn does for it: softmax over the router's logits,
the top expert_used_count experts, their weights renormalized to sum 1 (norm_w).  llama.cpp
does that whatever config.json's norm_topk_prob says, and has every block sparse: folders whose
norm_topk_prob is false, or with dense layers (mlp_only_layers, decoder_sparse_step > 1), would
convert into files llama.cpp computes differently from the checkpoint, so they are refused.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
from gguf import MODEL_ARCH, MODEL_TENSOR

from ..errors import ModelError
from . import qwen2, qwen3
from ..files import hf_vocab
from .base import ExpertStacking, HParams, TensorSpec as T

# the dense FFN a qwen3 block has and a qwen3moe block has not
_DENSE_FFN = (MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_DOWN, MODEL_TENSOR.FFN_UP)

# llama-model.cpp's LLM_ARCH_QWEN3MOE block FFN: router, then the stacked experts
MOE_FFN = (
    T(MODEL_TENSOR.FFN_GATE_INP, "n_embd n_expert"),
    T(MODEL_TENSOR.FFN_GATE_EXP, "n_embd n_ff_exp n_expert"),
    T(MODEL_TENSOR.FFN_DOWN_EXP, "n_ff_exp n_embd n_expert"),
    T(MODEL_TENSOR.FFN_UP_EXP, "n_embd n_ff_exp n_expert"),
)

TENSORS = tuple(t for t in qwen3.TENSORS if t.key not in _DENSE_FFN) + MOE_FFN

# Qwen2MoeModel.modify_tensors: model.layers.N.mlp.experts.X.{down,gate,up}_proj.weight
STACKING = ExpertStacking(
    marker="experts",
    per_expert="model.layers.{bid}.mlp.experts.{xid}.{kind}.weight",
    merged="model.layers.{bid}.mlp.experts.{kind}.weight",
    kinds=("down_proj", "gate_proj", "up_proj"),
)


def set_expert_params(w: gguf.GGUFWriter, folder: Path, hp: HParams) -> None:
    """Qwen2MoeModel.set_gguf_parameters' additions: the experts' and the shared expert's sizes."""
    if (n_ff_exp := hp.get("moe_intermediate_size")) is not None:
        w.add_expert_feed_forward_length(n_ff_exp)
    if (n_ff_shexp := hp.get("shared_expert_intermediate_size")) is not None:
        w.add_expert_shared_feed_forward_length(n_ff_shexp)


def check_sparse_layers(hp: HParams) -> None:
    """llama.cpp's qwen2moe / qwen3moe graphs route every block through experts."""
    if hp.get("mlp_only_layers"):
        raise ModelError(f"mlp_only_layers {hp['mlp_only_layers']} (dense FFN blocks among the expert ones) "
                         "is not supported: llama.cpp's graph has experts in every block")
    if hp.get("decoder_sparse_step", 1) not in (1, None):
        raise ModelError(f"decoder_sparse_step {hp['decoder_sparse_step']} (dense FFN blocks between the expert "
                         "ones) is not supported: llama.cpp's graph has experts in every block")


def _check(folder: Path, hp: HParams, hf_class: str) -> None:
    check_sparse_layers(hp)
    if not hp.get("norm_topk_prob", False):
        raise ModelError("norm_topk_prob false is not supported for Qwen3MoeForCausalLM: llama.cpp "
                         "renormalizes the top-k expert weights of every qwen3moe model")


ARCH = replace(
    qwen3.ARCH,
    model_arch=MODEL_ARCH.QWEN3MOE,
    hf_classes=("Qwen3MoeForCausalLM",),
    config_defaults={"qwen3_moe": {**qwen2.ARCH.config_defaults["qwen2"],
                                   **dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                                          num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                                          decoder_sparse_step=1, moe_intermediate_size=768, num_experts_per_tok=8,
                                          num_experts=128, norm_topk_prob=False, mlp_only_layers=[])}},
    set_params=set_expert_params,
    set_vocab=hf_vocab.set_vocab_gpt2,
    check=_check,
    hf_experts=STACKING,
    tensors=TENSORS,
    expert_norm=True,
)
