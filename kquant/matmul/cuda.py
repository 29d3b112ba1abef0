"""Numba-CUDA matrix products straight from ggml's quantized blocks.

    dw = to_device(w, "Q4_K")     # w: uint8 (rows, row_bytes) as llama.cpp stores the tensor
    y = matvec(dw, "Q4_K", x)     # y = W x,   x: (cols,)         -> (rows,)
    Y = matmul(dw, "Q4_K", X)     # Y = X W^T, X: (tokens, cols)  -> (tokens, rows)

Types: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16, F32.
`x`/`X` may be numpy arrays (copied in, the result comes back as numpy) or numba.cuda device
arrays (the result stays on the device: nothing is copied, the call returns once the kernel is
queued). Activations are float32; the result is float32.

Arithmetic: weights are dequantized in registers to exactly ggml's float32 values
(`kquant.dequantize`, see cuda_blocks.py) and multiplied with the float32 activations, with
float32 accumulation (fused multiply-adds), so the result is W x up to float32 summation
rounding. ggml's own CUDA path (mmvq.cu / vecdotq.cuh) instead quantizes the activations to
Q8_1 and multiplies 8-bit integers with dp4a: that rounds x to 8 bits per 32 values (about
1e-2 relative error per product) and needs an intrinsic Numba does not expose (emulating it
costs 4 integer multiply-adds per 4 values, no cheaper than float FMAs). The cost of the
float path: about 7 instructions per weight value (extract the level, make it a float
without a conversion instruction, ggml's scale-and-offset, one FMA per token) and 4 bytes of
activation read per value for each row pair (a warp takes two rows so each activation load
serves both). Types of 5 bits and more should stay bound by reading the weights; for the
2-4-bit K-quants on the fastest GPUs that work may become the limit (unmeasured: this was
written without a GPU). The prefill kernel dequantizes each weight once per tile of 32
tokens, which makes the dequantization cost small next to the FMAs.

Kernels (one family per type, sharing two templates):
- `warp` (matvec, and matmul for 1..8 tokens): a warp per pair of output rows, or 2-4 warps
  per pair that split the rows' blocks (launch configuration chosen from the shape, after
  ggml's mmvq). Lanes take consecutive slices of consecutive blocks, so each warp load reads
  consecutive words; each lane dequantizes its 4-16 values of both rows into registers, and
  every activation it loads feeds both rows, for every token. Float32 partial sums per lane,
  reduced with `cuda.shfl_down_sync`, then across the warps of a row in shared memory.
- `tiled` (matmul for more tokens): a 64-row x 32-token output tile per 128-thread block.
  Per 128-column chunk the block dequantizes its 64 rows into shared memory (each weight
  decoded once per 32 tokens), stages the 32 tokens' activations, and each thread
  accumulates a 2-row x 8-token register tile in float32 (no shared-memory bank conflicts).

Compilation is lazy: importing this module touches neither numba.cuda nor a GPU; kernels are
built on first use and compiled by Numba for the argument types of the first launch.
Under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), which lacks warp shuffles, an
emulation of `shfl_down_sync` is added to the simulator (valid here because every thread of
a block reaches each reduction together).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import float32

from ..types import get_type  # the record, not the codec: some types run without one
from .cuda_blocks import CHUNK, FAMILIES, Family

U = np.uint64      # index conversion: unsigned indices skip Numba's negative-index wraparound

__all__ = ["DeviceWeights", "to_device", "matvec", "matmul", "SUPPORTED_TYPES", "MAX_WARP_TOKENS"]

#: ggml types these kernels multiply
SUPPORTED_TYPES = tuple(FAMILIES)
#: token counts up to this use the warp-per-row kernel; more use the tiled kernel
MAX_WARP_TOKENS = 8

# tiled kernel geometry
TILE_ROWS = 64
TILE_TOKENS = 32
TILE_THREADS = 128

cuda: Any = None   # numba.cuda, bound on first use (kernels refer to it as a module global)
_lock = threading.Lock()
_kernels: dict[tuple, Any] = {}


def _cuda():
    global cuda
    if cuda is None:
        from numba import config
        from numba import cuda as numba_cuda
        if config.ENABLE_CUDASIM:
            _install_simulator_shuffle()
            _install_simulator_shared_lock()
        cuda = numba_cuda
    return cuda


def _device_array(a):
    """`a` as a numba.cuda device array if it is one (or exposes __cuda_array_interface__,
    e.g. CuPy), else None."""
    cu = _cuda()
    if hasattr(cu, "is_cuda_array"):            # real CUDA
        if cu.is_cuda_array(a):
            # sync=False: by default Numba synchronizes the exporter's stream (CuPy's, the
            # legacy default stream) on every import, a host-device sync per product. The
            # kernels launch on that same default stream, which orders them after CuPy's work
            # (unless CuPy or Numba is switched to per-thread default streams).
            return a if hasattr(a, "copy_to_host") else cu.as_cuda_array(a, sync=False)
        return None
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    return a if isinstance(a, FakeCUDAArray) else None


def _family(weight_type) -> Family:
    name = get_type(weight_type).name
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"no CUDA matmul kernel for {name}; supported: "
                         f"{', '.join(SUPPORTED_TYPES)}") from None


# ---------------------------------------------------------------------------------------------
# weights on the device

@dataclass(frozen=True)
class DeviceWeights:
    """A quantized matrix on the device: the raw block bytes plus the views the kernels read."""
    weight_type: str
    rows: int
    cols: int
    raw: Any            # uint8 (rows, row_bytes) device array: the blocks, byte for byte
    q: Any              # view of raw read by the decoders (uint32, uint16 or float32)
    h: Any              # float16 view of raw (the blocks' fp16 scales, F16 values)

    @property
    def n_blocks(self) -> int:
        """Blocks per row as the kernels count them (virtual 128-value blocks for floats)."""
        return -(-self.cols // FAMILIES[self.weight_type].qk)

    @property
    def nbytes(self) -> int:
        return self.rows * self.raw.shape[1]


_VIEW = {"u32": np.uint32, "u16": np.uint16, "f32": np.float32}


def to_device(w, weight_type, stream=0) -> DeviceWeights:
    """Copy a quantized matrix to the device: `w` is uint8 (rows, row_bytes), as llama.cpp
    stores the tensor (any dtype is taken as its bytes, e.g. float16 for F16), or a uint8
    numba.cuda device array of that shape (not copied). Returns a DeviceWeights."""
    fam = _family(weight_type)
    cu = _cuda()
    codec = get_type(weight_type)
    dev = _device_array(w)
    if dev is not None:
        if dev.dtype != np.uint8 or dev.ndim != 2:
            raise ValueError("a device weight array must be uint8 (rows, row_bytes)")
        raw = dev
        if not raw.is_c_contiguous():
            raise ValueError("the device weight array must be C-contiguous")
    else:
        a = np.asarray(w)
        if a.ndim != 2:
            raise ValueError(f"weights must be 2-D (rows, row_bytes), got shape {a.shape}")
        a = np.ascontiguousarray(a).view(np.uint8)
        raw = cu.to_device(a, stream=stream)
    rows, row_bytes = raw.shape
    if row_bytes == 0 or row_bytes % codec.type_size:
        raise ValueError(f"{codec.name}: a row of {row_bytes} bytes is not a whole number of "
                         f"{codec.type_size}-byte blocks")
    cols = row_bytes // codec.type_size * codec.block_size
    return DeviceWeights(codec.name, rows, cols, raw, raw.view(_VIEW[fam.view]),
                         raw.view(np.float16))


def _weights(dw, weight_type) -> DeviceWeights:
    if isinstance(dw, DeviceWeights):
        if get_type(weight_type).name != dw.weight_type:
            raise ValueError(f"weights are {dw.weight_type}, not {get_type(weight_type).name}")
        return dw
    return to_device(dw, weight_type)


def _inputs(dw, weight_type, x):
    """The DeviceWeights of `dw`; `x` as a device array if it is one, else as numpy; whether
    it was on the device (the result then stays there)."""
    dw = _weights(dw, weight_type)  # first: an unsupported type fails before numba.cuda loads
    dev = _device_array(x)
    on_device = dev is not None
    return dw, dev if on_device else np.asarray(x), on_device


# ---------------------------------------------------------------------------------------------
# host API

def matvec(dw, weight_type, x, out=None, *, warps_per_row: int | None = None):
    """y = W x for one activation vector `x` (cols,) float32 -> y (rows,) float32.

    `dw` is a DeviceWeights from `to_device` (or raw weights, copied on each call). `x` as a
    numpy array returns numpy; as a device array returns a device array (`out` if given, a
    float32 (rows,) device array). `warps_per_row` overrides the launch heuristic (1, 2 or 4).
    """
    dw, x, on_device = _inputs(dw, weight_type, x)
    if len(x.shape) != 1 or x.shape[0] != dw.cols:
        raise ValueError(f"x must have shape ({dw.cols},), got {tuple(x.shape)}")
    X = x.reshape(1, dw.cols)
    Y = None if out is None else _check_out(out, (dw.rows,)).reshape(1, dw.rows)
    Y = _run(dw, X, Y, "warp", warps_per_row)
    y = Y.reshape(dw.rows)
    return y if on_device else y.copy_to_host()


def matmul(dw, weight_type, X, out=None, *, method: str = "auto",
           warps_per_row: int | None = None):
    """Y = X W^T for activations `X` (tokens, cols) float32 -> Y (tokens, rows) float32.

    numpy in, numpy out; device array in, device array out (`out` if given). `method`:
    "auto" (the warp kernel up to MAX_WARP_TOKENS tokens, the tiled kernel above), "warp"
    (any token count, run in groups of up to 8) or "tiled".
    """
    dw, X, on_device = _inputs(dw, weight_type, X)
    if len(X.shape) != 2 or X.shape[1] != dw.cols:
        raise ValueError(f"X must have shape (tokens, {dw.cols}), got {tuple(X.shape)}")
    if method not in ("auto", "warp", "tiled"):
        raise ValueError(f"method must be 'auto', 'warp' or 'tiled', got {method!r}")
    n_tok = X.shape[0]
    Y = None if out is None else _check_out(out, (n_tok, dw.rows))
    if method == "auto":
        method = "warp" if n_tok <= MAX_WARP_TOKENS else "tiled"
    Y = _run(dw, X, Y, method, warps_per_row)
    return Y if on_device else Y.copy_to_host()


def _check_out(out, shape):
    out = _device_array(out)
    if out is None or out.dtype != np.float32 or tuple(out.shape) != shape:
        raise ValueError(f"out must be a float32 device array of shape {shape}")
    if not out.is_c_contiguous():
        raise ValueError("out must be C-contiguous")
    return out


def _run(dw: DeviceWeights, X, Y, method: str, warps_per_row):
    cu = cuda
    fam = FAMILIES[dw.weight_type]
    if _device_array(X) is not None:
        if X.dtype != np.float32:
            raise ValueError(f"activations must be float32, got {X.dtype}")
        if not X.is_c_contiguous():
            raise ValueError("device activations must be C-contiguous")
        dX = X
    else:
        dX = cu.to_device(np.ascontiguousarray(X, dtype=np.float32))
    n_tok = dX.shape[0]
    if Y is None:
        Y = cu.device_array((n_tok, dw.rows), np.float32)
    if n_tok == 0 or dw.rows == 0:
        return Y
    if method == "tiled":
        kern = _tiled_kernel(fam)
        grid = (-(-dw.rows // TILE_ROWS), -(-n_tok // TILE_TOKENS))
        kern[grid, TILE_THREADS](dw.q, dw.h, dX, Y, dw.rows, dw.cols, dw.n_blocks, n_tok)
        return Y
    for t0 in range(0, n_tok, MAX_WARP_TOKENS):
        nt = min(MAX_WARP_TOKENS, n_tok - t0)
        wpr, rpb, rpw = launch_config(fam, dw.rows, dw.n_blocks, nt, warps_per_row)
        kern = _warp_kernel(fam, nt, wpr, rpb, rpw)
        Xg = dX if nt == n_tok else dX[t0:t0 + nt]
        Yg = Y if nt == n_tok else Y[t0:t0 + nt]
        grid = -(-dw.rows // (rpb * rpw))
        kern[grid, (32, wpr, rpb)](dw.q, dw.h, Xg, Yg, dw.rows, dw.cols, dw.n_blocks)
    return Y


def launch_config(fam: Family, n_rows: int, n_blocks: int, n_tok: int,
                  warps_per_row: int | None = None) -> tuple[int, int, int]:
    """(warps per row group, row groups per block, rows per warp) of the warp kernel.

    A row's blocks are split over 4 warps for 1-4 tokens and 2 for 5-8, as in ggml's mmvq
    tables (fewer when the row has too few blocks to keep them busy); each warp takes 2 rows,
    so every activation it loads feeds both (1 if the matrix has a single row); a thread
    block holds one row group for one token, up to 2 for more, and at most 128 threads.
    """
    if warps_per_row is None:
        wpr = 4 if n_tok <= 4 else 2
        per_iter = 32 // fam.lanes                     # blocks one warp takes per iteration
        iters = -(-n_blocks // per_iter)
        while wpr > 1 and iters < wpr:
            wpr //= 2
    else:
        if warps_per_row not in (1, 2, 4):
            raise ValueError("warps_per_row must be 1, 2 or 4")
        wpr = warps_per_row
    rpb = 1 if n_tok == 1 else 2
    rpb = min(rpb, max(1, 4 // wpr))
    rpw = 2 if n_rows > 1 else 1
    return wpr, rpb, rpw


# ---------------------------------------------------------------------------------------------
# kernels

def _warp_kernel(fam: Family, nt: int, wpr: int, rpb: int, rpw: int):
    key = ("warp", fam.name, nt, wpr, rpb, rpw)
    with _lock:
        k = _kernels.get(key)
        if k is None:
            k = _kernels[key] = _build_warp_kernel(fam, nt, wpr, rpb, rpw)
    return k


def _tiled_kernel(fam: Family):
    key = ("tiled", fam.name)
    with _lock:
        k = _kernels.get(key)
        if k is None:
            k = _kernels[key] = _build_tiled_kernel(fam)
    return k


def _build_warp_kernel(fam: Family, NT: int, WPR: int, RPB: int, RPW: int):
    """Y[t, row] = sum_k W[row, k] X[t, k] for NT tokens.

    Block (32, WPR, RPB): WPR warps share each group of RPW rows (the warp takes every
    WPR-th group of its row's blocks), RPB row groups per block. A lane decodes its slice
    of the same block in each of the RPW rows, loads each activation once and feeds all
    RPW rows with it (halving activation traffic for RPW = 2).
    """
    cu = _cuda()
    deq, run_start = fam.deq, fam.run_start
    QK, LPB, R, C, VPL, TAIL = fam.qk, fam.lanes, fam.runs, fam.run_len, fam.vals, fam.tail
    BPI = 32 // LPB            # blocks a warp takes per iteration
    STEP = BPI * WPR           # blocks the row's warps take per iteration
    NACC = RPW * NT
    FULL = 0xFFFFFFFF
    assert RPW in (1, 2) and NACC <= 32

    @cu.jit
    def kernel(q, h, X, Y, n_rows, n_cols, n_blocks):
        lane = cuda.threadIdx.x
        wr = cuda.threadIdx.y
        rl = cuda.threadIdx.z
        row = (cuda.blockIdx.x * RPB + rl) * RPW      # first row of this warp's group
        s = lane % LPB
        acc = cuda.local.array(NACC, float32)          # acc[i * NT + t]: row + i, token t
        for t in range(NACC):
            acc[t] = float32(0.0)
        va = cuda.local.array(VPL, float32)
        vb = cuda.local.array(VPL, float32)
        if row < n_rows:                 # uniform across the warp: the warp works on one group
            urow = U(row)
            two = RPW == 2 and row + 1 < n_rows
            if RPW == 2 and not two:
                for v in range(VPL):
                    vb[v] = float32(0.0)
            blk = wr * BPI + lane // LPB
            while blk < n_blocks:
                deq(q, h, urow, blk, s, n_cols, va)
                if two:
                    deq(q, h, urow + U(1), blk, s, n_cols, vb)
                base = blk * QK
                for r in range(R):
                    p0 = base + run_start(s, r)
                    for c in range(C):
                        p = p0 + c
                        if not TAIL or p < n_cols:
                            up = U(p)
                            for t in range(NT):
                                x = X[t, up]
                                acc[t] = cuda.fma(va[r * C + c], x, acc[t])
                                if RPW == 2:
                                    acc[NT + t] = cuda.fma(vb[r * C + c], x, acc[NT + t])
                blk += STEP
        # every thread of the block reaches the reductions (no early exit)
        part = cuda.shared.array((RPB, WPR, NACC), float32)
        for a in range(NACC):
            v = acc[a]
            off = 16
            while off > 0:
                v += cuda.shfl_down_sync(FULL, v, off)
                off //= 2
            acc[a] = v
        if WPR == 1:
            if lane == 0:
                for a in range(NACC):
                    if row + a // NT < n_rows:
                        Y[U(a % NT), U(row + a // NT)] = acc[a]
        else:
            if lane == 0:
                for a in range(NACC):
                    part[rl, wr, a] = acc[a]
            cuda.syncthreads()
            if wr == 0 and lane < NACC and row + lane // NT < n_rows:
                tot = part[rl, 0, lane]
                for w in range(1, WPR):
                    tot += part[rl, w, lane]
                Y[U(lane % NT), U(row + lane // NT)] = tot

    return kernel


def _build_tiled_kernel(fam: Family):
    """Y[tok0:tok0+32, row0:row0+64] per block of 128 threads, 128 columns at a time.

    Shared memory (48 KiB): Ws[k, row] the chunk's dequantized weights, Xs[tok, k] its
    activations. Thread (lane, warp w) accumulates rows lane and lane + 32 for tokens
    8w .. 8w+7: its Ws reads are 32 consecutive words per warp and its Xs reads are
    broadcasts, so neither has bank conflicts; each warp stages its own tokens' rows of Xs
    with coalesced global loads (lanes on consecutive columns) and conflict-free stores.
    """
    cu = _cuda()
    deq, run_start = fam.deq, fam.run_start
    QK, LPB, R, C, VPL = fam.qk, fam.lanes, fam.runs, fam.run_len, fam.vals
    BM, BT, KC, NTH = TILE_ROWS, TILE_TOKENS, CHUNK, TILE_THREADS
    SPC = KC // VPL                 # slices per row-chunk
    GROUPS = NTH // BM              # threads decoding one row
    SPG = SPC // GROUPS             # slices per thread per chunk
    assert (BM, BT, KC, NTH) == (64, 32, 128, 128) and SPG * GROUPS == SPC

    @cu.jit
    def kernel(q, h, X, Y, n_rows, n_cols, n_blocks, n_tok):
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        row0 = cuda.blockIdx.x * BM
        tok0 = cuda.blockIdx.y * BT
        Ws = cuda.shared.array((KC, BM), float32)
        Xs = cuda.shared.array((BT, KC), float32)
        acc = cuda.local.array(16, float32)        # acc[8 i + j]: row lane + 32 i, token 8 warp + j
        vals = cuda.local.array(VPL, float32)
        for i in range(16):
            acc[i] = float32(0.0)
        active = row0 + lane < n_rows and tok0 + 8 * warp < n_tok
        ulane = U(lane)
        utok = U(8 * warp)
        drow = U(tid % BM)              # the row this thread decodes
        wrow = row0 + tid % BM
        uwrow = U(wrow)
        grp = tid // BM
        for k0 in range(0, n_cols, KC):
            # weights: this thread decodes slices grp*SPG .. of its row's chunk
            g0 = k0 // VPL + grp * SPG
            for i in range(SPG):
                gs = g0 + i
                blk = gs // LPB
                s = gs % LPB
                if wrow < n_rows and blk < n_blocks:
                    deq(q, h, uwrow, blk, s, n_cols, vals)
                else:
                    for v in range(VPL):
                        vals[v] = float32(0.0)
                kb = blk * QK - k0
                for r in range(R):
                    kk = kb + run_start(s, r)
                    for c in range(C):
                        Ws[U(kk + c), drow] = vals[r * C + c]
            # activations: each warp stages its own 8 tokens, lanes on consecutive columns
            for j in range(8):
                tok = tok0 + 8 * warp + j
                for m in range(KC // 32):
                    col = k0 + lane + 32 * m
                    xv = float32(0.0)
                    if tok < n_tok and col < n_cols:
                        xv = X[U(tok), U(col)]
                    Xs[utok + U(j), ulane + U(32 * m)] = xv
            cuda.syncthreads()
            if active:
                for k in range(KC):
                    uk = U(k)
                    a0 = Ws[uk, ulane]
                    a1 = Ws[uk, ulane + U(32)]
                    for j in range(8):
                        b = Xs[utok + U(j), uk]
                        acc[j] = cuda.fma(a0, b, acc[j])
                        acc[8 + j] = cuda.fma(a1, b, acc[8 + j])
            cuda.syncthreads()
        for i in range(2):
            row = row0 + lane + 32 * i
            if row < n_rows:
                for j in range(8):
                    tok = tok0 + 8 * warp + j
                    if tok < n_tok:
                        Y[U(tok), U(row)] = acc[8 * i + j]

    return kernel


# ---------------------------------------------------------------------------------------------
# simulator support

def _install_simulator_shared_lock():
    """Make the simulator's `cuda.shared.array` hand every thread of a block the same array.

    It looks the array up by source line and creates it if missing, unlocked: two threads that
    get there together each create one, and the one whose array is replaced in the table writes
    into memory no other thread reads (the tiled kernel's products then came out wrong now and
    then, a different case each run). The lookup and creation are done under a lock here."""
    import sys
    import traceback

    from numba import types as numba_types
    from numba.cuda.simulator import kernelapi
    from numba.np.numpy_support import as_dtype as numba_types_as_dtype

    shared = kernelapi.FakeCUDAShared
    if getattr(shared, "_kquant_locked", False):
        return
    unlocked = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:  # dynamic shared memory: one buffer, no lookup
            return unlocked(self, shape, dtype)
        if isinstance(dtype, numba_types.Type):
            dtype = numba_types_as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe(), limit=2)[0][0:2]  # the kernel's line
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    shared.array = array
    shared._kquant_locked = True


def _install_simulator_shuffle():
    """Give Numba's CUDA simulator a `shfl_down_sync` (it has none).

    The simulator runs a block's threads as Python threads and has only block-wide barriers,
    so the emulation exchanges values through a per-block table and a syncthreads. That is
    exact when every thread of the block calls it the same number of times, which the kernels
    here guarantee (their reductions run outside any divergent branch). Calls alternate
    between two tables: a thread can only write the table of call k+2 after every thread has
    passed the barrier of call k+1, so after all have read call k's values.
    """
    from numba.cuda.simulator import kernelapi

    if hasattr(kernelapi.FakeCUDAModule, "shfl_down_sync"):
        return

    def shfl_down_sync(self, mask, value, delta):
        t = threading.current_thread()
        tables = t._manager.__dict__.setdefault("_kquant_shfl", ({}, {}))
        calls = t.__dict__.get("_kquant_shfl_calls", 0)
        t._kquant_shfl_calls = calls + 1
        table = tables[calls & 1]
        me = t.thread_id
        table[me] = value
        t.syncthreads()
        if me % 32 + delta < 32:
            return table.get(me + delta, value)
        return value

    kernelapi.FakeCUDAModule.shfl_down_sync = shfl_down_sync
