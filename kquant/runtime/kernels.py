"""Numba kernels for the parts of the forward pass numpy does slowly or single-threaded.

numpy's float32 exp runs at several ns per value here and every elementwise ufunc uses one core,
which would make attention's softmax and the SwiGLU cost as much as the matrix products. These
kernels are parallel over rows and use ggml's own vectorisable exp (ggml_v_expf: Cody-Waite range
reduction and a degree-5 polynomial, within 1 ulp of expf), so they also round like llama.cpp's
CPU backend does.  On a GPU the same steps run as CuPy expressions (`forward.py` picks).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from ..codecs.bits import bits_f32, f32_bits, fp16_to_fp32, fp32_to_fp16

F32 = np.float32

_R = F32(float.fromhex("0x1.8p23"))
_LOG2E = F32(float.fromhex("0x1.715476p+0"))
_LN2_HI = F32(float.fromhex("0x1.62e4p-1"))
_LN2_LO = F32(float.fromhex("0x1.7f7d1cp-20"))
_P5 = F32(float.fromhex("0x1.0e4020p-7"))
_P4 = F32(float.fromhex("0x1.573e2ep-5"))
_P3 = F32(float.fromhex("0x1.555e66p-3"))
_P2 = F32(float.fromhex("0x1.fffdb6p-2"))
_P1 = F32(float.fromhex("0x1.ffffecp-1"))
_ONE_BITS = np.int32(0x3F800000)
_G_BITS = np.int32(-0x7E000000)  # 0x82000000 as int32
_S1_BITS = np.int32(0x7F000000)


@intrinsic
def fmaf(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma.f32: vfmadd with FMA3), as _mm256_fmadd_ps."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return builder.fma(*args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(inline="always")
def expf(x):
    """ggml_v_expf (ggml-cpu/vec.h, the AVX2+FMA version), one lane: exp(x) for float32 x,
    with the same fused multiply-adds, so it rounds as llama.cpp's softmax and SiLU do."""
    z = fmaf(x, _LOG2E, _R)
    n = z - _R
    b = fmaf(-n, _LN2_LO, fmaf(-n, _LN2_HI, x))
    e = np.int32(np.int64(f32_bits(z)) << 23)
    k = bits_f32(np.int32(e + _ONE_BITS))
    u = b * b
    j = fmaf(fmaf(fmaf(_P5, b, _P4), u, fmaf(_P3, b, _P2)), u, _P1 * b)
    fast = fmaf(j, k, k)
    an = abs(n)
    g = _G_BITS if n <= F32(0.0) else np.int32(0)
    s1 = bits_f32(np.int32(g + _S1_BITS))
    s2 = bits_f32(np.int32(e - g))
    slow = s1 * s1 if an > F32(192.0) else fmaf(s2, j, s2) * s1
    return fast if an <= F32(126.0) else slow


@njit(fastmath=True, cache=True)
def _scale_max(row, n, scale):
    """row[:n] *= scale; returns the max (fastmath lets LLVM vectorise the reduction)."""
    m = F32(-np.inf)
    for j in range(n):
        v = row[j] * scale
        row[j] = v
        m = max(m, v)
    return m


@njit(fastmath=True, cache=True)
def _sum(row, n):
    total = 0.0
    for j in range(n):
        total += row[j]
    return total


@njit(parallel=True, cache=True)
def softmax_causal(s, scale, first_masked):
    """In place over rows of s (rows, S) of raw scores q.k: keys j >= first_masked[r] are masked
    out; the rest become exp(scale * x - max). Returns each row's sum (accumulated in float64,
    as ggml does) as float32; the caller divides after multiplying by V, as flash attention does."""
    rows, S = s.shape
    sums = np.empty(rows, np.float32)
    for r in prange(rows):
        L = min(first_masked[r], S)
        row = s[r]
        m = _scale_max(row, L, scale)
        for j in range(L):  # no reduction in this loop, so the exp vectorises
            row[j] = expf(row[j] - m)
        for j in range(L, S):
            row[j] = F32(0.0)
        sums[r] = F32(_sum(row, L))
    return sums


