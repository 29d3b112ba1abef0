"""phi3 (Phi3ForCausalLM): Phi-3 (mini, small context and 128k LongRoPE) and Phi-4-mini.

Conversion follows convert_hf_to_gguf.py's Phi3MiniModel:

* its own set_gguf_parameters, in place of TextModel's: rope.dimension_count from
  partial_rotary_factor (Phi-4-mini rotates 3/4 of each head), rope.scaling.original_context_length,
  attention.sliding_window (0 when config.json has none);
* LongRoPE (rope_scaling long_factor / short_factor): rope_factors_long / rope_factors_short
  tensors and rope.scaling.attn_factor, which the converter writes while it prepares the
  tensors, so before every other key but general.architecture;
* the vocabulary: a SentencePiece tokenizer.model padded to vocab_size with [PAD{i}] tokens, the
  added tokens of added_tokens.json, tokenizer_config.json and tokenizer.json (user-defined, or
  control when special); Phi-4-mini's GPT2Tokenizer as byte-level BPE;
* HF's layout kept: fused qkv_proj -> attn_qkv, gate_up_proj -> ffn_up of 2 * n_ff rows (gate
  first), rotate-half Q/K rows (NEOX rope).

Runtime (src/models/phi3.cpp): llama's block with the fused matrices split after their
products, Q scaled by 1/sqrt(head_dim) before attention (`scale_q`), and rope factors chosen
as llama.cpp chooses them (long when the context exceeds the original one, else short).
Sliding-window attention: llama.cpp disables it for phi3 (it reads attention.sliding_window,
warns, and attends to the whole context), and so does kquant: the same results as llama.cpp,
which differ from transformers' beyond the window.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR, TokenType

from ..errors import ModelError
from ..files import hf_vocab
from ..files.safetensors import read_json
from .base import Arch, HParams, TensorSpec as T

_LONGROPE = ("longrope", "su", "yarn")  # transformers' Phi3Config turns su and yarn into longrope


def _rope(hp: HParams) -> dict[str, Any]:
    """The converter's rope_parameters for a Phi3Config: partial_rotary_factor 1.0 unless given,
    original_max_position_embeddings from the config's own field (Phi3Config always has one)."""
    rope = dict(hp["rope_parameters"])
    rope.setdefault("partial_rotary_factor", hp.get("partial_rotary_factor", 1.0))
    orig = hp["original_max_position_embeddings"]
    if str(rope.get("rope_type", "")).lower() in _LONGROPE:
        rope["original_max_position_embeddings"] = orig
    else:
        rope.setdefault("original_max_position_embeddings", orig)
    return rope


def _rope_dims(hp: HParams, rope: dict[str, Any]) -> int:
    return int(rope["partial_rotary_factor"] * hp["hidden_size"]) // hp["num_attention_heads"]


def _check(folder: Path, hp: HParams, hf_class: str) -> None:
    """What transformers' Phi3Config.validate_rope and the converter refuse."""
    rope = _rope(hp)
    rope_type = str(rope.get("rope_type", "")).lower()
    if rope_type not in ("default",) + _LONGROPE:
        raise ModelError(f"{folder}: Phi-3 rope_scaling type {rope_type!r} is not supported "
                         "(transformers' Phi3Config takes default or longrope)")
    half = _rope_dims(hp, rope) // 2
    long, short = rope.get("long_factor"), rope.get("short_factor")
    for key, factors in (("long_factor", long), ("short_factor", short)):
        if factors is None:
            continue
        if not isinstance(factors, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                    for x in factors):
            raise ModelError(f"{folder}: rope_scaling {key} is not a list of numbers")
        if len(factors) != half:
            raise ModelError(f"{folder}: rope_scaling {key} has {len(factors)} values; the "
                             f"{2 * half} rotated dimensions of a head take {half}")
    if long and short is None:
        raise ModelError(f"{folder}: rope_scaling has long_factor but no short_factor")


def _rope_factors(hp: HParams) -> tuple[float, list, list] | None:
    """Phi3MiniModel.generate_extra_tensors: (attn_factor, long, short) for LongRoPE checkpoints."""
    rope = _rope(hp)
    long = rope.get("long_factor")
    if not long:
        return None
    scale = hp["max_position_embeddings"] / rope["original_max_position_embeddings"]
    if str(rope.get("rope_type", "")).lower() == "yarn":  # unreachable after transformers' config
        attn_factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(rope["original_max_position_embeddings"])) \
            if scale > 1.0 else 1.0
    return attn_factor, long, rope["short_factor"]


def _extra_tensors(hp: HParams) -> list[tuple[MODEL_TENSOR, np.ndarray]]:
    factors = _rope_factors(hp)
    if factors is None:
        return []
    _, long, short = factors
    return [(MODEL_TENSOR.ROPE_FACTORS_LONG, np.array(long, np.float32)),
            (MODEL_TENSOR.ROPE_FACTORS_SHORT, np.array(short, np.float32))]


def _tensor_params(w: gguf.GGUFWriter, hp: HParams) -> None:
    if (factors := _rope_factors(hp)) is not None:
        w.add_rope_scaling_attn_factors(factors[0])


def _own_params(w: gguf.GGUFWriter, hp: HParams, block_count: int, ftype: gguf.LlamaFileType) -> None:
    """Phi3MiniModel.set_gguf_parameters (it does not call TextModel's)."""
    rope = _rope(hp)
    w.add_context_length(hp.get("n_positions", hp["max_position_embeddings"]))
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(block_count)
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_rope_dimension_count(_rope_dims(hp, rope))
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    w.add_file_type(ftype)
    sliding_window = hp.get("sliding_window")
    w.add_sliding_window(0 if sliding_window is None else sliding_window)


