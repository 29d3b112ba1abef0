"""The forward pass of llama-family models (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3), a whole
batch at once.

It computes what llama.cpp's graph computes (src/models/llama.cpp, qwen2.cpp, qwen3.cpp, phi3.cpp,
gemma2.cpp, gemma3.cpp), in float32, with matrix-matrix products over every token of a batch:

    x = token_embd[tokens]                                    (gemma: times sqrt(n_embd))
    for each block:
        h = rms_norm(x) * attn_norm
        q, k, v = h @ Wq.T (+bq), h @ Wk.T (+bk), h @ Wv.T (+bv)  (phi3: one fused product, split)
        q, k = rms_norm per head * q_norm / k_norm           (qwen3, gemma3)
        q, k = rope(q), rope(k)                               (pairs: llama adjacent, qwen halves;
                                                              gemma3's SWA layers: their own base)
        q = q / sqrt(d)                                       (phi3, gemma; the scores are then not scaled)
        k, v -> KV cache, rounded to float16 as llama.cpp's default F16 cache stores them
        a = softmax(q k^T / sqrt(d) + causal mask) v          (GQA: query head h reads KV head h // n_rep;
                                                              gemma2: scores cap*tanh(s/cap); gemma: SWA mask)
        x = x + a @ Wo.T                                      (gemma: rms_norm(a @ Wo.T) * attn_post_norm)
        h = rms_norm(x) * ffn_norm
        x = x + (silu(h @ Wgate.T) * (h @ Wup.T)) @ Wdown.T   (phi3: gate and up one product, split;
                                                              gemma: gelu, the output post-normed;
                                                              mixtral, qwen2moe, qwen3moe: the top-k
                                                              experts' FFNs, weighted, + the shared
                                                              expert: moe_ffn, runtime/experts.py)
    logits = (rms_norm(x) * output_norm) @ Wout.T             (gemma2, gemma3 where set: cap * tanh(logits / cap))

All of it is written against an array module `xp`: numpy (BLAS) on the CPU, CuPy on a GPU, where
quantized matrices stay as their blocks and go through kquant.matmul.cuda's kernels
(kquant.runtime.gpu_matrices).
An `observe(name, x)` callback sees the input of every weight's matrix product, which is what an
importance matrix accumulates (llama-imatrix's collect_imatrix sees the same tensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import ModelError
from ..models import open_model
from ..files.source import ModelSource
from .config import ModelConfig, read_config
from .device import array_module
from .gemm import batched_matmul, matmul_nt
from ..codecs import vectorizing
from ..matmul.activations import (min_term_correction, quantize_rows, round_activations,
                                  vec_dot_type)
from ..matmul.cpu import run_blocks, weight_rows
from ..matmul.exact import ExactMatrix, beats_blas, float_blocks
from .kernels import (flash_attention, flash_attention_split_kv, flash_attention_vec, kv_view_length,
                      rms_norm_rows, rms_sums, rope_inplace, rope_table, rope_theta_scale, round_to_half,
                      softmax_causal, swiglu,
                      geglu, gelu_table, soft_cap, softmax_window,
                      uses_split_kv)
from .device import to_host
from .experts import ExpertInput, expert_rows, route, router_softmax
from .gpu_matrices import GpuBlocks, GpuMatrix
from .weights import OUTPUT, Layer, Weights, load_weights

Observer = Callable[[str, Any], None]

F32 = np.float32
# queries are processed in blocks so that causal attention skips the keys no query of the block
# can see (half of the score matrix); the result is exactly the same as one full block
_QUERY_BLOCK = 128
# up to this many tokens, quantized products run on the blocks themselves (memory-bound: 4-8x
# fewer bytes than the dequantized float32 matrix); above, dequantized float32 BLAS is faster
_BLOCK_KERNEL_TOKENS = 4
# llama.cpp's default physical batch (n_ubatch), which sizes its sliding-window KV cache
_UBATCH = 512


class KVCache:
    """Keys and values of one sequence, per layer, float32 arrays holding float16-rounded values:
    keys (n_head_kv, head_dim, n_ctx), transposed so that a dimension's values over consecutive
    keys are contiguous (the attention kernel vectorises over keys), values (n_head_kv, n_ctx,
    head_dim); and the number of positions filled."""

    def __init__(self, config: ModelConfig, n_ctx: int, xp: Any = np):
        self.k = [xp.zeros((config.n_head_kv, config.head_dim, n_ctx), F32) for _ in range(config.n_layer)]
        self.v = [xp.zeros((config.n_head_kv, n_ctx, config.head_dim), F32) for _ in range(config.n_layer)]
        self.n_ctx = n_ctx
        self.n = 0

    def clear(self) -> None:
        self.n = 0


@dataclass
class Segment:
    """Tokens of one sequence in a batch, continuing at position `cache.n`."""

    tokens: np.ndarray
    cache: KVCache


class Transformer:
    """A loaded model: `forward` runs a batch of sequence segments and returns logits."""

    def __init__(self, source: ModelSource, device: str = "cpu", progress: bool = True, xp: Any = None,
                 gpu: GpuBlocks | None = None):
        # `xp` overrides the array module: the tests pass a numpy stand-in that is not numpy
        # itself, to run the CuPy code path on the CPU. `gpu` keeps quantized matrices as their
        # blocks on the GPU (kquant.runtime.gpu_matrices), the default with CuPy; the tests
        # pass one with a numpy-like `xp` to run the block kernels on Numba's CUDA simulator.
        if xp is None:
            xp = array_module(device)
            if gpu is None and xp is not np:
                gpu = GpuBlocks()
        self.xp = xp
        self.device = device
        self.config = read_config(source)
        self.weights: Weights = load_weights(source, self.config, self.xp, progress, gpu)
        # (rope factors, base, freq scale) -> (positions, cos, sin): one table per kind of
        # layer (gemma3's SWA layers rope with their own base and scale)
        self._rope_cache: dict[tuple, tuple[int, Any, Any]] = {}
        # the last product's input and what was made of it (see _once_per_input)
        self._prepared: tuple[Any, Any, Any] = (None, None, None)
        # attention in ggml's exact flash-attention order (kernels.flash_attention): bit for bit
        # on the same inputs, several times slower than the BLAS path; off by default
        self.exact_attention = False
        # llama.cpp's CPU float order everywhere (x86 AVX2 build): each product by the path and
        # kernel ggml takes (kquant.matmul.exact), its two flash-attention kernels, RMSNorm's
        # sums in order, the last block's FFN on the output rows only, as llama.cpp's graph
        self.exact = False
        # with `exact`: the thread count of the llama.cpp run to reproduce (its -t / n_threads).
        # A decode step over more than 256 cells (a KV view of >= 512) takes ggml's split-KV
        # flash attention, whose float order depends on it (kernels.flash_attention_split_kv).
        # None: the runtime's own thread count (numba.get_num_threads(), what set_threads set)
        self.exact_threads: int | None = None
        self._exact_matrices: dict[str, Any] = {}
        # id(blocks) -> (blocks, their uint8 rows, vec_dot type) for _block_product
        self._block_rows: dict[int, tuple[Any, Any, Any]] = {}

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.config, n_ctx, self.xp)

    # --- the pieces -------------------------------------------------------------------------

    def _rms_norm(self, x: Any, w: Any) -> Any:
        """ggml_rms_norm then the weight: squares summed in double, scale 1/sqrtf(mean + eps)."""
        xp = self.xp
        if self.exact and xp is np:
            sums = rms_sums(np.ascontiguousarray(x).reshape(-1, x.shape[-1])).reshape(x.shape[:-1])
        elif xp is np and x.dtype == F32 and w.dtype == F32 and w.shape == x.shape[-1:]:
            # the numpy lines below in one compiled call, to the bit
            rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
            return rms_norm_rows(rows, w, F32(self.config.rms_eps)).reshape(x.shape)
        else:
            sums = (x * x).sum(axis=-1, dtype=np.float64)
        mean = (sums / x.shape[-1]).astype(F32)
        scale = F32(1.0) / xp.sqrt(mean + F32(self.config.rms_eps))
        y = x * scale[..., None]
        y *= w
        return y

    def _rope_factors(self, segments: Sequence[Segment]) -> str | None:
        """Which per-frequency rope divisors the segments' context takes, as llama.cpp's
        get_rope_factors chooses: rope_freqs where the model has it, else LongRoPE's long
        factors when the context (the cache's size, padded to 256 as llama.cpp pads n_ctx)
        exceeds the original context length, else the short ones."""
        W = self.weights
        if W.rope_freqs is not None:
            return "rope_freqs"
        if W.rope_long is None and W.rope_short is None:
            return None
        picks = {"rope_long" if -(-s.cache.n_ctx // 256) * 256 > self.config.n_ctx_orig else "rope_short"
                 for s in segments}
        if len(picks) > 1:
            raise ModelError("the sequences of one batch have contexts on both sides of the model's original "
                             f"context length ({self.config.n_ctx_orig}), which take different rope factors: "
                             "run them in separate batches")
        return picks.pop() if picks else None

    def _rope_tables(self, n_pos: int, factors: str | None, base: float | None = None,
                     freq_scale: float | None = None) -> tuple[Any, Any]:
        """cos and sin of every (position, pair), with ggml's float32 arithmetic: theta starts at
        the position and is multiplied by base^(-2/n_rot) once per pair (ggml_rope_cache_init),
        divided by the rope factors `factors` (a Weights field) where given, times the freq
        scale, and cos and sin scaled by rope.scaling.attn_factor. `base` and `freq_scale`:
        the model's rope.freq_base and linear scaling unless given (a layer's own)."""
        c = self.config
        base = c.rope_base if base is None else base
        freq_scale = c.rope_freq_scale if freq_scale is None else freq_scale
        key = (factors, base, freq_scale)
        have, cos, sin = self._rope_cache.get(key, (0, None, None))
        if have >= n_pos:
            return cos, sin
        n_pos = max(n_pos, 2 * have, 512)
        half = c.n_rot // 2
        theta_scale = rope_theta_scale(F32(base), c.n_rot)
        theta = np.arange(n_pos, dtype=F32)
        table = np.empty((n_pos, half), F32)
        for i in range(half):
            table[:, i] = theta
            theta = theta * theta_scale
        if factors is not None:
            table = table / getattr(self.weights, factors)[:half].astype(F32)
        table = table * F32(freq_scale)
        # libm's cosf/sinf, as ggml calls them (numpy's float32 SIMD versions differ in the last
        # bit for ~9% of these arguments, and even correctly rounded ones for ~1%)
        cos, sin = rope_table(table)
        if c.rope_attn_factor != 1.0:  # ggml's rope_yarn: cosf(theta) * mscale
            cos, sin = cos * F32(c.rope_attn_factor), sin * F32(c.rope_attn_factor)
        cos, sin = self.xp.asarray(cos), self.xp.asarray(sin)
        self._rope_cache[key] = (n_pos, cos, sin)
        return cos, sin

    def _rope(self, x: Any, pos: Any, factors: str | None = None,
              base_scale: tuple[float, float] | None = None) -> Any:
        """Rotate the first n_rot dims of every head of x (rows, heads, head_dim) in place;
        `base_scale`: the layer's own rope base and freq scale (None: the model's)."""
        c = self.config
        cos, sin = self._rope_tables(int(pos.max()) + 1, factors, *(base_scale or (None, None)))
        if self.xp is np:
            rope_inplace(x, pos, cos, sin, c.n_rot, c.rope_neox)
            return x
        cos, sin = cos[pos][:, None, :], sin[pos][:, None, :]
        if c.rope_neox:  # rotate (i, i + n_rot/2)
            x0, x1 = x[..., :c.n_rot // 2], x[..., c.n_rot // 2:c.n_rot]
        else:  # rotate (2i, 2i + 1)
            x0, x1 = x[..., 0:c.n_rot:2], x[..., 1:c.n_rot:2]
        r0 = x0 * cos - x1 * sin
        r1 = x0 * sin + x1 * cos
        x0[...] = r0
        x1[...] = r1
        return x

    def _attention(self, q: Any, seg_k: Any, seg_v: Any, n0: int, n_swa: int = 0) -> Any:
        """Causal GQA attention of one segment's queries q (T, n_head, d) at positions n0.. over
        the keys (n_head_kv, d, n0 + T) and values (n_head_kv, n0 + T, d) of its sequence;
        returns (T, n_head * d): matrix products by query blocks, a Numba softmax with ggml's
        expf. With `exact_attention` (CPU), the Numba kernel that adds in ggml's flash-attention
        order, bit for bit, but several times slower than BLAS.

        `n_swa` > 0: a sliding window, the query at position p sees keys p - n_swa + 1 .. p
        (llama.cpp's is_masked_swa); scores soft-capped where the model caps them."""
        xp, c = self.xp, self.config
        T = q.shape[0]
        # 1.0f/sqrtf(n_embd_head), in float; 1 where Q was scaled (phi3, gemma2)
        scale = F32(1.0) if c.scale_q else F32(1.0) / np.sqrt(F32(c.head_dim))
        cap = F32(c.attn_softcap)
        if cap > 0:  # ggml_flash_attn_ext: scale /= softcap; s = softcap * tanhf(s * scale)
            scale = scale / cap
        windowed = n_swa > 0 or cap > 0
        if xp is np and (self.exact_attention or self.exact):
            if n_swa > 0:
                self._check_swa_cache(seg_k.shape[2])
            out = np.empty((T, c.n_head, c.head_dim), F32)
            q = np.ascontiguousarray(q)
            # llama.cpp's KV view: the cells in use padded to 256 (llama_kv_cache::get_n_kv)
            n_kv = kv_view_length(n0 + T)
            if self.exact and uses_split_kv(T, n_kv):
                # one query over >= 512 cells: ggml splits the cells between its threads
                flash_attention_split_kv(q, seg_k, seg_v, n0, n_kv, self.emulated_threads(),
                                         scale, c.n_rep, out, cap, n_swa)
            else:
                # ggml's tiled kernel from GGML_FA_TILE_Q (64) queries of a sequence, else one_chunk
                kernel = flash_attention if T >= 64 or not self.exact else flash_attention_vec
                kernel(q, seg_k, seg_v, n0, scale, c.n_rep, out, cap, n_swa)
            return out.reshape(T, c.n_head * c.head_dim)
        qh = xp.ascontiguousarray(q.reshape(T, c.n_head_kv, c.n_rep, c.head_dim).transpose(1, 2, 0, 3))
        out = xp.empty((c.n_head_kv, c.n_rep, T, c.head_dim), F32)
        for a in range(0, T, _QUERY_BLOCK):
            b = min(T, a + _QUERY_BLOCK)
            S = n0 + b  # keys visible to the last query of the block
            rows = c.n_head_kv * c.n_rep * (b - a)
            qb = qh[:, :, a:b].reshape(c.n_head_kv, c.n_rep * (b - a), c.head_dim)
            s = self._bmm(qb, seg_k[:, :, :S])
            # the query at position n0 + t sees keys 0 .. n0 + t (n0 + t - n_swa + 1 .. with SWA)
            if xp is np and not windowed:
                # row r of s is query a + r % (b - a): np.tile(visible, rows // (b - a)) below,
                # without np.tile's Python (a decode step calls this once a layer)
                total = softmax_causal(s.reshape(rows, S), scale, np.arange(rows) % (b - a) + (n0 + a + 1))
            else:
                visible = n0 + np.arange(a, b) + 1
                first = np.maximum(visible - n_swa, 0) if n_swa > 0 else np.zeros_like(visible)
                if xp is np:
                    total = softmax_window(s.reshape(rows, S), scale, cap, np.tile(first, rows // (b - a)),
                                           np.tile(visible, rows // (b - a)))
                else:
                    s *= scale
                    if cap > 0:
                        s = cap * xp.tanh(s)
                    keys = xp.arange(S)[None, :]
                    s[:, (keys >= xp.asarray(np.tile(visible, c.n_rep))[:, None])
                      | (keys < xp.asarray(np.tile(first, c.n_rep))[:, None])] = -np.inf
                    s -= s.max(axis=-1, keepdims=True)
                    xp.exp(s, out=s)
                    total = s.sum(axis=-1, dtype=np.float64).astype(F32)
            o = self._bmm(s, seg_v[:, :S]).reshape(c.n_head_kv, c.n_rep, b - a, c.head_dim)
            out[:, :, a:b] = o / total.reshape(c.n_head_kv, c.n_rep, b - a, 1)
        return out.transpose(2, 0, 1, 3).reshape(T, c.n_head * c.head_dim)

    def _check_swa_cache(self, n_ctx: int) -> None:
        """Exact attention over a sliding window reads the keys in position order, as
        llama.cpp's SWA cache holds them until it is full: it has n_swa + n_ubatch (512) cells
        padded to 256 (llama_kv_cache_iswa), after which new keys take the cells of keys out
        of the window and the order, so the float sums, differ. A context beyond that is
        refused rather than computed in another order."""
        n_cells = -(-(self.config.n_swa + _UBATCH) // 256) * 256
        if n_ctx > n_cells:
            raise ModelError(f"exact mode reproduces llama.cpp's sliding-window cache ({n_cells} cells for a "
                             f"window of {self.config.n_swa}) only for contexts that fit it: -c {n_ctx} is "
                             f"larger; use -c {n_cells} or less, or leave out --exact")

    def emulated_threads(self) -> int:
        """The llama.cpp thread count `exact` reproduces: `exact_threads`, else the runtime's
        (numba's thread count, which kquant.runtime.device.set_threads sets)."""
        if self.exact_threads is not None and self.exact_threads > 0:
            return int(self.exact_threads)
        import numba

        return int(numba.get_num_threads())

    def _bmm(self, a: Any, b: Any) -> Any:
        """a @ b over the first axis (KV heads); on the CPU one fixed product per head."""
        return batched_matmul(a, b) if self.xp is np else self.xp.matmul(a, b)

    def _linear(self, x: Any, w: Any, b: Any, name: str, observe: Observer | None) -> Any:
        """x @ W.T (+ b), the activations first rounded as llama.cpp's CPU backend rounds them
        for W's type (Q8_K, Q8_0, F16, ...; unchanged for F32). `observe` sees them unrounded,
        as llama-imatrix's callback does. A GpuMatrix (quantized blocks on the GPU) takes the
        same rounding, then the block kernels (_matmul_nt); the CPU's own kernels are for
        host matrices."""
        if observe is not None:
            observe(name, x)
        qtype = self.weights.types.get(name, T.F32)
        if isinstance(w, GpuMatrix):
            return self._rounded_product(x, w, b, name, qtype)
        if self.exact and self.xp is np:
            y = self._exact_matrix(name, w, qtype)(x)
            return y + b if b is not None else y
        if self.xp is np and x.shape[0] <= _BLOCK_KERNEL_TOKENS and name in self.weights.blocks:
            # a token or a few (generation): read the quantized blocks, not the float32 copy
            y = self._block_product(x, self.weights.blocks[name], qtype)
            return y + b if b is not None else y
        if self.xp is np and beats_blas(qtype, w.shape[0], w.shape[1], x.shape[0]):
            # where llama.cpp's own kernel (repacked Q4_K / Q4_0, llamafile's F16 / F32) is as
            # fast as BLAS, take it: its values are llama.cpp's
            y = self._exact_matrix(name, w, qtype)(x)
            return y + b if b is not None else y
        return self._rounded_product(x, w, b, name, qtype)

    def _rounded_product(self, x: Any, w: Any, b: Any, name: str, qtype: Any) -> Any:
        """round(x) @ W.T (+ ggml's Q8_1 min term) (+ b): llama.cpp's product up to float32
        summation order, W exact (dequantized, or the blocks the GPU kernels dequantize)."""
        src_x = x
        if qtype != T.F32:
            x = self._once_per_input(x, ("rounded", vec_dot_type(qtype)),
                                     lambda: round_activations(x, qtype, self.xp))
        y = self._matmul_nt(x, w)
        if name in self.weights.mins:
            y += self._matmul_nt(min_term_correction(src_x, qtype, self.xp), self.weights.mins[name])
        if b is not None:
            y += b
        return y

    def _exact_matrix(self, name: str, w: Any, qtype: Any) -> ExactMatrix:
        m = self._exact_matrices.get(name)
        if m is None:
            wb = self.weights.blocks.get(name)
            m = ExactMatrix(wb if wb is not None else float_blocks(w, qtype), qtype)
            self._exact_matrices[name] = m
        return m

    def _matmul_nt(self, x: Any, w: Any) -> Any:
        """x @ w.T; on the CPU in a float order no thread count changes (kquant.runtime.gemm);
        a GpuMatrix by the block kernels."""
        if isinstance(w, GpuMatrix):
            return w.product(x, self.xp)
        if self.xp is np:
            return matmul_nt(np.ascontiguousarray(x), w)
        return x @ w.T

    def _block_product(self, x: Any, w: Any, qtype: Any) -> Any:
        """x @ W.T on W's quantized blocks with ggml's integer dot products: the activations
        quantized to W's vec_dot type once for Q/K/V and once for gate/up, the kernels called
        directly (on the threads set_threads chose), as each of a token's ~200 products is
        short enough for per-call overhead to matter."""
        have = self._block_rows.get(id(w))
        if have is None or have[0] is not w:  # per matrix, once: its bytes and vec_dot type
            have = (w, weight_rows(w, qtype)[0], vec_dot_type(qtype))
            self._block_rows[id(w)] = have
        _, wb, vt = have
        with vectorizing():  # compiles on first use only
            acts = self._once_per_input(x, ("quantized", vt),
                                        lambda: quantize_rows(np.ascontiguousarray(x, dtype=F32), vt))
            return run_blocks(wb, qtype, acts)

    def _once_per_input(self, x: Any, key: tuple, make: Callable[[], Any]) -> Any:
        """make() for input x, or what it gave for the previous product if that had the same
        input and key: Q/K/V and gate/up share their input, so it is rounded or quantized once."""
        src, have, value = self._prepared
        if src is not x or have != key:
            value = make()
            self._prepared = (x, key, value)  # holding x keeps the identity test sound
        return value

    def _block(self, il: int, L: Layer, x: Any, segments: Sequence[Segment], pos: Any,
               observe: Observer | None, out_rows: Any = None) -> Any:
        n = L.names
        h = self._rms_norm(x, L.attn_norm)
        attn = self.self_attention(il, L, h, segments, pos, observe)
        attn = self._linear(attn, L.wo, L.bo, n["wo"], observe)
        if L.attn_post_norm is not None:  # gemma2: the output normed before the residual
            attn = self._rms_norm(attn, L.attn_post_norm)
        x = x + attn
        if out_rows is not None:  # llama.cpp's last block: the FFN on the output rows only
            x = x[out_rows]
        h = self._rms_norm(x, L.ffn_norm)
        if L.gate_inp is not None:
            y = self.moe_ffn(L, h, observe)
        else:
            y = self._linear(self.ffn_hidden(L, h, observe), L.w_down, None, n["w_down"], observe)
        if L.ffn_post_norm is not None:
            y = self._rms_norm(y, L.ffn_post_norm)
        x += y
        return x

    def self_attention(self, il: int, L: Layer, h: Any, segments: Sequence[Segment], pos: Any,
                       observe: Observer | None = None) -> Any:
        """The attention heads' output (N, n_head * head_dim) for the normed input h (N, n_embd),
        before the output matrix; the segments' keys and values go into their caches."""
        xp, c = self.xp, self.config
        n = L.names
        N = h.shape[0]
        if L.wqkv is not None:  # one product, split as llama.cpp's build_qkv views it
            qkv = self._linear(h, L.wqkv, L.bqkv, n["wqkv"], observe)
            q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
            q, k, v = (xp.ascontiguousarray(qkv[:, a:b]) for a, b in
                       ((0, q_dim), (q_dim, q_dim + kv_dim), (q_dim + kv_dim, q_dim + 2 * kv_dim)))
        else:
            q = self._linear(h, L.wq, L.bq, n["wq"], observe)
            k = self._linear(h, L.wk, L.bk, n["wk"], observe)
            v = self._linear(h, L.wv, L.bv, n["wv"], observe)
        q = q.reshape(N, c.n_head, c.head_dim)
        k = k.reshape(N, c.n_head_kv, c.head_dim)
        v = v.reshape(N, c.n_head_kv, c.head_dim)
        if L.q_norm is not None:
            q = self._rms_norm(q, L.q_norm)
        if L.k_norm is not None:
            k = self._rms_norm(k, L.k_norm)
        n_swa = c.n_swa if c.swa_layers and c.swa_layers[il] else 0
        factors = self._rope_factors(segments)
        # gemma3: the SWA layers' own base and scale (llama_model::get_rope_freq_base)
        base_scale = c.rope_swa if c.swa_layers and c.swa_layers[il] else None
        q = self._rope(q, pos, factors, base_scale)
        k = self._rope(k, pos, factors, base_scale)
        if c.scale_q:  # ggml_scale(Qcur, f_attention_scale) before attention
            q *= F32(c.q_scale)
        # llama.cpp's KV cache is F16 by default: attention reads the rounded values
        if xp is np:
            k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
            round_to_half(k.reshape(N, -1))  # views of k and v: rounded in place
            round_to_half(v.reshape(N, -1))
        else:
            k = k.astype(np.float16).astype(F32)
            v = v.astype(np.float16).astype(F32)
        attn = xp.empty((N, c.n_head * c.head_dim), F32)
        r = 0
        for seg in segments:
            T, n0, cache = len(seg.tokens), seg.cache.n, seg.cache
            cache.k[il][:, :, n0:n0 + T] = k[r:r + T].transpose(1, 2, 0)
            cache.v[il][:, n0:n0 + T] = v[r:r + T].transpose(1, 0, 2)
            attn[r:r + T] = self._attention(q[r:r + T], cache.k[il], cache.v[il], n0, n_swa)
            r += T
        return attn

    def ffn_hidden(self, L: Layer, h: Any, observe: Observer | None = None) -> Any:
        """silu(h @ Wgate^T) * (h @ Wup^T) (N, n_ff) for the normed input h: the input of
        the down matrix."""
        n = L.names
        if L.w_gate is None:  # fused (phi3): ggml_swiglu of the two halves, gate first
            gu = self._linear(h, L.w_up, None, n["w_up"], observe)
            n_ff = gu.shape[1] // 2
            g, u = self.xp.ascontiguousarray(gu[:, :n_ff]), self.xp.ascontiguousarray(gu[:, n_ff:])
        else:
            g = self._linear(h, L.w_gate, None, n["w_gate"], observe)
            u = self._linear(h, L.w_up, None, n["w_up"], observe)
        if self.config.ffn_act == "gelu":  # geglu: ggml's float16-table GELU of g, times u
            table = gelu_table()
            if self.xp is np:
                geglu(g, u, table)
                return g
            xp = self.xp
            t = xp.asarray(table)[xp.clip(g, -10, 10).astype(np.float16).view(np.uint16)]
            return xp.where(g <= -10, F32(0.0), xp.where(g >= 10, g, t)) * u
        # swiglu: silu(g) * u, silu(g) = g / (1 + exp(-g))
        if self.xp is np:
            swiglu(g, u)
        else:
            g = g / (F32(1.0) + self.xp.exp(-g)) * u
        return g

    def moe_ffn(self, L: Layer, h: Any, observe: Observer | None = None) -> Any:
        """The mixture of experts' output (N, n_embd) for the normed input h (build_moe_ffn
        with softmax gating, kquant.runtime.experts): each expert's SwiGLU FFN over the tokens
        routed to it, weighted, the k slots added in order; plus the shared expert scaled by
        sigmoid(h . ffn_gate_inp_shexp) where the block has one (qwen2moe)."""
        xp, c, n = self.xp, self.config, L.names
        if self.exact:
            raise ModelError("exact mode (llama.cpp's CPU float order) does not run mixture-of-experts "
                             "models yet")
        logits = self._linear(h, L.gate_inp, None, n["gate_inp"], observe)
        if xp is np:
            probs = router_softmax(np.ascontiguousarray(logits, dtype=F32))
        else:
            e = xp.exp(logits - logits.max(axis=1, keepdims=True))
            probs = to_host(e * (F32(1.0) / e.sum(axis=1, dtype=np.float64)).astype(F32)[:, None])
        ids, weights = route(probs, c.n_expert_used, c.expert_norm, c.expert_weights_scale)
        N, k = ids.shape
        if observe is not None:
            observe(n["up_exps"], ExpertInput(h, ids, c.n_expert))
            observe(n["gate_exps"], ExpertInput(h, ids, c.n_expert))
        out = xp.zeros((N, k, c.n_embd), F32)
        acts = xp.zeros((N, k, c.n_ff_exp), F32) if observe is not None else None
        for e, (tok, slot) in enumerate(expert_rows(ids, c.n_expert)):
            if not len(tok):
                continue
            tok_d, slot_d = xp.asarray(tok), xp.asarray(slot)
            x = h[tok_d]
            g = self._expert_linear(x, L.gate_exps, n["gate_exps"], e)
            u = self._expert_linear(x, L.up_exps, n["up_exps"], e)
            a = self._swiglu(g, u)
            if acts is not None:
                acts[tok_d, slot_d] = a
            out[tok_d, slot_d] = self._expert_linear(a, L.down_exps, n["down_exps"], e)
        if observe is not None:
            observe(n["down_exps"], ExpertInput(acts, ids, c.n_expert))
        out *= xp.asarray(weights)[:, :, None]  # ggml_mul(experts, weights)
        y = out[:, 0]
        for j in range(1, k):  # the views added in slot order
            y = y + out[:, j]
        if L.gate_inp_shexp is not None:
            gate = self._linear(h, L.gate_inp_shexp, None, n["gate_inp_shexp"], observe)
            # ggml_div(ggml_silu(g), g): the sigmoid as llama.cpp's graph spells it
            gate = gate / (F32(1.0) + xp.exp(-gate)) / gate
            hidden = self._swiglu(self._linear(h, L.w_gate_shexp, None, n["w_gate_shexp"], observe),
                                  self._linear(h, L.w_up_shexp, None, n["w_up_shexp"], observe))
            shexp = self._linear(hidden, L.w_down_shexp, None, n["w_down_shexp"], observe)
            y = y + shexp * gate
        return y

    def _expert_linear(self, x: Any, w: Any, name: str, e: int) -> Any:
        """x @ W[e].T for expert e of a stacked tensor, the activations rounded for its type as
        ggml_mul_mat_id rounds them (as _linear does for a matrix)."""
        qtype = self.weights.types.get(name, T.F32)
        src_x = x
        if qtype != T.F32:
            x = self._once_per_input(x, ("rounded", vec_dot_type(qtype)),
                                     lambda: round_activations(x, qtype, self.xp))
        y = self._matmul_nt(x, w[e])
        if name in self.weights.mins:
            y += self._matmul_nt(min_term_correction(src_x, qtype, self.xp), self.weights.mins[name][e])
        return y

    def _swiglu(self, g: Any, u: Any) -> Any:
        """silu(g) * u (ggml_swiglu_split), in g's place on the CPU."""
        if self.xp is np:
            g = np.ascontiguousarray(g)
            swiglu(g, np.ascontiguousarray(u))
            return g
        return g / (F32(1.0) + self.xp.exp(-g)) * u

    # --- the pass ---------------------------------------------------------------------------

    def forward(self, segments: Sequence[Segment], observe: Observer | None = None,
                logit_rows: Any = None, observe_output: bool = False,
                start: tuple[int, Any] | None = None, block_inputs: list | None = None) -> Any:
        """Run the segments (each continuing its own KV cache) as one batch.

        Returns the logits (rows, n_vocab) of the batch rows `logit_rows` (indices into the
        concatenated tokens; None = every row; an empty list = none, and None is returned).
        With `observe_output`, `observe("output.weight", ...)` sees the normed final states of
        every row, as llama-imatrix --process-output does (not for a tied output: no such tensor).

        `start` (block l, x) runs blocks l.. only, from x (rows, n_embd), the residual stream at
        block l's input of an earlier pass over the same tokens (their caches fresh);
        `block_inputs` gets each block's input appended (what `start` takes), then the last
        block's output (l = the block count: the logits only)."""
        xp, W = self.xp, self.weights
        tokens = np.concatenate([np.asarray(s.tokens, np.int64) for s in segments])
        if tokens.size and (tokens.min() < 0 or tokens.max() >= W.token_embd.shape[0]):
            raise ModelError(f"token id out of range (vocabulary of {W.token_embd.shape[0]})")
        for s in segments:
            if s.cache.n + len(s.tokens) > s.cache.n_ctx:
                raise ModelError(f"context of {s.cache.n_ctx} tokens exceeded")
        pos = np.concatenate([np.arange(s.cache.n, s.cache.n + len(s.tokens)) for s in segments])
        pos = xp.asarray(pos)
        if start is not None:
            first, x = start
        else:
            first, x = 0, xp.asarray(W.token_embd[tokens])
            if self.config.scale_embd:  # ggml_scale(inpL, sqrtf(n_embd))
                x *= np.sqrt(F32(self.config.n_embd))
        # an overflow becomes inf/NaN in the activations: the imatrix collector reports it with
        # the tensor's name, perplexity shows it; numpy's warnings would only add noise
        with np.errstate(over="ignore", invalid="ignore"):
            # exact: the rows whose logits are wanted leave the last block's attention, as
            # llama.cpp's inp_out_ids (its products' row groups then match llama.cpp's)
            # (llama-imatrix asks for every row's logits: with an observer, no rows are dropped)
            select = (self.exact and observe is None and not observe_output and block_inputs is None
                      and first < len(W.layers) and logit_rows is not None and len(logit_rows) > 0)
            out_rows = xp.asarray(np.asarray(logit_rows, np.int64)) if select else None
            last = len(W.layers) - 1
            for il in range(first, len(W.layers)):
                if block_inputs is not None:
                    block_inputs.append(x)
                x = self._block(il, W.layers[il], x, segments, pos, observe, out_rows if il == last else None)
            if block_inputs is not None:
                block_inputs.append(x)
        for s in segments:
            s.cache.n += len(s.tokens)
        want_logits = logit_rows is None or len(logit_rows) > 0
        if not (want_logits or observe_output):
            return None
        if observe_output:
            with np.errstate(over="ignore", invalid="ignore"):
                h = self._rms_norm(x, W.output_norm)
            if not W.output_tied:  # llama-imatrix collects by tensor name: a tied product is
                observe(OUTPUT, h)  # token_embd's, which it leaves out
            if logit_rows is not None:
                h = h[xp.asarray(np.asarray(logit_rows, np.int64))]
        else:
            if logit_rows is not None and out_rows is None:
                x = x[xp.asarray(np.asarray(logit_rows, np.int64))]
            h = self._rms_norm(x, W.output_norm)
        if not want_logits:
            return None
        self._prepared = (None, None, None)
        logits = self._linear(h, W.output, None, OUTPUT, None)
        if cap := F32(self.config.final_softcap):  # scale by 1/cap, tanh, scale by cap
            if self.exact and xp is np:  # libm's tanhf, as ggml_tanh (numpy's differs in the last bit)
                soft_cap(logits, cap)
            else:
                logits = cap * xp.tanh(logits * (F32(1.0) / cap))
        return logits


def load_model(path: str | Path, device: str = "cpu", progress: bool = True) -> Transformer:
    """A Transformer from a GGUF file (F32/F16/BF16 or quantized; split files too) or a Hugging
    Face model folder (read at float32)."""
    return Transformer(open_model(path, "f32"), device, progress)
