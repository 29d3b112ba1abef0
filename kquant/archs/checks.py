"""A model checked as llama.cpp's loader checks it, before anything is written or computed.

    dims = model_dims(source)   # the sizes its tensors are made of, from the GGUF metadata
    check_tensors(source)       # every tensor the architecture declares: present, rightly shaped

A model whose metadata and tensors disagree is one that llama.cpp refuses to load (or, where
its loader does not look, computes garbage with); kquant refuses it with llama.cpp's words
(llama-model.cpp, llama-model-loader.cpp), prefixed by the model's path:

    missing tensor 'blk.1.attn_k.weight'
    tensor 'blk.0.attn_q.weight' has wrong shape; expected 256, 256, got 256, 128
    wrong number of tensors; expected 40, got 39: 'blk.0.mystery.weight' is not a tensor of
        a 4-block llama model

What an architecture holds is its file's table (`Arch.tensors`, kquant.archs.<arch>); the
metadata helpers here (`meta_int`, `meta_float`) are what kquant.runtime reads the rest with, so
that a missing, mistyped or impossible value is one error naming the key.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Iterator

import gguf
from gguf import MODEL_TENSOR

from ..errors import ModelError
from ..files.source import ModelSource
from .base import Arch, Dims, TensorSpec, tensor_name

__all__ = ["model_dims", "check_tensors", "meta_int", "meta_float", "where"]

_REQUIRED = object()


def where(source: ModelSource) -> str:
    """How messages name the model: its path (a GGUF file or an HF folder)."""
    return source.path or f"the {source.arch} model"


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return f"an array of {len(value)} values"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _value(source: ModelSource, key: str, default: Any) -> Any:
    value = source.get(key)
    if value is None and default is _REQUIRED:
        # llama.cpp: "key not found in model: llama.block_count"
        raise ModelError(f"{where(source)}: key not found in model: {key}")
    return value


def meta_int(source: ModelSource, key: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
    """An integer metadata value of at least `minimum`; `default` where the key is absent."""
    value = _value(source, key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Integral):  # bool is an int to Python
        raise ModelError(f"{where(source)}: metadata key {key} is {_shown(value)}, not an integer")
    if value < minimum:
        raise ModelError(f"{where(source)}: metadata key {key} is {value}; it must be at least {minimum}")
    return int(value)


def meta_float(source: ModelSource, key: str, default: Any = _REQUIRED, allow_zero: bool = False) -> float:
    """A finite number > 0 (>= 0 with `allow_zero`); `default` where the key is absent."""
    value = _value(source, key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ModelError(f"{where(source)}: metadata key {key} is {_shown(value)}, not a number")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ModelError(f"{where(source)}: metadata key {key} is {value}; "
                         f"it must be a finite number {bound}")
    return value


def _n_vocab(source: ModelSource) -> int:
    """llama.cpp sizes token_embd by the tokenizer's token count; without a vocabulary, by
    {arch}.vocab_size, else by token_embd itself (nothing to compare)."""
    tokens = source.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        return len(tokens)
    if tokens is not None:
        raise ModelError(f"{where(source)}: metadata key tokenizer.ggml.tokens is {_shown(tokens)}, "
                         "not a list of tokens")
    n_vocab = meta_int(source, f"{source.arch}.vocab_size", None)
    if n_vocab is not None:
        return n_vocab
    embd = next((t for t in source.tensors if t.name == tensor_name(MODEL_TENSOR.TOKEN_EMBD)), None)
    return embd.shape[-1] if embd is not None and len(embd.shape) == 2 else 0


def model_dims(source: ModelSource) -> Dims:
    """The sizes of a model's tensors, from its `{arch}.*` metadata with llama.cpp's defaults
    (llama_model::load_hparams), each checked: ModelError naming the key otherwise."""
    arch, path = source.arch, where(source)

    def key(name: str) -> str:
        return f"{arch}.{name}"

    n_embd = meta_int(source, key("embedding_length"))
    n_head = meta_int(source, key("attention.head_count"))
    n_head_kv = meta_int(source, key("attention.head_count_kv"), n_head)
    if n_head % n_head_kv:
        raise ModelError(f"{path}: {key('attention.head_count')} {n_head} is not a multiple of "
                         f"{key('attention.head_count_kv')} {n_head_kv}")
    if source.get(key("attention.key_length")) is None and n_embd < n_head:
        raise ModelError(f"{path}: {key('embedding_length')} {n_embd} is less than one value per head "
                         f"({n_head} heads) and there is no {key('attention.key_length')}")
    head_dim = meta_int(source, key("attention.key_length"), n_embd // n_head)
    n_rot = meta_int(source, key("rope.dimension_count"), head_dim)
    if n_rot > head_dim or n_rot % 2:
        raise ModelError(f"{path}: {key('rope.dimension_count')} {n_rot} is not an even number of "
                         f"dimensions of a {head_dim}-value head")
    n_ff = meta_int(source, key("feed_forward_length"))
    # llama_model::load_hparams: expert_used_count only counts with experts; each MoE arch's
    # loader takes the expert sizes from these keys, else from n_ff
    n_expert = meta_int(source, key("expert_count"), 0, minimum=0)
    n_expert_used = meta_int(source, key("expert_used_count"), 0, minimum=0) if n_expert else 0
    if n_expert_used > n_expert:
        raise ModelError(f"{path}: {key('expert_used_count')} {n_expert_used} exceeds "
                         f"{key('expert_count')} {n_expert}")
    n_ff_exp = meta_int(source, key("expert_feed_forward_length"), 0, minimum=0)
    if not n_ff_exp and n_expert_used:
        n_ff_exp = n_ff // n_expert_used
    return Dims(
        n_layer=meta_int(source, key("block_count")),
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        head_dim_v=meta_int(source, key("attention.value_length"), head_dim),
        n_rot=n_rot,
        n_vocab=_n_vocab(source),
        n_expert=n_expert,
        n_ff_exp=n_ff_exp,
        n_ff_shexp=meta_int(source, key("expert_shared_feed_forward_length"), 0, minimum=0) or n_ff,
    )


def _expected(arch: Arch, dims: Dims) -> Iterator[tuple[str, TensorSpec]]:
    """Every tensor name the architecture may have, in llama.cpp's creation order (its expert
    tensors where the model has experts, the dense FFN where it has none)."""
    specs = [s for s in arch.tensors if s.experts is None or s.experts == (dims.n_expert > 0)]
    for spec in specs:
        if not spec.per_block:
            yield tensor_name(spec.key, None, spec.suffix), spec
    for bid in range(dims.n_layer):
        for spec in specs:
            if spec.per_block:
                yield tensor_name(spec.key, bid, spec.suffix), spec


def _ggml_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape less its trailing 1s: llama.cpp compares all four ne[] with 1 beyond the rank."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _fmt(shape: tuple[int, ...]) -> str:
    return ", ".join(str(d) for d in shape)


def check_tensors(source: ModelSource, dims: Dims | None = None, runtime: bool = False) -> None:
    """ModelError unless the model has every tensor its architecture requires, each of the
    shape its metadata gives, and no other (llama_model::load_tensors' checks). `runtime`:
    also refuse the tensors llama.cpp uses but kquant's runtime does not compute with."""
    from . import ARCHS  # the registry imports this module

    arch = ARCHS.get(source.arch)
    if arch is None:
        raise ModelError(f"{where(source)}: architecture {source.arch!r} is not supported "
                         f"(supported: {', '.join(sorted(ARCHS))})")
    dims = dims or model_dims(source)
    if arch.needs_experts and not (dims.n_expert and meta_int(source, f"{arch.name}.expert_used_count", 0, minimum=0)):
        # llama-model.cpp: "n_expert must be > 0 for QWEN3MOE" (and n_expert_used)
        raise ModelError(f"{where(source)}: a {arch.name} model needs {arch.name}.expert_count and "
                         f"{arch.name}.expert_used_count > 0")
    by_name = {t.name: t for t in source.tensors}
    used = 0
    for name, spec in _expected(arch, dims):
        t = by_name.pop(name, None)
        if t is None:
            if spec.required:
                raise ModelError(f"{where(source)}: missing tensor '{name}'")
            continue
        want = spec.size(dims)
        if _ggml_shape(t.shape) != want:
            raise ModelError(f"{where(source)}: tensor '{name}' has wrong shape; expected {_fmt(want)}, "
                             f"got {_fmt(t.shape)}")
        if runtime and not spec.runs:
            kind = f"{gguf.TENSOR_NAMES[spec.key].rpartition('.')[2]}.{spec.suffix}"
            raise ModelError(f"{where(source)}: tensor '{name}': kquant's runtime does not compute with "
                             f"{kind} tensors yet (llama.cpp does)")
        used += 1
    if by_name:
        first = next(iter(by_name))
        more = f" (and {len(by_name) - 1} more)" if len(by_name) > 1 else ""
        raise ModelError(f"{where(source)}: wrong number of tensors; expected {len(source.tensors)}, "
                         f"got {used}: '{first}'{more} is not a tensor of a {dims.n_layer}-block "
                         f"{arch.name} model")