def _set_vocab(w: gguf.GGUFWriter, folder: Path, hp: HParams) -> None:
    """Phi3MiniModel.set_vocab."""
    tc_path = folder / "tokenizer_config.json"
    tc = read_json(tc_path, "tokenizer config") if tc_path.is_file() else None
    if tc is not None:
        if "tokenizer_class" not in tc:  # the converter reads it unconditionally
            raise ModelError(f"{tc_path}: no tokenizer_class")
        if tc["tokenizer_class"] == "GPT2Tokenizer":  # Phi-4
            hf_vocab.set_vocab_gpt2(w, folder, hp)
            return
    if not (folder / "tokenizer.model").is_file():
        raise ModelError(f"{folder}: no tokenizer.model (Phi-3's SentencePiece tokenizer)")
    pieces = hf_vocab.sentencepiece_pieces(folder)
    vocab_size = hp["vocab_size"]
    if len(pieces) > vocab_size:  # the converter fails with an IndexError
        raise ModelError(f"{folder}: tokenizer.model has {len(pieces)} tokens, more than config.json's "
                         f"vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    toktypes = [int(TokenType.UNUSED)] * vocab_size
    for token_id, (piece, score, toktype) in enumerate(pieces):
        tokens[token_id], scores[token_id], toktypes[token_id] = piece, score, toktype

    def added(token_id: Any, content: Any, special: bool, source: str) -> None:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size \
                or not isinstance(content, str):
            raise ModelError(f"{folder}: {source}: added token {json.dumps(content)} has id {token_id!r}, "
                             f"not one of the {vocab_size} of config.json's vocab_size")
        tokens[token_id] = content.encode("utf-8")
        scores[token_id] = -1000.0
        toktypes[token_id] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)

    at_path = folder / "added_tokens.json"
    if at_path.is_file():
        for content, token_id in read_json(at_path, "added tokens").items():
            if isinstance(token_id, int) and token_id >= vocab_size:
                continue  # the converter skips these
            added(token_id, content, False, at_path.name)
    for tid, data in ((tc or {}).get("added_tokens_decoder") or {}).items():
        added(int(tid) if str(tid).isdecimal() else tid, data.get("content"), bool(data.get("special")), tc_path.name)
    tj_path = folder / "tokenizer.json"
    if tj_path.is_file():
        for data in read_json(tj_path, "tokenizer").get("added_tokens", []):
            added(data.get("id"), data.get("content"), bool(data.get("special")), tj_path.name)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([t.decode("utf-8") for t in tokens])
    w.add_token_scores(scores)
    w.add_token_types(toktypes)
    hf_vocab.SpecialVocab(folder, n_vocab=len(tokens)).add_to(w)


# llama-model.cpp's LLM_ARCH_PHI3 tensors (llama_model_phi3::load_arch_tensors), in its order:
# Q/K/V fused (attn_qkv) or separate, neither required by the loader (the runtime needs one);
# attn_output and the fused ffn_up sized by n_embd as llama.cpp sizes them; the rope factors
# are one tensor each, shared by every block
TENSORS = (
    T(MODEL_TENSOR.TOKEN_EMBD, "n_embd n_vocab"),
    T(MODEL_TENSOR.OUTPUT_NORM, "n_embd"),
    T(MODEL_TENSOR.OUTPUT, "n_embd n_vocab", required=False),  # absent: tied to token_embd
    T(MODEL_TENSOR.ROPE_FACTORS_LONG, "n_rot_half", required=False),
    T(MODEL_TENSOR.ROPE_FACTORS_SHORT, "n_rot_half", required=False),
    T(MODEL_TENSOR.ATTN_NORM, "n_embd"),
    T(MODEL_TENSOR.ATTN_QKV, "n_embd n_embd+n_k+n_v", required=False),
    T(MODEL_TENSOR.ATTN_QKV, "n_embd+n_k+n_v", "bias", required=False),
    T(MODEL_TENSOR.ATTN_Q, "n_embd n_embd", required=False),
    T(MODEL_TENSOR.ATTN_K, "n_embd n_k", required=False),
    T(MODEL_TENSOR.ATTN_V, "n_embd n_v", required=False),
    T(MODEL_TENSOR.ATTN_Q, "n_embd", "bias", required=False),
    T(MODEL_TENSOR.ATTN_K, "n_k", "bias", required=False),
    T(MODEL_TENSOR.ATTN_V, "n_v", "bias", required=False),
    T(MODEL_TENSOR.ATTN_OUT, "n_embd n_embd"),
    T(MODEL_TENSOR.FFN_NORM, "n_embd"),
    T(MODEL_TENSOR.FFN_DOWN, "n_ff n_embd"),
    T(MODEL_TENSOR.FFN_UP, "n_embd 2*n_ff"),
)

ARCH = Arch(
    model_arch=MODEL_ARCH.PHI3,
    hf_classes=("Phi3ForCausalLM",),
    config_defaults={
        "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=4096,
                     original_max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     sliding_window=None),
    },
    check=_check,
    own_params=_own_params,
    set_vocab=_set_vocab,
    extra_tensors=_extra_tensors,
    tensor_params=_tensor_params,
    tensors=TENSORS,
    rope_neox=True,
    scale_q=True,
)
