"""A model's shape and numerics, read from GGUF metadata (what llama.cpp's llama_hparams holds).

Every input kquant reads becomes GGUF metadata first (an HF folder through kquant.files.hf, exactly as
convert_hf_to_gguf.py writes it), so this is the one place that interprets hyperparameters.
Which architectures the runtime accepts, and each one's rope style, come from kquant.archs.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import MODEL_TENSOR

from ..archs import ARCHS
from ..archs.base import tensor_name
from ..errors import ModelError
from ..files.source import ModelSource


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int  # attention.key_length (qwen3 has head_dim != n_embd / n_head)
    n_rot: int  # rope.dimension_count: leading dims of each head that rotate
    rope_neox: bool  # the arch's rope style (kquant.archs): NEOX halves or NORM adjacent pairs
    rope_base: float
    rope_freq_scale: float  # 1 / linear scaling factor
    rms_eps: float
    n_vocab: int

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_head // self.n_head_kv


def read_config(source: ModelSource) -> ModelConfig:
    """The hyperparameters of a llama/mistral/qwen2/qwen3 model, with llama.cpp's defaults."""
    arch = source.arch
    if arch not in ARCHS:
        raise ModelError(f"architecture {arch!r} is not supported by kquant's runtime "
                         f"(supported: {', '.join(sorted(ARCHS))})")

    def key(name: str, default=None, required: bool = False):
        value = source.get(f"{arch}.{name}", default)
        if required and value is None:
            raise ModelError(f"{source.path}: metadata key {arch}.{name} is missing")
        return value

    n_embd = int(key("embedding_length", required=True))
    n_head = int(key("attention.head_count", required=True))
    n_head_kv = int(key("attention.head_count_kv", n_head))
    head_dim = int(key("attention.key_length", n_embd // n_head))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ModelError("models whose value heads differ in size from key heads are not supported")
    if n_head % n_head_kv:
        raise ModelError(f"{n_head} attention heads do not group into {n_head_kv} KV heads")
    scaling = str(key("rope.scaling.type", "none"))
    if scaling not in ("none", "linear"):
        raise ModelError(f"rope scaling {scaling!r} is not supported by kquant's runtime")
    factor = float(key("rope.scaling.factor", 0.0) or 0.0)
    tokens = source.get("tokenizer.ggml.tokens")
    n_vocab = int(key("vocab_size", len(tokens) if tokens is not None else 0))
    embd_name = tensor_name(MODEL_TENSOR.TOKEN_EMBD)
    embd = next((t for t in source.tensors if t.name == embd_name), None)
    if embd is None:
        raise ModelError(f"{source.path}: no {embd_name}")
    n_vocab = embd.shape[1] if len(embd.shape) == 2 else n_vocab
    return ModelConfig(
        arch=arch,
        n_layer=int(key("block_count", required=True)),
        n_embd=n_embd,
        n_ff=int(key("feed_forward_length", required=True)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_rot=int(key("rope.dimension_count", head_dim)),
        rope_neox=ARCHS[arch].rope_neox,
        rope_base=float(key("rope.freq_base", 10000.0)),
        rope_freq_scale=1.0 / factor if scaling == "linear" and factor > 0 else 1.0,
        rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        n_vocab=n_vocab,
    )
