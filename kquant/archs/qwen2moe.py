"""qwen2moe (Qwen2MoeForCausalLM): Qwen 1.5-MoE / Qwen2-57B-A14B.

Conversion follows convert_hf_to_gguf.py's Qwen2MoeModel (TextModel's metadata, byte-level BPE
vocabulary): qwen2's attention (NEOX rope, Q/K/V biases) and, in place of the dense FFN, the
router (mlp.gate -> ffn_gate_inp), the per-expert matrices stacked into ffn_{gate,up,down}_exps,
and a shared expert every token goes through (mlp.shared_expert.* -> ffn_*_shexp) scaled by a
sigmoid gate of its own (mlp.shared_expert_gate -> ffn_gate_inp_shexp, one row); the experts'
and the shared expert's sizes are written as expert_feed_forward_length and
expert_shared_feed_forward_length.

The runtime routes as llama.cpp's qwen2moe graph does: softmax over the router's logits, the
top expert_used_count experts with their probabilities as they are (no renormalization: norm_w
false), plus sigmoid(h . ffn_gate_inp_shexp) times the shared expert's SwiGLU FFN.  Folders that
ask for something else (norm_topk_prob true, dense layers) are refused, as for qwen3moe.
"""
from __future__ import annotations

from pathlib import Path

from gguf import MODEL_ARCH, MODEL_TENSOR

from ..errors import ModelError
from ..files import hf_vocab
from . import qwen2, qwen3moe
from .base import Arch, HParams, TensorSpec as T

# llama-model.cpp's LLM_ARCH_QWEN2MOE: qwen2's attention, the experts, then the shared expert
SHARED_EXPERT = (
    T(MODEL_TENSOR.FFN_GATE_INP_SHEXP, "n_embd"),
    T(MODEL_TENSOR.FFN_GATE_SHEXP, "n_embd n_ff_shexp"),
    T(MODEL_TENSOR.FFN_DOWN_SHEXP, "n_ff_shexp n_embd"),
    T(MODEL_TENSOR.FFN_UP_SHEXP, "n_embd n_ff_shexp"),
)
_DENSE_FFN = (MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_DOWN, MODEL_TENSOR.FFN_UP)
# the output matrix is required: llama.cpp's qwen2moe loader does not fall back to token_embd
_ATTENTION = tuple(T(t.key, t.shape, t.suffix) if t.key == MODEL_TENSOR.OUTPUT else t
                   for t in qwen2.TENSORS if t.key not in _DENSE_FFN)
TENSORS = _ATTENTION + qwen3moe.MOE_FFN + SHARED_EXPERT


def _check(folder: Path, hp: HParams, hf_class: str) -> None:
    qwen3moe.check_sparse_layers(hp)
    if hp.get("norm_topk_prob", False):
        raise ModelError("norm_topk_prob true is not supported for Qwen2MoeForCausalLM: llama.cpp's "
                         "qwen2moe graph does not renormalize the top-k expert weights")


ARCH = Arch(
    model_arch=MODEL_ARCH.QWEN2MOE,
    hf_classes=("Qwen2MoeForCausalLM",),
    config_defaults={
        "qwen2_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                          num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=32768,
                          rms_norm_eps=1e-6, tie_word_embeddings=False, decoder_sparse_step=1,
                          moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                          num_experts_per_tok=4, num_experts=60, norm_topk_prob=False, mlp_only_layers=[]),
    },
    set_params=qwen3moe.set_expert_params,
    set_vocab=hf_vocab.set_vocab_gpt2,
    check=_check,
    hf_experts=qwen3moe.STACKING,
    tensors=TENSORS,
    rope_neox=True,
    expert_norm=False,
)
