"""gemma2 (Gemma2ForCausalLM): Gemma 2.

Conversion follows convert_hf_to_gguf.py's Gemma2Model:

* its own set_gguf_parameters, in place of TextModel's: the sizes, key/value length from
  head_dim, attention.layer_norm_rms_epsilon, attn_logit_softcapping, final_logit_softcapping
  and attention.sliding_window (no rope keys: llama.cpp's defaults, base 10000, every dimension);
* Gemma's RMSNorm multiplies by (1 + w): the converter adds 1 to every "norm.weight" (`norm_shift`);
* HF's rotate-half Q/K rows kept (NEOX rope), lm_head.weight dropped (the output is token_embd);
* the vocabulary: the SentencePiece tokenizer.model (TextModel's), add_space_prefix false.

Runtime (src/models/gemma2.cpp): the embeddings scaled by sqrtf(n_embd); per block
attn_norm -> attention -> attn_post_norm -> + residual -> ffn_norm -> GeGLU (ggml's tanh GELU
through its float16 table) -> ffn_post_norm -> + residual; Q scaled by f_attention_scale
(1/sqrt(head_dim), 1/sqrt(n_embd/n_head) for the 46-layer 27B) before attention, the scores
soft-capped (cap * tanh(s / cap)); even layers attend to a sliding window of
attention.sliding_window keys (a key n_swa or more positions back is masked), odd layers to the
whole context; the logits soft-capped by final_logit_softcapping.
"""
from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR

from ..errors import ModelError
from ..files import hf_vocab
from .base import Arch, Dims, HParams, TensorSpec as T


def check(folder: Path, hp: HParams, hf_class: str) -> None:
    """What the converter reads unconditionally (a missing one is its KeyError)."""
    for key in ("head_dim", "rms_norm_eps", "sliding_window"):
        if hp.get(key) is None:
            raise ModelError(f"{folder}: config.json has no {key}")


def _check(folder: Path, hp: HParams, hf_class: str) -> None:
    check(folder, hp, hf_class)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = hp.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ModelError(f"{folder}: config.json's {key} is {value!r}; Gemma 2 takes a number > 0")


def _own_params(w: gguf.GGUFWriter, hp: HParams, block_count: int, ftype: gguf.LlamaFileType) -> None:
    """Gemma2Model.set_gguf_parameters (it does not call TextModel's)."""
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(block_count)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_file_type(ftype)
    w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
    w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    w.add_sliding_window(hp["sliding_window"])


def set_vocab(w: gguf.GGUFWriter, folder: Path, hp: HParams) -> None:
    """Gemma2Model.set_vocab: TextModel's SentencePiece vocabulary, no space prefix."""
    if not (folder / "tokenizer.model").is_file():
        raise ModelError(f"{folder}: no tokenizer.model (Gemma's SentencePiece tokenizer)")
    hf_vocab.set_vocab_sentencepiece(w, folder, hp)
    w.add_add_space_prefix(False)


def q_scale(dims: Dims) -> float:
    """llama_model_gemma2's f_attention_scale: the 27B (46 layers) scales by its
    query_pre_attn_scalar, n_embd / n_head; the others by head_dim."""
    size = dims.n_embd // dims.n_head if dims.n_layer == 46 else dims.head_dim
    return float(np.float32(1.0) / np.sqrt(np.float32(size)))


# llama-model.cpp's LLM_ARCH_GEMMA2 tensors (llama_model_gemma2::load_arch_tensors), in its
# order: the output is token_embd (no output.weight); Q/K/V biases optional as for every arch
TENSORS = (
    T(MODEL_TENSOR.TOKEN_EMBD, "n_embd n_vocab"),
    T(MODEL_TENSOR.OUTPUT_NORM, "n_embd"),
    T(MODEL_TENSOR.ATTN_NORM, "n_embd"),
    T(MODEL_TENSOR.ATTN_Q, "n_embd n_q"),
    T(MODEL_TENSOR.ATTN_K, "n_embd n_k"),
    T(MODEL_TENSOR.ATTN_V, "n_embd n_v"),
    T(MODEL_TENSOR.ATTN_Q, "n_q", "bias", required=False),
    T(MODEL_TENSOR.ATTN_K, "n_k", "bias", required=False),
    T(MODEL_TENSOR.ATTN_V, "n_v", "bias", required=False),
    T(MODEL_TENSOR.ATTN_OUT, "n_q n_embd"),
    T(MODEL_TENSOR.ATTN_POST_NORM, "n_embd"),
    T(MODEL_TENSOR.FFN_NORM, "n_embd"),
    T(MODEL_TENSOR.FFN_GATE, "n_embd n_ff"),
    T(MODEL_TENSOR.FFN_UP, "n_embd n_ff"),
    T(MODEL_TENSOR.FFN_DOWN, "n_ff n_embd"),
    T(MODEL_TENSOR.FFN_POST_NORM, "n_embd"),
)

ARCH = Arch(
    model_arch=MODEL_ARCH.GEMMA2,
    hf_classes=("Gemma2ForCausalLM",),
    config_defaults={
        "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=4096,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=256),
    },
    hf_skip=("lm_head.weight",),
    norm_shift=1.0,
    check=_check,
    own_params=_own_params,
    set_vocab=set_vocab,
    tensors=TENSORS,
    rope_neox=True,
    scale_q=True,
    q_scale=q_scale,
    scale_embd=True,
    ffn_act="gelu",
    attn_softcap=50.0,
    final_softcap=30.0,
    swa_pattern=2,
    swa_window=4096,
)
