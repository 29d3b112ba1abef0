"""`Arch`: what kquant knows about one GGUF architecture, filled in by its file in kquant/archs/.

One record serves both ends of kquant:

* conversion (kquant.files.hf, a port of llama.cpp's convert_hf_to_gguf.py): the Hugging Face
  classes it converts, transformers' config defaults, whether Q/K rows are permuted, and hooks
  for the few steps where the converter runs code of its own for the architecture (extra
  metadata, vocabulary quirks, refusals, generated tensors);
* the runtime (kquant.runtime): the rope style and the optional parts of a block.

Rules are plain data wherever the converter's are (gguf-py's tensor_mapping.py style); the
hooks default to what the converter does for an architecture that adds nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR

from ..files import hf_vocab

__all__ = ["Arch", "HParams", "tensor_name", "BLOCK_PREFIX"]

# config.json after transformers' defaults (kquant.files.hf._hparams)
HParams = dict[str, Any]

# what every block tensor's GGUF name starts with ("blk.")
BLOCK_PREFIX = gguf.TENSOR_NAMES[MODEL_TENSOR.ATTN_NORM].partition("{bid}")[0]


def tensor_name(key: MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    """The GGUF name of tensor `key` (of block `bid`): gguf's TENSOR_NAMES plus ".weight"/".bias"."""
    return f"{gguf.TENSOR_NAMES[key].format(bid=bid)}.{suffix}"


def _no_params(w: gguf.GGUFWriter, folder: Path, hp: HParams) -> None:
    """An architecture that writes no metadata beyond TextModel.set_gguf_parameters'."""


def _no_check(folder: Path, hp: HParams, hf_class: str) -> None:
    """An architecture that refuses nothing beyond what every conversion refuses."""


def _no_extra_tensors(hp: HParams) -> list[tuple[MODEL_TENSOR, np.ndarray]]:
    return []


@dataclass(frozen=True)
class Arch:
    model_arch: MODEL_ARCH
    # --- Hugging Face -> GGUF ---------------------------------------------------------------
    # config.json "architectures" classes converted to this architecture
    hf_classes: tuple[str, ...]
    # transformers' config defaults (5.x) for the fields the converter reads, by config.json
    # model_type; None: computed in the config's __post_init__
    config_defaults: Mapping[str, Mapping[str, Any]]
    # transformers computes a missing head_dim as hidden_size / num_attention_heads
    head_dim_from_heads: bool = False
    default_rope_theta: float = 10_000.0
    # the converter permutes HF's rotate-half Q/K rows to GGML's interleaved rope layout
    permute_qk: bool = False
    # substrings the converter removes from HF tensor names before mapping them
    hf_name_drop: tuple[str, ...] = ()
    # metadata written after the generic hyperparameters (the class's set_gguf_parameters)
    set_params: Callable[[gguf.GGUFWriter, Path, HParams], None] = _no_params
    # tokenizer.ggml.* metadata (the class's set_vocab)
    set_vocab: Callable[[gguf.GGUFWriter, Path, HParams], None] = hf_vocab.set_vocab
    # raises ModelError for folders of this class that kquant does not convert
    check: Callable[[Path, HParams, str], None] = _no_check
    # tensors the converter generates, written before the folder's (generate_extra_tensors)
    extra_tensors: Callable[[HParams], list[tuple[MODEL_TENSOR, np.ndarray]]] = _no_extra_tensors
    # --- runtime ----------------------------------------------------------------------------
    # llama.cpp's rope type: NEOX rotates (i, i + n_rot/2), NORM adjacent pairs (2i, 2i + 1)
    rope_neox: bool = False
    # every block RMS-normalizes each Q and K head (attn_q_norm / attn_k_norm), tensors
    # llama.cpp's loader requires for such an arch. (Q/K/V and output biases it takes wherever
    # they are, for every arch: create_tensor_qkv's TENSOR_NOT_REQUIRED; so does the runtime.)
    qk_norm: bool = False

    @property
    def name(self) -> str:
        """The GGUF name (general.architecture, the metadata key prefix)."""
        return gguf.MODEL_ARCH_NAMES[self.model_arch]

    def tensor_map(self, n_blocks: int) -> gguf.TensorNameMap:
        """gguf's HF -> GGUF tensor name map for this architecture."""
        return gguf.get_tensor_name_map(self.model_arch, n_blocks)
