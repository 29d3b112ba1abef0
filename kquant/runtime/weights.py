"""A model's weights as float32 arrays on the compute device.

F32 tensors of a GGUF file are used in place (a view of the memory map); F16/BF16 and quantized
tensors are dequantized with kquant's codecs, which are bit-exact with ggml's, so a quantized
model computes with exactly the values llama.cpp's dequantization gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T
from tqdm import tqdm

from ..codecs.api import dequantize
from ..errors import ModelError
from ..files.source import ModelSource, SourceTensor
from .activations import block_mins
from .config import ModelConfig


@dataclass
class Layer:
    attn_norm: Any
    wq: Any
    wk: Any
    wv: Any
    wo: Any
    ffn_norm: Any
    w_gate: Any
    w_up: Any
    w_down: Any
    bq: Any = None  # qwen2's Q/K/V biases
    bk: Any = None
    bv: Any = None
    bo: Any = None
    q_norm: Any = None  # qwen3's per-head RMSNorm of Q and K
    k_norm: Any = None


@dataclass
class Weights:
    token_embd: np.ndarray  # always host memory: rows are gathered per token
    output_norm: Any
    output: Any  # the token embedding when tied
    layers: list[Layer]
    rope_freqs: np.ndarray | None  # llama3's per-frequency divisors
    # each matrix's stored ggml type, by GGUF name: it decides how llama.cpp rounds the
    # activations multiplied with it (kquant.runtime.activations)
    types: dict[str, T]
    # per-block mins of Q4_1/Q5_1 matrices, which ggml multiplies by Q8_1's fp16 block sums
    mins: dict[str, Any]
    # quantized matrices as stored (uint8 rows of blocks, a view of the file's memory map), for
    # products over a few tokens straight from the blocks (kquant.matmul: ggml's vec_dot)
    blocks: dict[str, np.ndarray]


def tensor_f32(t: SourceTensor) -> np.ndarray:
    """A tensor's values as float32 in numpy order (rows = ggml's ne[1]); F32 data stays a view."""
    raw = np.asarray(t.load())
    if t.type == T.F32:
        data = raw.view(np.float32) if raw.dtype == np.uint8 else raw.astype(np.float32, copy=False)
    elif t.type == T.F16:
        data = (raw.view(np.float16) if raw.dtype == np.uint8 else raw).astype(np.float32)
    else:
        n_rows = t.n_elements // t.shape[0]
        data = dequantize(np.ascontiguousarray(raw).view(np.uint8).reshape(n_rows, -1), t.type)
    return data.reshape(tuple(reversed(t.shape)))


def load_weights(source: ModelSource, config: ModelConfig, xp: Any = np, progress: bool = True) -> Weights:
    """Every weight the forward pass uses, as float32, on the device of array module `xp`."""
    by_name = {t.name: t for t in source.tensors}

    def get(name: str, shape: tuple[int, ...] | None, required: bool = True):
        t = by_name.get(name)
        if t is None:
            if required:
                raise ModelError(f"{source.path}: tensor {name} is missing")
            return None
        data = tensor_f32(t)
        if shape is not None and data.shape != shape:
            raise ModelError(f"{source.path}: tensor {name} has shape {list(data.shape)}, "
                             f"expected {list(shape)}")
        if not np.isfinite(data).all():
            raise ModelError(f"{source.path}: tensor {name} holds NaN or Inf")
        return data if xp is np else xp.asarray(data)

    c = config
    q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    layers = []
    for i in tqdm(range(c.n_layer), desc="loading", unit="layer", disable=not progress, leave=False):
        p = f"blk.{i}."
        layers.append(Layer(
            attn_norm=get(p + "attn_norm.weight", (c.n_embd,)),
            wq=get(p + "attn_q.weight", (q_dim, c.n_embd)),
            wk=get(p + "attn_k.weight", (kv_dim, c.n_embd)),
            wv=get(p + "attn_v.weight", (kv_dim, c.n_embd)),
            wo=get(p + "attn_output.weight", (c.n_embd, q_dim)),
            ffn_norm=get(p + "ffn_norm.weight", (c.n_embd,)),
            w_gate=get(p + "ffn_gate.weight", (c.n_ff, c.n_embd)),
            w_up=get(p + "ffn_up.weight", (c.n_ff, c.n_embd)),
            w_down=get(p + "ffn_down.weight", (c.n_embd, c.n_ff)),
            bq=get(p + "attn_q.bias", (q_dim,), False),
            bk=get(p + "attn_k.bias", (kv_dim,), False),
            bv=get(p + "attn_v.bias", (kv_dim,), False),
            bo=get(p + "attn_output.bias", (c.n_embd,), False),
            q_norm=get(p + "attn_q_norm.weight", (c.head_dim,), False),
            k_norm=get(p + "attn_k_norm.weight", (c.head_dim,), False),
        ))
    for name in by_name:
        if name.startswith("blk.") and int(name.split(".")[1]) >= c.n_layer:
            raise ModelError(f"{source.path}: tensor {name} is beyond block_count {c.n_layer}")
    embd = by_name.get("token_embd.weight")
    token_embd = tensor_f32(embd)
    output = get("output.weight", (c.n_vocab, c.n_embd), required=False)
    if output is None:  # tied embeddings
        output = token_embd if xp is np else xp.asarray(token_embd)
    freqs = by_name.get("rope_freqs.weight")
    types = {t.name: t.type for t in source.tensors if len(t.shape) == 2}
    types.setdefault("output.weight", embd.type)
    mins, blocks = {}, {}
    for name, qtype in types.items():
        if qtype not in (T.F32, T.F16, T.BF16):
            t = by_name["token_embd.weight" if name not in by_name else name]
            blocks[name] = np.asarray(t.load()).view(np.uint8).reshape(t.shape[1], -1)
        if qtype in (T.Q4_1, T.Q5_1):
            t = by_name["token_embd.weight" if name not in by_name else name]
            m = block_mins(t.load(), qtype, t.shape[1])
            mins[name] = m if xp is np else xp.asarray(m)
    return Weights(
        types=types,
        mins=mins,
        blocks=blocks,
        token_embd=token_embd,
        output_norm=get("output_norm.weight", (c.n_embd,)),
        output=output,
        layers=layers,
        rope_freqs=tensor_f32(freqs).ravel() if freqs is not None else None,
    )