@njit(parallel=True, cache=True)
def softmax_window(s, scale, softcap, first_visible, first_masked):
    """softmax_causal with keys j < first_visible[r] masked too (a sliding window) and, where
    softcap > 0, the scores soft-capped as ggml's flash attention caps them:
    softcap * tanhf(x * scale) with `scale` already divided by softcap."""
    rows, S = s.shape
    sums = np.empty(rows, np.float32)
    for r in prange(rows):
        L = min(first_masked[r], S)
        f = max(min(first_visible[r], L), 0)
        row = s[r]
        m = F32(-np.inf)
        for j in range(f, L):
            v = row[j] * scale
            if softcap > 0:
                v = softcap * F32(math.tanh(v))
            row[j] = v
            m = max(m, v)
        for j in range(f, L):
            row[j] = expf(row[j] - m)
        for j in range(f):
            row[j] = F32(0.0)
        for j in range(L, S):
            row[j] = F32(0.0)
        total = 0.0
        for j in range(f, L):
            total += row[j]
        sums[r] = F32(total)
    return sums


@njit(parallel=True, cache=True)
def round_to_half(x):
    """In place over rows of x (rows, n): every value rounded to float16 and back, as llama.cpp's
    F16 KV cache stores keys and values (numpy's astype pair, without its two temporaries)."""
    rows, n = x.shape
    for r in prange(rows):
        for j in range(n):
            x[r, j] = fp16_to_fp32(fp32_to_fp16(x[r, j]))


@njit(parallel=True, cache=True)
def swiglu(g, u):
    """In place: g <- silu(g) * u, silu(x) = x / (1 + exp(-x)) (ggml_v_silu)."""
    rows, n = g.shape
    for r in prange(rows):
        for j in range(n):
            x = g[r, j]
            g[r, j] = x / (F32(1.0) + expf(-x)) * u[r, j]


