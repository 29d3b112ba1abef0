"""A model's shape and numerics, read from GGUF metadata (what llama.cpp's llama_hparams holds).

Every input kquant reads becomes GGUF metadata first (an HF folder through kquant.files.hf, exactly as
convert_hf_to_gguf.py writes it), so this is the one place that interprets hyperparameters.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError
from ..files.source import ModelSource

# llama.cpp's rope type per architecture (llama_model_rope_type): the GGUF converter permutes
# llama's Q/K rows so that rotated pairs are adjacent (NORM); qwen2/qwen3 keep HF's halves (NEOX)
ROPE_NEOX = {"qwen2": True, "qwen3": True, "llama": False}


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
    rope_neox: bool
    rope_base: float
    rope_freq_scale: float  # 1 / linear scaling factor
    rms_eps: float
    n_vocab: int
    n_ctx_train: int

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_head // self.n_head_kv


def read_config(source: ModelSource) -> ModelConfig:
    """The hyperparameters of a llama/mistral/qwen2/qwen3 model, with llama.cpp's defaults."""
    arch = source.arch
    if arch not in ROPE_NEOX:
        raise ModelError(f"architecture {arch!r} is not supported by kquant's runtime "
                         f"(supported: {', '.join(sorted(ROPE_NEOX))})")

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
    embd = next((t for t in source.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelError(f"{source.path}: no token_embd.weight")
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
        rope_neox=ROPE_NEOX[arch],
        rope_base=float(key("rope.freq_base", 10000.0)),
        rope_freq_scale=1.0 / factor if scaling == "linear" and factor > 0 else 1.0,
        rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        n_vocab=n_vocab,
        n_ctx_train=int(key("context_length", 0) or 0),
    )
