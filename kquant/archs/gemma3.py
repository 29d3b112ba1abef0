"""gemma3 (Gemma3ForCausalLM, and the text model of Gemma3ForConditionalGeneration): Gemma 3.

Conversion follows convert_hf_to_gguf.py's Gemma3Model (conversion/gemma.py):

* hyper-parameters as transformers' Gemma3TextConfig gives them (`hparams`): rope_parameters per
  layer type ("full_attention": rope_theta, default 1e6, and rope_scaling; "sliding_attention":
  rope_local_base_freq, default 1e4); Gemma3ForConditionalGeneration's text_config merged over
  its top level, as TextModel does;
* TextModel's set_gguf_parameters (rope.freq_base and rope.freq_base_swa, a linear rope
  scaling factor), then Gemma3Model's additions (`set_params`): final_logit_softcapping when
  set, attention.sliding_window unless sliding_window_pattern is 1;
* every "norm.weight" gets 1 added (Gemma's (1 + w) RMSNorm; q_norm and k_norm too);
* token_embd keeps the vocabulary's rows only (`trim_embd_to_vocab`); the vision tower and the
  multi-modal projector are TextModel's skipped tensors (no mmproj file is written);
* the vocabulary: the SentencePiece tokenizer.model, add_space_prefix false.

Runtime (src/models/gemma3.cpp): the embeddings scaled by sqrtf(n_embd); per block
attn_norm -> Q/K/V -> q_norm / k_norm per head -> rope -> Q scaled by f_attention_scale ->
attention -> attn_post_norm -> + residual -> ffn_norm -> GeGLU -> ffn_post_norm -> + residual;
with attention.sliding_window > 0, layer il attends to a window where il % 6 < 5 (or as
attention.sliding_window_pattern says) and ropes with rope.freq_base_swa (default 10000) at
scale 1, the other layers with rope.freq_base and the linear scaling factor; no attention
soft-capping; the logits soft-capped only where final_logit_softcapping is set.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR

from ..errors import ModelError
from ..files import hf_vocab
from .base import Arch, Dims, HParams, TensorSpec as T

# llama.cpp's load_swa_pattern(ml, 6): the converter writes no pattern, so every 6th layer is global
SWA_PATTERN = 6
# transformers' Gemma3TextConfig.default_theta
_THETA_GLOBAL, _THETA_LOCAL = 1_000_000.0, 10_000.0

_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072, rms_norm_eps=1e-6,
    tie_word_embeddings=True, sliding_window=4096, final_logit_softcapping=None, attn_logit_softcapping=None,
    query_pre_attn_scalar=256, use_bidirectional_attention=False, layer_types=None)


def _text_hparams(text: dict[str, Any]) -> HParams:
    """Gemma3TextConfig(**text).to_dict() for the keys the converter reads."""
    hp = dict(_TEXT_DEFAULTS)
    hp.update(text)
    rope_scaling = hp.pop("rope_scaling", None)
    theta, local_theta = hp.pop("rope_theta", _THETA_GLOBAL), hp.pop("rope_local_base_freq", _THETA_LOCAL)
    rope = copy.deepcopy(hp.get("rope_parameters")) or {"sliding_attention": {"rope_type": "default"},
                                                         "full_attention": {"rope_type": "default"}}
    if not isinstance(rope, dict):
        raise ModelError(f"config.json's rope_parameters is {rope!r}, not an object")
    if rope_scaling is not None:
        rope.setdefault("full_attention", {"rope_type": "default"}).update(rope_scaling)
    for kind, default in (("full_attention", theta), ("sliding_attention", local_theta)):
        params = rope.get(kind) or {"rope_type": "default"}
        params.setdefault("rope_theta", default)
        params.setdefault("rope_type", params.get("type", "default"))
        rope[kind] = params
    hp["rope_parameters"] = rope
    if hp.get("num_key_value_heads") is None:
        hp["num_key_value_heads"] = hp["num_attention_heads"]
    if hp["layer_types"] is None:  # transformers: every sliding_window_pattern-th layer global
        pattern = hp.get("sliding_window_pattern", SWA_PATTERN)
        hp["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                             for i in range(hp["num_hidden_layers"])]
    return hp


def hparams(config: dict[str, Any]) -> HParams:
    """AutoConfig(...).to_dict() as TextModel sees it: Gemma3Config's text_config over its top
    level (Gemma3ForConditionalGeneration), or the Gemma3TextConfig itself."""
    text = config.get("text_config")
    if text is None:
        if config.get("model_type") == "gemma3":  # Gemma3Config: its text_config's defaults
            raise ModelError("config.json: model_type 'gemma3' (the multimodal Gemma3Config) without a "
                             "text_config; a text-only Gemma 3 is model_type 'gemma3_text'")
        return _text_hparams(config)
    if not isinstance(text, dict):
        raise ModelError(f"config.json's text_config is {text!r}, not an object")
    top = {k: v for k, v in config.items() if k != "text_config"}
    return {**top, **_text_hparams(text)}


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of config.json that holds the text model's sizes."""
    return config.get("text_config") or config