@njit(parallel=True, cache=True)
def accumulate_sumsq(accs, x):
    """accs[k, j] += x[r, j]^2 for every row r in order, for each row k of `accs` (the
    matrices that share an input: Q/K/V, gate/up): llama-imatrix's float32 loop, column blocks
    in parallel, each column in its own sequential order. A block is summed in a local array,
    which LLVM knows does not alias x, so the column loop vectorises. (accs is one 2-D array,
    not a tuple: a tuple of 1, 2 or 3 arrays compiled three times, 8 s of a first run.)"""
    rows, n = x.shape
    block = 64
    for b in prange((n + block - 1) // block):
        j0 = b * block
        w = min(n, j0 + block) - j0
        local = np.empty((len(accs), block), np.float32)
        for k in range(len(accs)):
            for j in range(w):
                local[k, j] = accs[k][j0 + j]
        for r in range(rows):
            xr = x[r, j0:j0 + w]
            for k in range(len(accs)):
                for j in range(w):
                    local[k, j] += xr[j] * xr[j]
        for k in range(len(accs)):
            for j in range(w):
                accs[k][j0 + j] = local[k, j]


@njit(cache=True)
def rope_theta_scale(base, n_rot):
    """libm's powf(base, -2.0f/n_rot), as ggml_rope_cache_init computes it: numpy's float32
    power takes a SIMD path on AVX-512 machines that is 1 ulp off for base 10000."""
    return math.pow(np.float32(base), np.float32(-2.0) / np.float32(n_rot))


@njit(cache=True)
def rope_table(theta):
    """cos and sin of float32 angles with libm's cosf/sinf, which ggml_rope_cache_init calls."""
    cos = np.empty_like(theta)
    sin = np.empty_like(theta)
    for i in range(theta.shape[0]):
        for j in range(theta.shape[1]):
            cos[i, j] = math.cos(theta[i, j])
            sin[i, j] = math.sin(theta[i, j])
    return cos, sin


@njit(parallel=True, cache=True)
def rope_inplace(x, pos, cos, sin, n_rot, neox):
    """Rotate the first n_rot dims of every head of x (rows, heads, head_dim) by the angles of
    position pos[row] (tables cos/sin: (positions, n_rot / 2)): ggml_rope's NORM mode rotates
    adjacent pairs (2i, 2i+1), NEOX mode the halves (i, i + n_rot/2). The products are fused as
    GCC compiles ggml's rotate_pairs (x0*cos - x1*sin -> fma(x0, cos, -(x1*sin))): bit-exact."""
    rows, heads, _ = x.shape
    half = n_rot // 2
    for r in prange(rows):
        c = cos[pos[r]]
        s = sin[pos[r]]
        for h in range(heads):
            v = x[r, h]
            for i in range(half):
                a = 2 * i if not neox else i
                b = a + 1 if not neox else i + half
                x0 = v[a]
                x1 = v[b]
                v[a] = fmaf(x0, c[i], -(x1 * s[i]))
                v[b] = fmaf(x0, s[i], x1 * c[i])


@njit(parallel=True, cache=True)
def token_nll(logits, targets):
    """Per row: -log softmax(logits)[target] (llama-perplexity's log_softmax: expf of the
    max-shifted logits summed in double), the target's logit and its probability."""
    rows, n = logits.shape
    nll = np.empty(rows, np.float64)
    logit = np.empty(rows, np.float32)
    prob = np.empty(rows, np.float32)
    for r in prange(rows):
        row = logits[r]
        m = _max(row, n)
        e = np.empty(n, np.float32)
        for j in range(n):  # vectorised; the sum is a separate (fastmath) reduction
            e[j] = expf(row[j] - m)
        total = _sum(e, n)
        t = targets[r]
        nll[r] = -(float(row[t] - m) - np.log(total))
        logit[r] = row[t]
        prob[r] = expf(row[t] - m) / F32(total)
    return nll, logit, prob


@njit(fastmath=True, cache=True)
def _max(row, n):
    m = F32(-np.inf)
    for j in range(n):
        m = max(m, row[j])
    return m


FA_TILE = 64  # GGML_FA_TILE_KV (ggml-cpu/common.h): keys per tile of the online softmax


@njit(cache=True, inline="always")
def _first_key(last, n_swa):
    """The first key a query whose last visible key is `last` sees: 0, or with a sliding
    window of n_swa keys (llama.cpp's is_masked_swa: p1 - p0 >= n_swa is masked) last - n_swa + 1."""
    return max(0, last - n_swa + 1) if n_swa > 0 else 0


@njit(cache=True, inline="always")
def _capped(s, softcap):
    """ggml's logit soft-capping of a scaled score (scale already divided by the cap):
    softcap * tanhf(s), libm's tanhf as ggml_vec_tanh_f32 calls it."""
    return softcap * F32(math.tanh(s)) if softcap != F32(0.0) else s


@njit(parallel=True, cache=True)
def flash_attention(q, kt, v, n0, scale, n_rep, out, softcap=F32(0.0), n_swa=0):
    """Causal attention of queries q (T, n_head, d) at positions n0.. over keys kt (n_head_kv,
    d, keys) and values v (n_head_kv, keys, d) into out (T, n_head, d), computed as ggml's CPU
    flash attention (ops.cpp, ggml_compute_forward_flash_attn_ext_tiled) computes it: per tile
    of 64 keys, scores as a fused multiply-add chain over d (simd_gemm), scaled, the running
    maximum and sum updated with libm's expf, probabilities with ggml_v_expf and the tile sum
    taken 8 lanes at a time as AVX2 does, values accumulated by fused multiply-adds over the
    tile's keys, and the result scaled by 1/sum. Query head h reads KV head h // n_rep.

    `softcap` > 0: each scaled score s becomes softcap * tanhf(s) (`scale` is then already
    divided by it, as ggml divides it); `n_swa` > 0: keys n_swa or more positions back are
    masked (-inf in their tile, as ggml adds its mask; tiles with none visible skipped)."""
    T, n_head, d = q.shape
    for th in prange(T * n_head):
        t = th // n_head
        h = th % n_head
        kvh = h // n_rep
        last = n0 + t  # the last key this query sees
        first = _first_key(last, n_swa)
        m = F32(-np.inf)
        s_sum = F32(0.0)
        acc = np.zeros(d, np.float32)
        sc = np.empty(FA_TILE, np.float32)
        qv = q[t, h]
        for ic in range(first - first % FA_TILE, last + 1, FA_TILE):
            w = min(FA_TILE, last + 1 - ic)
            for j in range(FA_TILE):
                sc[j] = F32(0.0)
            for dk in range(d):
                qd = qv[dk]
                krow = kt[kvh, dk, ic:ic + w]
                for j in range(w):
                    sc[j] = fmaf(qd, krow[j], sc[j])
            for j in range(w):
                sc[j] = _capped(sc[j] * scale, softcap)
            for j in range(min(w, first - ic)):  # before the window
                sc[j] = F32(-np.inf)
            for j in range(w, FA_TILE):
                sc[j] = F32(-np.inf)
            tile_max = _max(sc, FA_TILE)
            m_new = max(m, tile_max)
            if m_new > m:
                ms = F32(math.exp(m - m_new))
                for i in range(d):
                    acc[i] *= ms
                s_sum *= ms
            m = m_new
            for j in range(FA_TILE):
                sc[j] = expf(sc[j] - m)
            total = 0.0
            for g in range(0, FA_TILE, 8):
                lo = (sc[g + 4] + sc[g]) + (sc[g + 6] + sc[g + 2])
                hi = (sc[g + 5] + sc[g + 1]) + (sc[g + 7] + sc[g + 3])
                total += float(lo + hi)
            s_sum = F32(float(s_sum) + total)
            for j in range(w):
                p = sc[j]
                vrow = v[kvh, ic + j]
                for i in range(d):
                    acc[i] = fmaf(p, vrow[i], acc[i])
        inv = F32(1.0) / s_sum if s_sum != F32(0.0) else F32(0.0)
        for i in range(d):
            out[t, h, i] = acc[i] * inv


@njit(cache=True, inline="always")
def _f16(x):
    """x rounded to the nearest float16 (as F16C's vcvtps2ph stores it), as float32."""
    return fp16_to_fp32(fp32_to_fp16(x))


@njit(cache=True, inline="always")
def _reduce4x8(acc):
    """GGML_F32x8_REDUCE of four 8-lane accumulators acc (4, 8): acc0 += acc2, acc1 += acc3,
    acc0 += acc1, then lanes i + (i + 4), then two horizontal adds."""
    t = np.empty(4, np.float32)
    for i in range(4):
        lo = (acc[0, i] + acc[2, i]) + (acc[1, i] + acc[3, i])
        hi = (acc[0, i + 4] + acc[2, i + 4]) + (acc[1, i + 4] + acc[3, i + 4])
        t[i] = lo + hi
    return (t[0] + t[1]) + (t[2] + t[3])


@njit(cache=True)
def _vec_dot_f16(qh, kt, kvh, key, acc):
    """ggml_vec_dot_f16 (AVX2) of the F16-rounded query qh (d,) and key `key` of kt: four
    8-lane fused multiply-add accumulators over each 32 values, reduced by _reduce4x8, the
    leftovers added in double."""
    d = qh.shape[0]
    np32 = d - d % 32
    acc[:, :] = F32(0.0)
    for i in range(0, np32, 32):
        for j in range(4):
            for lane in range(8):
                c = i + 8 * j + lane
                acc[j, lane] = fmaf(qh[c], kt[kvh, c, key], acc[j, lane])
    total = float(_reduce4x8(acc)) if np32 else 0.0
    for c in range(np32, d):
        total += float(qh[c] * kt[kvh, c, key])
    return F32(total)


@njit(cache=True)
def _one_chunk(qh, kt, v, kvh, ic_start, ic_end, scale, softcap, acc, vkq):
    """The online softmax of ggml_compute_forward_flash_attn_ext_f16_one_chunk for one query
    (qh: already rounded to F16) over the cells ic_start .. ic_end - 1 of KV head kvh (all of
    them visible: ggml skips masked cells before touching them): vkq (dv,) receives the
    unnormalised V sum (F16 values held as float32); returns (M, S), the maximum score and the
    sum of exp(score - M), (-inf, 0) for an empty range."""
    dv = vkq.shape[0]
    for i in range(dv):
        vkq[i] = F32(0.0)
    m = F32(-np.inf)
    s_sum = F32(0.0)
    for ic in range(ic_start, ic_end):
        s = _capped(_vec_dot_f16(qh, kt, kvh, ic, acc) * scale, softcap)
        ms = F32(1.0)
        vs = F32(1.0)
        if s > m:
            m_old = m
            m = s
            ms = F32(math.exp(m_old - m))
            for i in range(dv):
                vkq[i] = _f16(vkq[i] * ms)
        else:
            vs = F32(math.exp(s - m))
        vrow = v[kvh, ic]
        for i in range(dv):
            vkq[i] = _f16(fmaf(vrow[i], vs, vkq[i]))
        s_sum = fmaf(s_sum, ms, vs)
    return m, s_sum


@njit(parallel=True, cache=True)
def flash_attention_vec(q, kt, v, n0, scale, n_rep, out, softcap=F32(0.0), n_swa=0):
    """The same attention as flash_attention, computed as ggml's CPU backend computes it for
    fewer than 64 queries per sequence (generation, a short last ubatch):
    ggml_compute_forward_flash_attn_ext_f16_one_chunk. Per query: the query rounded to F16,
    each visible key's score by ggml_vec_dot_f16 and scaled, the online softmax one key at a
    time with libm's expf, and V accumulated in F16 (ggml_vec_mad_f16 / ggml_vec_scale_f16: a
    float32 fused multiply-add or product, rounded to F16 on every store); the sum
    S = S * ms + vs fused as GCC compiles it; the result scaled by 1/S.

    This is ggml's whole-KV path; a single query over a KV view of 512 cells or more takes
    ggml's split-KV path instead, whose result depends on the thread count:
    flash_attention_split_kv (`uses_split_kv` says which)."""
    T, n_head, d = q.shape
    dv = v.shape[2]
    for th in prange(T * n_head):
        t = th // n_head
        h = th % n_head
        kvh = h // n_rep
        qh = np.empty(d, np.float32)
        for c in range(d):
            qh[c] = _f16(q[t, h, c])
        acc = np.empty((4, 8), np.float32)
        vkq = np.empty(dv, np.float32)  # F16 values held as float32
        # ggml skips the masked cells (before the window) without touching them
        _, s_sum = _one_chunk(qh, kt, v, kvh, _first_key(n0 + t, n_swa), n0 + t + 1, scale, softcap, acc, vkq)
        inv = F32(1.0) / s_sum if s_sum != F32(0.0) else F32(0.0)
        for i in range(dv):
            out[t, h, i] = vkq[i] * inv


FA_KV_PAD = 256  # llama_kv_cache::get_n_kv: the KV view is the used cells padded to 256
FA_SPLIT_KV_MIN = 512  # ggml_compute_forward_flash_attn_ext_f16: use_split_kv_path from here


def kv_view_length(n_cells: int) -> int:
    """llama.cpp's n_kv for a sequence with n_cells cells in use (the batch's own included):
    max(256, GGML_PAD(used_max_p1, 256)), capped by the cache's size, which llama.cpp pads to
    a multiple of 256 (llama_context: n_ctx = GGML_PAD(n_ctx, 256)), so never below it."""
    return max(FA_KV_PAD, -(-n_cells // FA_KV_PAD) * FA_KV_PAD)


def uses_split_kv(n_queries: int, n_kv: int) -> bool:
    """Whether ggml's CPU flash attention takes its split-KV path (one query of one sequence,
    F16/F32 K and V, a KV view of at least 512 cells): flash_attention_split_kv."""
    return n_queries == 1 and n_kv >= FA_SPLIT_KV_MIN


@njit(parallel=True, cache=True)
def flash_attention_split_kv(q, kt, v, n0, n_kv, nth, scale, n_rep, out, softcap=F32(0.0), n_swa=0):
    """One query q (1, n_head, d) at position n0 over keys kt (n_head_kv, d, keys) and values v
    (n_head_kv, keys, d), cells 0 .. n0 visible, into out (1, n_head, d), as ggml's CPU backend
    computes it when llama.cpp's KV view is n_kv >= 512 cells (a decode step once more than
    256 cells are in use; n_kv as kv_view_length gives it) and its graph runs on nth threads:
    ggml_compute_forward_flash_attn_ext_f16's use_split_kv_path.

    The cells [0, n_kv) are split into nth chunks of ceil(n_kv / nth) cells, thread ith taking
    chunk ith; each chunk runs flash_attention_vec's one-chunk online softmax over its visible
    cells (the masked ones are skipped) and leaves M, S and the unnormalised V sum; then
    ggml_flash_attn_ext_reduce_partials combines the chunks in order, skipping those with
    S == 0 (fully masked): M' = max(M, Mc), a = expf(M - M'), b = expf(Mc - M'),
    V = fmaf(V, a, Vc * b), S = fmaf(S, a, Sc * b) (GCC contracts both into one FMA in
    llama.cpp's x86 AVX2 build), and the result is V * (1 / S). The value depends on nth:
    llama.cpp's thread count for the decode (its n_threads, -t)."""
    _, n_head, d = q.shape
    dv = v.shape[2]
    chunk = (n_kv + nth - 1) // nth
    visible = n0 + 1
    first = _first_key(n0, n_swa)
    part = np.empty((n_head, nth, 2 + dv), np.float32)
    for hc in prange(n_head * nth):
        h = hc // nth
        c = hc % nth
        kvh = h // n_rep
        ic_start = max(c * chunk, first)
        ic_end = min(c * chunk + chunk, n_kv, visible)
        qh = np.empty(d, np.float32)
        for i in range(d):
            qh[i] = _f16(q[0, h, i])
        acc = np.empty((4, 8), np.float32)
        vkq = np.empty(dv, np.float32)
        m, s_sum = _one_chunk(qh, kt, v, kvh, ic_start, ic_end, scale, softcap, acc, vkq)
        part[h, c, 0] = m
        part[h, c, 1] = s_sum
        for i in range(dv):
            part[h, c, 2 + i] = vkq[i]
    for h in prange(n_head):
        m = F32(-np.inf)
        s_sum = F32(0.0)
        vkq = np.zeros(dv, np.float32)
        for c in range(nth):
            if c * chunk >= n_kv:
                continue
            s_c = part[h, c, 1]
            if s_c == F32(0.0):
                continue
            m_c = part[h, c, 0]
            m_new = max(m, m_c)
            a = F32(math.exp(m - m_new))
            b = F32(math.exp(m_c - m_new))
            for i in range(dv):
                vkq[i] = fmaf(vkq[i], a, part[h, c, 2 + i] * b)
            s_sum = fmaf(s_sum, a, s_c * b)
            m = m_new
        if s_sum != F32(0.0):
            inv = F32(1.0) / s_sum
            for i in range(dv):
                vkq[i] = vkq[i] * inv
        for i in range(dv):
            out[0, h, i] = vkq[i]


@njit(cache=True)
def _pairwise_sum(a, lo, n):
    """numpy's pairwise summation (pairwise_sum in loops_utils.h) of a[lo:lo + n]: eight
    running sums over blocks of up to 128, halves (cut to a multiple of 8) above."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    if n <= 128:
        r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
        r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
        i = 8
        while i < n - n % 8:
            r0 += a[lo + i]
            r1 += a[lo + i + 1]
            r2 += a[lo + i + 2]
            r3 += a[lo + i + 3]
            r4 += a[lo + i + 4]
            r5 += a[lo + i + 5]
            r6 += a[lo + i + 6]
            r7 += a[lo + i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[lo + i]
            i += 1
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum(a, lo, n2) + _pairwise_sum(a, lo + n2, n - n2)


@njit(parallel=True, cache=True)
def rms_norm_rows(x, w, eps):
    """x (rows, n) float32 RMS-normalized and times w (n,), to the bit what numpy computes for
    `s = (x * x).sum(-1, dtype=float64); y = x * (1 / sqrt(float32(s / n) + eps)); y *= w`:
    the squares rounded to float32, added in double in numpy's pairwise order over its
    8192-element casting buffers, one after another. One call instead of numpy's six, which
    for the one row of a generated token cost 10x the arithmetic."""
    rows, n = x.shape
    y = np.empty((rows, n), np.float32)
    for r in prange(rows):
        sq = np.empty(n, np.float64)
        for j in range(n):
            v = x[r, j] * x[r, j]
            sq[j] = np.float64(v)
        total = 0.0
        for a in range(0, n, 8192):
            total += _pairwise_sum(sq, a, min(8192, n - a))
        mean = np.float32(total / n)
        scale = np.float32(1.0) / np.sqrt(mean + eps)
        for j in range(n):
            y[r, j] = (x[r, j] * scale) * w[j]
    return y


@njit(parallel=True, cache=True)
def rms_sums(x):
    """Per row the sum of squares as ggml_compute_forward_rms_norm_f32 adds them: each square
    rounded to float, then added in double in order (numpy's sum adds pairwise)."""
    rows, n = x.shape
    out = np.empty(rows, np.float64)
    for r in prange(rows):
        total = 0.0
        for j in range(n):
            v = x[r, j]
            total += float(v * v)
        out[r] = total
    return out


@njit(parallel=True, cache=True)
def token_nll_exact(logits, targets):
    """token_nll as llama-perplexity's log_softmax computes it, to the bit: the maximum, then
    libm's expf of every shifted logit added in double in order."""
    rows, n = logits.shape
    nll = np.empty(rows, np.float64)
    logit = np.empty(rows, np.float32)
    prob = np.empty(rows, np.float32)
    for r in prange(rows):
        row = logits[r]
        m = row[0]
        for j in range(1, n):
            m = max(m, row[j])
        total = 0.0
        for j in range(n):
            total += float(F32(math.exp(row[j] - m)))
        t = targets[r]
        nll[r] = -(float(row[t] - m) - math.log(total))
        logit[r] = row[t]
        prob[r] = F32(math.exp(row[t] - m)) / F32(total)
    return nll, logit, prob


_GELU_COEF_A = F32(0.044715)
_SQRT_2_OVER_PI = F32(0.79788456080286535587989211986876)


@njit(cache=True)
def _gelu_table():
    """ggml_table_gelu_f16: for every float16 x, ggml_gelu_f32(x) (the tanh approximation, in
    float with libm's tanhf) rounded to float16; here widened back to float32."""
    out = np.empty(1 << 16, np.float32)
    for i in range(1 << 16):
        x = fp16_to_fp32(np.uint16(i))
        t = F32(math.tanh(_SQRT_2_OVER_PI * x * (F32(1.0) + _GELU_COEF_A * x * x)))
        y = F32(0.5) * x * (F32(1.0) + t)
        out[i] = fp16_to_fp32(fp32_to_fp16(y))
    return out


_GELU_TABLE: np.ndarray | None = None


def gelu_table() -> np.ndarray:
    """The table ggml's CPU GELU reads (GGML_GELU_FP16), made once."""
    global _GELU_TABLE
    if _GELU_TABLE is None:
        with np.errstate(all="ignore"):
            _GELU_TABLE = _gelu_table()
    return _GELU_TABLE


@njit(parallel=True, cache=True)
def geglu(g, u, table):
    """In place: g <- gelu(g) * u as ggml_vec_geglu_f32 computes it: 0 at or below -10, the
    identity at or above 10, else the float16 table at g rounded to float16."""
    rows, n = g.shape
    for r in prange(rows):
        for j in range(n):
            x = g[r, j]
            if x <= F32(-10.0):
                g[r, j] = F32(0.0)
            elif x >= F32(10.0):
                g[r, j] = x * u[r, j]
            else:
                g[r, j] = table[fp32_to_fp16(x)] * u[r, j]


@njit(parallel=True, cache=True)
def soft_cap(x, cap):
    """x = cap * tanhf(x * (1 / cap)) in place, rows in parallel: ggml_scale, ggml_tanh (libm's
    tanhf per value) and ggml_scale, as llama.cpp soft-caps gemma2's logits."""
    inv = F32(1.0) / cap
    rows, n = x.shape
    for r in prange(rows):
        for j in range(n):
            x[r, j] = F32(math.tanh(x[r, j] * inv)) * cap


#: the line the commands print before a forward pass whose kernels Numba has yet to compile
COMPILING = "compiling the forward pass's kernels, once (Numba keeps them for later runs)..."


def forward_compiled() -> bool:
    """Whether Numba's cache holds the kernels every CPU forward pass calls (a first run
    compiles them for 10-20 s on this project's 2-vCPU machine: worth a line to the user)."""
    from ..codecs.warm import is_cached
    return all(is_cached(k) for k in (rope_inplace, softmax_causal, round_to_half))
