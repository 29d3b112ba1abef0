"""qwen2 (Qwen2ForCausalLM): Qwen 1.5 / 2 / 2.5.

Conversion follows convert_hf_to_gguf.py's Qwen2Model: HF's Q/K layout kept (the runtime rotates
the two halves of each head, NEOX), Q/K/V biases in every block, and a sentence-transformers
pooling type when the folder has one.
"""
from __future__ import annotations

from pathlib import Path

import gguf
from gguf import MODEL_ARCH

from ..errors import ModelError
from ..files.safetensors import read_json
from . import llama
from .base import Arch, HParams


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


# llama-model.cpp's LLM_ARCH_QWEN2 tensors: llama's dense set.
# The converter writes Q/K/V biases for every block; llama.cpp takes them (and an output bias)
# wherever they are, for every arch (create_tensor_qkv's TENSOR_NOT_REQUIRED).
TENSORS = llama.DENSE

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