def q_scale(dims: Dims) -> float:
    """llama_model_gemma3's f_attention_scale: the 27B (62 layers) by n_embd / n_head (its
    query_pre_attn_scalar), the others by head_dim."""
    size = dims.n_embd // dims.n_head if dims.n_layer == 62 else dims.head_dim
    return float(np.float32(1.0) / np.sqrt(np.float32(size)))


def check(folder: Path, hp: HParams, hf_class: str) -> None:
    """Refuse what the converter refuses, and what it writes but llama.cpp would then compute
    differently from the model (settings llama.cpp's gemma3 graph does not read)."""
    if hp.get("attn_logit_softcapping") is not None:  # the converter's assert
        raise ModelError(f"{folder}: config.json's attn_logit_softcapping is set; Gemma 3 has none "
                         "(convert_hf_to_gguf.py refuses it)")
    if hp.get("use_bidirectional_attention"):
        raise ModelError(f"{folder}: bidirectional attention (EmbeddingGemma) is not supported")
    if not (folder / "tokenizer.model").is_file():
        raise ModelError(f"{folder}: no tokenizer.model (kquant converts Gemma 3 with its SentencePiece "
                         "tokenizer)")
    pattern = hp.get("sliding_window_pattern")
    window = hp.get("sliding_window")
    if pattern != 1:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ModelError(f"{folder}: config.json's sliding_window is {window!r}; Gemma 3 takes an integer >= 1")
        want = ["sliding_attention" if il % SWA_PATTERN < SWA_PATTERN - 1 else "full_attention"
                for il in range(hp["num_hidden_layers"])]
        if list(hp["layer_types"]) != want:
            raise ModelError(f"{folder}: config.json's layer_types (sliding_window_pattern) differ from "
                             f"llama.cpp's Gemma 3 pattern (every {SWA_PATTERN}th layer global)")
    rope = hp["rope_parameters"]
    full, local = rope["full_attention"], rope["sliding_attention"]
    if full["rope_type"] not in ("default", "linear") or (full["rope_type"] == "linear" and not full.get("factor")):
        raise ModelError(f"{folder}: rope scaling {full['rope_type']!r} of the global layers is not supported "
                         "for Gemma 3 (kquant runs linear scaling)")
    if local["rope_type"] != "default":
        raise ModelError(f"{folder}: rope scaling {local['rope_type']!r} of the sliding-window layers is not "
                         "supported (llama.cpp's Gemma 3 ropes them unscaled)")
    n_layer, n_embd, n_head = hp["num_hidden_layers"], hp["hidden_size"], hp["num_attention_heads"]
    scalar = hp.get("query_pre_attn_scalar")
    used = n_embd // n_head if n_layer == 62 else hp["head_dim"]
    if scalar is not None and (isinstance(scalar, bool) or not isinstance(scalar, (int, float))
                               or not math.isclose(scalar, used)):
        raise ModelError(f"{folder}: config.json's query_pre_attn_scalar is {scalar!r}, but llama.cpp's Gemma 3 "
                         f"scales queries by 1/sqrt({used})")


