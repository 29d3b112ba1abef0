"""qwen2 (Qwen2ForCausalLM): Qwen 1.5 / 2 / 2.5.

Conversion follows convert_hf_to_gguf.py's Qwen2Model: HF's Q/K layout kept (the runtime rotates
the two halves of each head, NEOX), Q/K/V biases in every block, and a sentence-transformers
pooling type when the folder has one.
"""
from __future__ import annotations

from pathlib import Path

import gguf
from gguf import MODEL_ARCH, MODEL_TENSOR

from ..errors import ModelError
from ..files.safetensors import read_json
from .base import Arch, HParams, TensorSpec as T


def set_pooling_type(w: gguf.GGUFWriter, folder: Path, hp: HParams) -> None:
    """Qwen2Model.set_gguf_parameters' addition (TextModel._try_set_pooling_type): the pooling of
    a sentence-transformers folder, for embedding models."""
    pooling_path = None
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        for mod in read_json(modules_file, "sentence-transformers modules"):
            if mod["type"].endswith("Pooling"):
                pooling_path = mod["path"]
                break
    mode_mapping = {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "lasttoken": gguf.PoolingType.LAST}
    if pooling_path is not None:
        pooling = read_json(folder / pooling_path / "config.json", "pooling config")
        if pooling.get("pooling_mode_mean_tokens"):
            pooling_type = gguf.PoolingType.MEAN
        elif pooling.get("pooling_mode_cls_token"):
            pooling_type = gguf.PoolingType.CLS
        elif pooling.get("pooling_mode_lasttoken"):
            pooling_type = gguf.PoolingType.LAST
        elif (mode := pooling.get("pooling_mode")) in mode_mapping:
            pooling_type = mode_mapping[mode]
        else:
            raise ModelError("only MEAN, CLS and LAST pooling types are supported")
        w.add_pooling_type(pooling_type)
    if (classifier_pooling := hp.get("classifier_pooling")) is not None:
        if classifier_pooling not in ("cls", "mean"):
            raise ModelError(f"unsupported classifier_pooling: {classifier_pooling}")
        w.add_classifier_pooling_type(mode_mapping[classifier_pooling])


# llama-model.cpp's LLM_ARCH_QWEN2 tensors, in its order; shapes in ggml order (kquant.archs.base.Dims).
# The converter writes Q/K/V biases for every block; llama.cpp takes them (and an output bias)
# wherever they are, for every arch (create_tensor_qkv's TENSOR_NOT_REQUIRED).
TENSORS = (
    T(MODEL_TENSOR.TOKEN_EMBD, "n_embd n_vocab"),
    T(MODEL_TENSOR.OUTPUT_NORM, "n_embd"),
    T(MODEL_TENSOR.OUTPUT, "n_embd n_vocab", required=False),  # absent: tied to token_embd
    T(MODEL_TENSOR.ROPE_FREQS, "n_rot_half", required=False),
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

ARCH = Arch(
    model_arch=MODEL_ARCH.QWEN2,
    hf_classes=("Qwen2ForCausalLM",),
    config_defaults={
        "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, tie_word_embeddings=False),
    },
    set_params=set_pooling_type,
    tensors=TENSORS,
    rope_neox=True,
)
