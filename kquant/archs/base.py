"""`Arch`: what kquant knows about one GGUF architecture, filled in by its file in kquant/archs/.

One record serves both ends of kquant:

* conversion (kquant.files.hf, a port of llama.cpp's convert_hf_to_gguf.py): the Hugging Face
  classes it converts, transformers' config defaults, whether Q/K rows are permuted, and hooks
  for the few steps where the converter runs code of its own for the architecture (extra
  metadata, vocabulary quirks, refusals, generated tensors);
* both: the tensors llama.cpp's loader creates for the architecture (`tensors`, a table of
  `TensorSpec`: name, shape in hyper-parameters, required or not), against which
  kquant.archs.checks checks a converted folder and a model given to the runtime;
* the runtime (kquant.runtime): the rope style, where the attention scale is applied, and the
  block's extras (embedding scale, post-norms, GeGLU, soft-capping, sliding-window attention).

Rules are plain data wherever the converter's are (gguf-py's tensor_mapping.py style); the
hooks default to what the converter does for an architecture that adds nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR

from ..files import hf_vocab

__all__ = ["Arch", "HParams", "Dims", "TensorSpec", "ExpertStacking", "tensor_name", "BLOCK_PREFIX", "inv_sqrt_head_dim"]

# config.json after transformers' defaults (kquant.files.hf._hparams)
HParams = dict[str, Any]

# what every block tensor's GGUF name starts with ("blk.")
BLOCK_PREFIX = gguf.TENSOR_NAMES[MODEL_TENSOR.ATTN_NORM].partition("{bid}")[0]


def tensor_name(key: MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    """The GGUF name of tensor `key` (of block `bid`): gguf's TENSOR_NAMES plus ".weight"/".bias"."""
    return f"{gguf.TENSOR_NAMES[key].format(bid=bid)}.{suffix}"


@dataclass(frozen=True)
class Dims:
    """The sizes a model's tensor shapes are made of, from its GGUF metadata (llama_hparams)."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int    # attention.key_length (n_embd_head_k)
    head_dim_v: int  # attention.value_length (n_embd_head_v)
    n_rot: int       # rope.dimension_count
    n_vocab: int     # the tokenizer's token count, as llama.cpp sizes token_embd
    # mixture of experts (0 where the model has none): {arch}.expert_count, the rows of each
    # expert's gate/up (expert_feed_forward_length, else n_ff / expert_used_count) and of the
    # shared expert's (expert_shared_feed_forward_length, else n_ff)
    n_expert: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0

    @property
    def n_q(self) -> int:
        """Query rows of attn_q: n_head * n_embd_head_k."""
        return self.n_head * self.head_dim

    @property
    def n_k(self) -> int:
        """Key rows of attn_k: n_embd_k_gqa."""
        return self.n_head_kv * self.head_dim

    @property
    def n_v(self) -> int:
        """Value rows of attn_v: n_embd_v_gqa."""
        return self.n_head_kv * self.head_dim_v

    @property
    def n_rot_half(self) -> int:
        """Entries of rope_freqs: one per rotated pair."""
        return self.n_rot // 2


_DIM_NAMES = frozenset(f.name for f in fields(Dims)) | {"n_q", "n_k", "n_v", "n_rot_half"}


def _terms(size: str) -> list[tuple[int, str]]:
    """One size of a shape: a sum of sizes, each maybe times a count ("n_embd+n_k+n_v", "2*n_ff")."""
    out = []
    for term in size.split("+"):
        count, _, name = term.rpartition("*")
        out.append((int(count) if count else 1, name))
    return out


@dataclass(frozen=True)
class TensorSpec:
    """One tensor llama.cpp's loader creates for an architecture (a create_tensor call of
    llama-model.cpp): `shape` in ggml order (ne[0] first) as names of `Dims` sizes, e.g.
    "n_embd n_vocab", each maybe a sum of sizes times counts ("n_embd+n_k+n_v", "2*n_ff");
    a block tensor (its gguf name has "{bid}") is created in every block."""

    key: MODEL_TENSOR
    shape: str
    suffix: str = "weight"
    required: bool = True  # False: TENSOR_NOT_REQUIRED
    # False: llama.cpp uses it but kquant's runtime has no code for it, so it refuses the model
    runs: bool = True
    # llama.cpp creates it only in models with experts (True: {arch}.expert_count > 0) or only
    # in models without (False: llama's dense FFN beside Mixtral's experts); None: in both
    experts: bool | None = None

    def __post_init__(self) -> None:
        unknown = {name for size in self.shape.split() for _, name in _terms(size)} - _DIM_NAMES
        if unknown:  # a typo in a table is the table's author's error, at import
            raise ValueError(f"{self.key.name}: unknown size(s) {sorted(unknown)} in shape {self.shape!r}")

    @property
    def per_block(self) -> bool:
        return "{bid}" in gguf.TENSOR_NAMES[self.key]

    def size(self, dims: Dims) -> tuple[int, ...]:
        """The shape llama.cpp expects, in ggml order."""
        return tuple(sum(k * getattr(dims, name) for k, name in _terms(size)) for size in self.shape.split())


@dataclass(frozen=True)
class ExpertStacking:
    """How the converter stacks a block's per-expert HF tensors into one 3-D tensor per kind
    (Qwen2MoeModel / LlamaModel.modify_tensors): the HF names holding `marker` are held back
    until all n_expert * len(kinds) of the block are seen, then written as `merged` (a name the
    tensor map knows) for each kind in `kinds`' order, experts stacked in id order."""

    marker: str      # e.g. "mlp.experts"
    per_expert: str  # "model.layers.{bid}.mlp.experts.{xid}.{kind}.weight"
    merged: str      # "model.layers.{bid}.mlp.experts.{kind}.weight"
    kinds: tuple[str, ...]
    # config.json keys of the expert count, the converter's first found
    count_keys: tuple[str, ...] = ("num_local_experts", "num_experts")