def set_params(w: gguf.GGUFWriter, folder: Path, hp: HParams) -> None:
    """Gemma3Model.set_gguf_parameters after TextModel's: keys written twice keep their first place."""
    w.add_context_length(hp.get("max_position_embeddings", 131072))
    w.add_head_count(hp.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    w.add_key_length(hp.get("head_dim", 256))
    w.add_value_length(hp.get("head_dim", 256))
    w.add_rope_freq_base(hp["rope_parameters"]["full_attention"].get("rope_theta", 1_000_000.0))
    if final_cap := hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(final_cap)
    if hp.get("sliding_window_pattern") != 1:
        w.add_sliding_window(hp["sliding_window"])
    w.add_head_count_kv(hp.get("num_key_value_heads", 4))


def set_vocab(w: gguf.GGUFWriter, folder: Path, hp: HParams) -> None:
    """Gemma3Model.set_vocab for a tokenizer.model: SentencePiece, no space prefix."""
    hf_vocab.set_vocab_sentencepiece(w, folder, hp)
    w.add_add_space_prefix(False)


# llama-model.cpp's LLM_ARCH_GEMMA3 tensors (llama_model_gemma3::load_arch_tensors), in its
# order: output optional (absent: token_embd), Q/K/V biases optional as for every arch;
# EmbeddingGemma's optional dense_2/dense_3 left out (a file with them is refused: not run)
TENSORS = (
    T(MODEL_TENSOR.TOKEN_EMBD, "n_embd n_vocab"),
    T(MODEL_TENSOR.OUTPUT_NORM, "n_embd"),
    T(MODEL_TENSOR.OUTPUT, "n_embd n_vocab", required=False),
    T(MODEL_TENSOR.ATTN_NORM, "n_embd"),
    T(MODEL_TENSOR.ATTN_Q, "n_embd n_q"),
    T(MODEL_TENSOR.ATTN_K, "n_embd n_k"),
    T(MODEL_TENSOR.ATTN_V, "n_embd n_v"),
    T(MODEL_TENSOR.ATTN_Q, "n_q", "bias", required=False),
    T(MODEL_TENSOR.ATTN_K, "n_k", "bias", required=False),
    T(MODEL_TENSOR.ATTN_V, "n_v", "bias", required=False),
    T(MODEL_TENSOR.ATTN_OUT, "n_q n_embd"),
    T(MODEL_TENSOR.ATTN_POST_NORM, "n_embd"),
    T(MODEL_TENSOR.ATTN_K_NORM, "head_dim"),
    T(MODEL_TENSOR.ATTN_Q_NORM, "head_dim"),
    T(MODEL_TENSOR.FFN_NORM, "n_embd"),
    T(MODEL_TENSOR.FFN_GATE, "n_embd n_ff"),
    T(MODEL_TENSOR.FFN_UP, "n_embd n_ff"),
    T(MODEL_TENSOR.FFN_DOWN, "n_ff n_embd"),
    T(MODEL_TENSOR.FFN_POST_NORM, "n_embd"),
)

ARCH = Arch(
    model_arch=MODEL_ARCH.GEMMA3,
    hf_classes=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    config_defaults={"gemma3_text": _TEXT_DEFAULTS, "gemma3": _TEXT_DEFAULTS},
    hparams=hparams,
    text_config=text_config,
    norm_shift=1.0,
    trim_embd_to_vocab=True,
    check=check,
    set_params=set_params,
    set_vocab=set_vocab,
    tensors=TENSORS,
    rope_neox=True,
    scale_q=True,
    q_scale=q_scale,
    scale_embd=True,
    ffn_act="gelu",
    final_softcap_key=True,
    swa_pattern=SWA_PATTERN,
    swa_window=0,
    swa_rope_base=10_000.0,
)
