"""A model's weights as float32 arrays on the compute device.

F32 tensors of a GGUF file are used in place (a view of the memory map); F16/BF16 and quantized
tensors are dequantized with kquant's codecs, which are bit-exact with ggml's, so a quantized
model computes with exactly the values llama.cpp's dequantization gives.  Tensors are found under
gguf's TENSOR_NAMES. Biases are used wherever a file has them, as llama.cpp's loader takes them;
the architecture's record (kquant.archs) says whether every block must have Q/K norms.
read_config has checked the tensor set, shapes and types against it before anything loads.

With a `GpuBlocks` loader (the runtime on `--device cuda`), quantized matrices instead stay as
their blocks on the GPU (kquant.runtime.gpu_matrices.GpuMatrix); norms, biases, float
matrices and the stacked experts of MoE blocks are float32 CuPy arrays as before, and the
token embedding stays in host memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import MODEL_TENSOR as MT
from tqdm import tqdm

from ..archs import Arch, get_arch
from ..archs.base import tensor_name
from ..codecs.api import dequantize
from ..errors import ModelError
from ..files.source import ModelSource, SourceTensor
from ..matmul.activations import block_mins
from .config import ModelConfig
from .gpu_matrices import GpuBlocks, GpuMatrix


@dataclass
class Layer:
    attn_norm: Any
    wq: Any
    wk: Any
    wv: Any
    wo: Any
    ffn_norm: Any
    w_gate: Any  # None: gate and up fused in w_up (2 * n_ff rows, gate first: phi3)
    w_up: Any
    w_down: Any
    bq: Any = None  # Q/K/V/output biases, where the file has them (every qwen2 block does)
    bk: Any = None
    bv: Any = None
    bo: Any = None
    q_norm: Any = None  # per-head RMSNorm of Q and K (every qwen3 block)
    k_norm: Any = None
    # RMSNorm weights of the attention's and the FFN's outputs (every gemma2 block)
    attn_post_norm: Any = None
    ffn_post_norm: Any = None
    # Q, K and V as one matrix (attn_qkv, phi3), in place of wq/wk/wv (then None), its bias
    wqkv: Any = None
    bqkv: Any = None
    # mixture of experts (in place of w_gate/w_up/w_down, then None): the router
    # (n_expert, n_embd), the stacked experts (n_expert, n_ff_exp, n_embd) and
    # (n_expert, n_embd, n_ff_exp); the shared expert (qwen2moe) and its gate (1, n_embd)
    gate_inp: Any = None
    gate_exps: Any = None
    up_exps: Any = None
    down_exps: Any = None
    gate_inp_shexp: Any = None
    w_gate_shexp: Any = None
    w_up_shexp: Any = None
    w_down_shexp: Any = None
    # the GGUF name of each matrix ("wq" -> "blk.3.attn_q.weight"): what the imatrix and the
    # activation rounding (by the matrix's stored type) know it by
    names: dict[str, str] = field(default_factory=dict)


@dataclass
class Weights:
    token_embd: np.ndarray  # always host memory: rows are gathered per token
    output_norm: Any
    output: Any  # the token embedding when tied
    layers: list[Layer]
    rope_freqs: np.ndarray | None  # llama3's per-frequency divisors
    # each matrix's stored ggml type, by GGUF name: it decides how llama.cpp rounds the
    # activations multiplied with it (kquant.matmul.activations)
    types: dict[str, T]
    # per-block mins of Q4_1/Q5_1 matrices, which ggml multiplies by Q8_1's fp16 block sums
    mins: dict[str, Any]
    # quantized matrices as stored (uint8 rows of blocks, a view of the file's memory map), for
    # products over a few tokens straight from the blocks (kquant.matmul: ggml's vec_dot)
    blocks: dict[str, np.ndarray]
    # LongRoPE's per-frequency divisors (phi3), for contexts beyond rope.scaling's original
    # context length and within it; rope_freqs, where a model has it, takes precedence
    rope_long: np.ndarray | None = None
    rope_short: np.ndarray | None = None
    # no output.weight: the logits come from token_embd (llama-imatrix then has no output entry)
    output_tied: bool = False


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


# the names under which a model's tensors are found (gguf's TENSOR_NAMES)
TOKEN_EMBD = tensor_name(MT.TOKEN_EMBD)
OUTPUT = tensor_name(MT.OUTPUT)
OUTPUT_NORM = tensor_name(MT.OUTPUT_NORM)
ROPE_FREQS = tensor_name(MT.ROPE_FREQS)
ROPE_LONG = tensor_name(MT.ROPE_FACTORS_LONG)
ROPE_SHORT = tensor_name(MT.ROPE_FACTORS_SHORT)


# each matrix of a block: its Layer field and its gguf tensor
MATRICES = {"wq": MT.ATTN_Q, "wk": MT.ATTN_K, "wv": MT.ATTN_V, "wqkv": MT.ATTN_QKV, "wo": MT.ATTN_OUT,
            "w_gate": MT.FFN_GATE, "w_up": MT.FFN_UP, "w_down": MT.FFN_DOWN,
            "gate_inp": MT.FFN_GATE_INP, "gate_exps": MT.FFN_GATE_EXP, "up_exps": MT.FFN_UP_EXP,
            "down_exps": MT.FFN_DOWN_EXP, "gate_inp_shexp": MT.FFN_GATE_INP_SHEXP,
            "w_gate_shexp": MT.FFN_GATE_SHEXP, "w_up_shexp": MT.FFN_UP_SHEXP, "w_down_shexp": MT.FFN_DOWN_SHEXP}


def _load_experts(w: Callable[..., Any], c: ModelConfig, layer: "Layer", shexp: bool) -> None:
    """A block's router, stacked experts and (where the model has one) shared expert, as
    llama.cpp's loader creates them for the MoE archs."""
    e, ff = c.n_expert, c.n_ff_exp
    layer.gate_inp = w(MT.FFN_GATE_INP, (e, c.n_embd))
    layer.gate_exps = w(MT.FFN_GATE_EXP, (e, ff, c.n_embd))
    layer.up_exps = w(MT.FFN_UP_EXP, (e, ff, c.n_embd))
    layer.down_exps = w(MT.FFN_DOWN_EXP, (e, c.n_embd, ff))
    if shexp:
        gate = w(MT.FFN_GATE_INP_SHEXP, None)
        layer.gate_inp_shexp = gate.reshape(1, c.n_embd)  # {n_embd}: one row of output
        layer.w_gate_shexp = w(MT.FFN_GATE_SHEXP, (c.n_ff_shexp, c.n_embd))
        layer.w_up_shexp = w(MT.FFN_UP_SHEXP, (c.n_ff_shexp, c.n_embd))
        layer.w_down_shexp = w(MT.FFN_DOWN_SHEXP, (c.n_embd, c.n_ff_shexp))