def _no_params(w: gguf.GGUFWriter, folder: Path, hp: HParams) -> None:
    """An architecture that writes no metadata beyond TextModel.set_gguf_parameters'."""


def _no_check(folder: Path, hp: HParams, hf_class: str) -> None:
    """An architecture that refuses nothing beyond what every conversion refuses."""


def _no_extra_tensors(hp: HParams) -> list[tuple[MODEL_TENSOR, np.ndarray]]:
    return []


def _no_tensor_params(w: gguf.GGUFWriter, hp: HParams) -> None:
    """An architecture whose generate_extra_tensors writes no metadata."""


def inv_sqrt_head_dim(dims: "Dims") -> float:
    """llama.cpp's usual Q scale: 1.0f/sqrtf(n_embd_head_k), in float32."""
    return float(np.float32(1.0) / np.sqrt(np.float32(dims.head_dim)))


@dataclass(frozen=True)
class Arch:
    model_arch: MODEL_ARCH
    # --- Hugging Face -> GGUF ---------------------------------------------------------------
    # config.json "architectures" classes converted to this architecture
    hf_classes: tuple[str, ...]
    # transformers' config defaults (5.x) for the fields the converter reads, by config.json
    # model_type; None: computed in the config's __post_init__
    config_defaults: Mapping[str, Mapping[str, Any]]
    # the model types whose transformers config computes a missing head_dim as
    # hidden_size / num_attention_heads (MixtralConfig, say, leaves it None)
    head_dim_from_heads: tuple[str, ...] = ()
    # config.json -> hparams where transformers' config class does more than fill in defaults
    # (gemma3: rope parameters per layer type, a text_config nested in a multimodal config);
    # None: the defaults above, then the generic rope handling (kquant.files.hf._hparams)
    hparams: Callable[[dict[str, Any]], HParams] | None = None
    # the part of config.json that states the text model's sizes (checked before defaults
    # fill them in); None: config.json itself, and a nested text_config is refused
    text_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    default_rope_theta: float = 10_000.0
    # the converter permutes HF's rotate-half Q/K rows to GGML's interleaved rope layout
    permute_qk: bool = False
    # substrings the converter removes from HF tensor names before mapping them
    hf_name_drop: tuple[str, ...] = ()
    # HF tensor names the converter drops (its filter_tensors)
    hf_skip: tuple[str, ...] = ()
    # metadata written after the generic hyperparameters (the class's set_gguf_parameters)
    set_params: Callable[[gguf.GGUFWriter, Path, HParams], None] = _no_params
    # a set_gguf_parameters that replaces TextModel's instead of adding to it (it writes every
    # hyper-parameter itself): (writer, hparams, block count, file type); None: TextModel's
    # then set_params
    own_params: Callable[[gguf.GGUFWriter, HParams, int, gguf.LlamaFileType], None] | None = None
    # tokenizer.ggml.* metadata (the class's set_vocab)
    set_vocab: Callable[[gguf.GGUFWriter, Path, HParams], None] = hf_vocab.set_vocab
    # raises ModelError for folders of this class that kquant does not convert
    check: Callable[[Path, HParams, str], None] = _no_check
    # added to every HF tensor whose name ends in "norm.weight", in the tensor's own dtype after
    # bf16 is widened to float32 (Gemma's RMSNorm multiplies by 1 + w: the converter adds the 1)
    norm_shift: float = 0.0
    # token_embd keeps only the vocabulary's rows, hparams' vocab_size with a tokenizer.model
    # (Gemma3Model.modify_tensors drops the rows of out-of-vocabulary ids)
    trim_embd_to_vocab: bool = False
    # the per-expert tensors the converter stacks (mixture-of-experts classes); None: none
    hf_experts: ExpertStacking | None = None
    # tensors the converter generates, written before the folder's (generate_extra_tensors)
    extra_tensors: Callable[[HParams], list[tuple[MODEL_TENSOR, np.ndarray]]] = _no_extra_tensors
    # metadata generate_extra_tensors writes: the converter prepares its tensors before its
    # metadata, so these keys come first, right after general.architecture
    tensor_params: Callable[[gguf.GGUFWriter, HParams], None] = _no_tensor_params
    # --- both -------------------------------------------------------------------------------
    # every tensor llama.cpp's loader creates for the architecture, in its order (its
    # create_tensor calls; kquant.archs.checks compares a model with them)
    tensors: tuple[TensorSpec, ...] = ()
    # --- runtime ----------------------------------------------------------------------------
    # llama.cpp's rope type: NEOX rotates (i, i + n_rot/2), NORM adjacent pairs (2i, 2i + 1)
    rope_neox: bool = False
    # the graph multiplies Q by 1/sqrt(head_dim) before attention, which then scales the
    # scores by 1 (phi3), rather than scaling the scores
    scale_q: bool = False
    # with scale_q: the factor (llama.cpp's f_attention_scale), from the model's sizes
    q_scale: Callable[[Dims], float] = inv_sqrt_head_dim
    # the token embeddings are multiplied by sqrtf(n_embd) (gemma)
    scale_embd: bool = False
    # the FFN's gate activation: "silu" (SwiGLU) or "gelu" (GeGLU, ggml's tanh approximation)
    ffn_act: str = "silu"
    # attention scores soft-capped, cap * tanh(s / cap), by {arch}.attn_logit_softcapping
    # (llama.cpp's hparams.attn_soft_cap), whose default is this (0: no capping)
    attn_softcap: float = 0.0
    # the logits soft-capped by {arch}.final_logit_softcapping, default this (0: no capping)
    final_softcap: float = 0.0
    # llama.cpp reads final_logit_softcapping even where its default is 0 (gemma3: capped only
    # where the file says so; 0 then means no capping)
    final_softcap_key: bool = False
    # sliding-window attention (llama.cpp's LLAMA_SWA_TYPE_STANDARD): the layer pattern
    # (load_swa_pattern's n_pattern: every n-th layer global, the others SWA; 0: no SWA) unless
    # {arch}.attention.sliding_window_pattern says otherwise, and the window when
    # {arch}.attention.sliding_window is absent
    swa_pattern: int = 0
    swa_window: int = 0
    # the SWA layers rope with {arch}.rope.freq_base_swa (default this) at scale 1, the global
    # ones with rope.freq_base and the linear scaling (llama.cpp's get_rope_freq_base / _scale
    # with rope_freq_base_train_swa); 0: every layer ropes alike
    swa_rope_base: float = 0.0
    # mixture of experts (build_moe_ffn, softmax gating): the top-k weights renormalized to
    # sum 1 (its norm_w: mixtral, qwen3moe; not qwen2moe)
    expert_norm: bool = False

    @property
    def name(self) -> str:
        """The GGUF name (general.architecture, the metadata key prefix)."""
        return gguf.MODEL_ARCH_NAMES[self.model_arch]

    @property
    def qk_norm(self) -> bool:
        """Every block RMS-normalizes each Q and K head (attn_q_norm / attn_k_norm required)."""
        return any(t.key == MODEL_TENSOR.ATTN_Q_NORM and t.required for t in self.tensors)

    @property
    def needs_experts(self) -> bool:
        """Every block routes its FFN through experts (its expert tensors required in any model
        of the arch, as llama.cpp's qwen2moe / qwen3moe loaders require expert_count > 0)."""
        return any(t.key == MODEL_TENSOR.FFN_GATE_INP and t.required and t.experts is None for t in self.tensors)

    @property
    def post_norms(self) -> bool:
        """Every block RMS-normalizes the attention's and the FFN's outputs before adding them
        to the residual (attn_post_norm / ffn_post_norm required)."""
        return any(t.key == MODEL_TENSOR.ATTN_POST_NORM and t.required for t in self.tensors)

    def tensor_map(self, n_blocks: int) -> gguf.TensorNameMap:
        """gguf's HF -> GGUF tensor name map for this architecture."""
        return gguf.get_tensor_name_map(self.model_arch, n_blocks)