def _load_layer(get: Callable[..., Any], has: Callable[[str], bool], c: ModelConfig, arch: Arch, i: int) -> Layer:
    """Block i's weights; the arch record says whether its blocks must have Q/K norms. Q/K/V
    are one fused matrix where the block has attn_qkv, gate and up one where it has no
    ffn_gate (as llama.cpp's graph takes them)."""
    q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim

    def w(key: MT, shape: tuple[int, ...], required: bool = True, suffix: str = "weight") -> Any:
        return get(tensor_name(key, i, suffix), shape, required)

    fused_qkv = has(tensor_name(MT.ATTN_QKV, i))
    moe = has(tensor_name(MT.FFN_GATE_INP, i))
    fused_ffn = not moe and not has(tensor_name(MT.FFN_GATE, i))
    qkv = (q_dim + 2 * kv_dim, c.n_embd)
    layer = Layer(
        attn_norm=w(MT.ATTN_NORM, (c.n_embd,)),
        wq=None if fused_qkv else w(MT.ATTN_Q, (q_dim, c.n_embd)),
        wk=None if fused_qkv else w(MT.ATTN_K, (kv_dim, c.n_embd)),
        wv=None if fused_qkv else w(MT.ATTN_V, (kv_dim, c.n_embd)),
        wqkv=w(MT.ATTN_QKV, qkv) if fused_qkv else None,
        bqkv=w(MT.ATTN_QKV, qkv[:1], False, "bias") if fused_qkv else None,
        wo=w(MT.ATTN_OUT, (c.n_embd, q_dim)),
        ffn_norm=w(MT.FFN_NORM, (c.n_embd,)),
        w_gate=None if fused_ffn or moe else w(MT.FFN_GATE, (c.n_ff, c.n_embd)),
        w_up=None if moe else w(MT.FFN_UP, ((2 if fused_ffn else 1) * c.n_ff, c.n_embd)),
        w_down=None if moe else w(MT.FFN_DOWN, (c.n_embd, c.n_ff)),
        bq=w(MT.ATTN_Q, (q_dim,), False, "bias"),
        bk=w(MT.ATTN_K, (kv_dim,), False, "bias"),
        bv=w(MT.ATTN_V, (kv_dim,), False, "bias"),
        bo=w(MT.ATTN_OUT, (c.n_embd,), False, "bias"),
        q_norm=w(MT.ATTN_Q_NORM, (c.head_dim,), arch.qk_norm),
        k_norm=w(MT.ATTN_K_NORM, (c.head_dim,), arch.qk_norm),
        attn_post_norm=w(MT.ATTN_POST_NORM, (c.n_embd,)) if arch.post_norms else None,
        ffn_post_norm=w(MT.FFN_POST_NORM, (c.n_embd,)) if arch.post_norms else None,
    )
    if fused_qkv and any(has(tensor_name(k, i)) for k in (MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V)):
        # llama.cpp's loader creates no attn_q/k/v beside attn_qkv: too many tensors
        raise ModelError(f"tensor {tensor_name(MT.ATTN_QKV, i)}: block {i} has a fused Q/K/V matrix "
                         "and separate ones too")
    if fused_qkv and (layer.bq is not None or layer.bk is not None or layer.bv is not None):
        raise ModelError(f"tensor {tensor_name(MT.ATTN_QKV, i)}: separate Q/K/V biases with a fused "
                         "Q/K/V matrix are not supported by kquant's runtime")
    if moe:
        _load_experts(w, c, layer, has(tensor_name(MT.FFN_GATE_INP_SHEXP, i)))
    # the matrices the block has
    layer.names = {f: tensor_name(key, i) for f, key in MATRICES.items() if getattr(layer, f) is not None}
    return layer


def block_rows(t: SourceTensor) -> np.ndarray:
    """A 2-D tensor's data as stored: uint8 (rows, row_bytes), a view where the source maps it."""
    return np.asarray(t.load()).view(np.uint8).reshape(t.shape[1], -1)


def _gpu_matrix(t: SourceTensor, shape: tuple[int, ...] | None, gpu: GpuBlocks, xp: Any,
                path: str) -> GpuMatrix:
    """A quantized matrix as its blocks on the device, checked as the float path checks it."""
    raw = block_rows(t)
    values = dequantize(raw, t.type)  # only to refuse NaN/Inf in the file, as the float path does
    if shape is not None and values.shape != shape:
        raise ModelError(f"{path}: tensor {t.name} has shape {list(values.shape)}, expected {list(shape)}")
    if not np.isfinite(values).all():
        raise ModelError(f"{path}: tensor {t.name} holds NaN or Inf")
    del values
    return gpu.load(raw, t.type, xp)


def load_weights(source: ModelSource, config: ModelConfig, xp: Any = np, progress: bool = True,
                 gpu: GpuBlocks | None = None) -> Weights:
    """Every weight the forward pass uses, as float32, on the device of array module `xp`; with
    `gpu`, the quantized matrices (2-D, of a type gpu.keeps) as their blocks on the GPU. Stacked
    experts (3-D) stay dequantized float32: the block kernels take one matrix at a time."""
    by_name = {t.name: t for t in source.tensors}

    def get(name: str, shape: tuple[int, ...] | None, required: bool = True):
        t = by_name.get(name)
        if t is None:
            if required:
                raise ModelError(f"{source.path}: tensor {name} is missing")
            return None
        if gpu is not None and len(t.shape) == 2 and gpu.keeps(t.type):
            return _gpu_matrix(t, shape, gpu, xp, source.path)
        data = tensor_f32(t)
        if shape is not None and data.shape != shape:
            raise ModelError(f"{source.path}: tensor {name} has shape {list(data.shape)}, "
                             f"expected {list(shape)}")
        if not np.isfinite(data).all():
            raise ModelError(f"{source.path}: tensor {name} holds NaN or Inf")
        return data if xp is np else xp.asarray(data)

    c, arch = config, get_arch(config.arch)
    layers = [_load_layer(get, by_name.__contains__, c, arch, i)
              for i in tqdm(range(c.n_layer), desc="loading", unit="layer", disable=not progress, leave=False)]
    embd = by_name.get(TOKEN_EMBD)
    token_embd = tensor_f32(embd)
    output = get(OUTPUT, (c.n_vocab, c.n_embd), required=False)
    if output is None:  # tied embeddings
        if gpu is not None and gpu.keeps(embd.type):  # the embedding's blocks, on the device
            output = gpu.load(block_rows(embd), embd.type, xp)
        else:
            output = token_embd if xp is np else xp.asarray(token_embd)
    freqs = by_name.get(ROPE_FREQS)
    # matrices and stacked experts (3-D: each expert's slab is a matrix of the type)
    types = {t.name: t.type for t in source.tensors if len(t.shape) in (2, 3)}
    types.setdefault(OUTPUT, embd.type)
    mins, blocks = {}, {}
    for name, qtype in types.items():
        t = by_name[TOKEN_EMBD if name not in by_name else name]
        if qtype not in (T.F32, T.F16, T.BF16) and len(t.shape) == 2:
            blocks[name] = block_rows(t)
        if qtype in (T.Q4_1, T.Q5_1):
            rows = t.n_elements // t.shape[0]
            m = block_mins(t.load(), qtype, rows).reshape(*reversed(t.shape[1:]), -1)
            mins[name] = m if xp is np else xp.asarray(m)
    return Weights(
        types=types,
        mins=mins,
        blocks=blocks,
        token_embd=token_embd,
        output_norm=get(OUTPUT_NORM, (c.n_embd,)),
        output=output,
        layers=layers,
        rope_freqs=tensor_f32(freqs).ravel() if freqs is not None else None,
        rope_long=tensor_f32(by_name[ROPE_LONG]).ravel() if ROPE_LONG in by_name else None,
        rope_short=tensor_f32(by_name[ROPE_SHORT]).ravel() if ROPE_SHORT in by_name else None,
        output_tied=OUTPUT not in by_name,
    )
