"""The scale searches behind llama.cpp's K-quants (ggml-quants.c's make_*_quants helpers).

Each function is a line-by-line port: float32 throughout, products and sums in C's
left-to-right order, no fused multiply-adds (Numba does not contract without fastmath), so
the chosen levels and scales are the reference's to the last bit. Integers that C mixes
into float expressions are converted with `F32(...)` explicitly: Numba would otherwise
promote int64 * float32 to float64.

`L` arrays keep C's element types (int8 or uint8); stores wrap as C's narrowing does.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import search_exact as exact
from .bits import F32, nearest_int, round_nearest, signed_absmax
from .layout import QK_K

GROUP_MAX_EPS = F32(1e-15)
_ZERO = F32(0.0)
_ONE = F32(1.0)
_HALF = F32(0.5)
_TENTH = F32(0.1)
_FLT_MAX = F32(3.4028234663852886e38)


# Trial scales are evaluated side by side, one SIMD lane per trial: each lane's sums still
# run over i in C's order, so every trial's result is the reference's, and the choice
# among them is then made walking the trials in C's order.
#
# The lanes live in one flat float32 workspace at constant offsets, so LLVM can prove the
# rows apart and its SLP vectorizer (which kquant enables, see codecs.vectorizing) turns each
# fully unrolled lane loop into AVX2 instructions; with separate arrays it cannot.
# Check: `kquant.codecs.search.make_qx_quants.inspect_asm()` shows ymm arithmetic.
# `quick`: where a value is inf / NaN or a spread overflows float, the vector searches hand
# over to the literal ports of search_exact.py (quick None). Kernels that pass quick=1 instead
# get ws[FELL_BACK] = 1 there and a result to throw away: Numba drops an `is None` branch on a
# literal argument, so those kernels never compile the ports (2.5 s of a first Q4_K job), and
# their codec redoes such rows with the kernel that has them (kquant.codecs.BlockCodec), which
# only inf, NaN or huge weights ever need.

WS_LANES = 64
_ISC, _S1, _S2, _S3, _ERR, _TSC, _TMN, _DET, _W, _WX = (k * WS_LANES for k in range(10))
FELL_BACK = 10 * WS_LANES  # the quick searches' flag
WS_SIZE = 10 * WS_LANES + 1
_QX_LANES = 24  # 19 trials (is = -9..9) padded to whole AVX2 vectors
_QKX_LANES = 8  # one vector per window: see make_qkx_quants


@njit(cache=True, error_model="numpy")
def workspace():
    """Scratch for the searches below; one per thread (allocate it per row)."""
    return np.empty(WS_SIZE, np.float32)


@njit(cache=True, error_model="numpy", inline="always")
def qkx_scratch(sub, nsub):
    """Per-row buffers of the asymmetric (scale + min) types, sub-blocks of `sub` values,
    `nsub` a block: L, weights, scales, mins, sw, Ls, Lm and the search workspace."""
    return (np.empty(QK_K, np.uint8), np.empty(sub, np.float32), np.empty(nsub, np.float32),
            np.empty(nsub, np.float32), np.empty(nsub, np.float32), np.empty(nsub, np.uint8),
            np.empty(nsub, np.uint8), workspace())


@njit(cache=True, error_model="numpy", inline="always")
def imatrix_sigma2(x, factor):
    """The imatrix paths' sigma2: factor * sum(x^2) / QK_K over the block, in C's order."""
    sum_x2 = _ZERO
    for l in range(QK_K):
        sum_x2 += x[l] * x[l]
    return factor * sum_x2 / F32(QK_K)


@njit(cache=True, error_model="numpy", inline="always")
def imatrix_weights(n, qw, xs, sigma2, weights):
    """weights[l] = qw[l] * sqrt(sigma2 + xs[l]^2) for a sub-block of n; returns their sum."""
    for l in range(n):
        weights[l] = qw[l] * np.sqrt(sigma2 + xs[l] * xs[l])
    sumw = _ZERO
    for l in range(n):
        sumw += weights[l]
    return sumw


@njit(cache=True, error_model="numpy", inline="always")
def max_scale_min(n, scales, mins):
    """The largest of scales[:n] and of mins[:n] (0 floors, NaNs passed over), as C's scan."""
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(n):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    return max_scale, max_min


@njit(cache=True, error_model="numpy", inline="always")
def _all_finite(n, x):
    ok = True
    for i in range(n):
        ok &= abs(x[i]) <= _FLT_MAX  # false for inf and NaN
    return ok


@njit(cache=True, error_model="numpy")
def make_qx_quants(n, nmax, x, L, qw, use_qw, ws):
    """Symmetric levels in [-nmax, nmax-1] (stored +nmax) with an RMSE-refined scale.

    This is make_qx_quants with rmse_type 1, the only form llama.cpp's types use: weights
    `qw` when given, else x^2. Returns the scale.
    """
    max_, amax = signed_absmax(n, x)
    if amax < GROUP_MAX_EPS:
        return exact.zero_levels(n, L)
    if not _all_finite(n, x):  # then |iscale * x| <= nmax + 1 in every lane
        return exact.make_qx_quants(n, nmax, x, L, qw, use_qw)
    for i in range(n):
        w = qw[i] if use_qw else x[i] * x[i]
        ws[_W + i] = w
        ws[_WX + i] = w * x[i]
    # lane k tries is = k - 9; lane 9 (is = 0) is C's first pass, iscale = -nmax/max
    for k in range(_QX_LANES):
        ws[_ISC + k] = -(F32(nmax) + _TENTH * F32(k - 9)) / max_
        ws[_S1 + k] = _ZERO
        ws[_S2 + k] = _ZERO
    lo = F32(-nmax)
    hi = F32(nmax - 1)
    for i in range(n):
        xi = x[i]
        wi = ws[_W + i]
        wxi = ws[_WX + i]
        for k in range(_QX_LANES):
            fl = min(hi, max(lo, round_nearest(ws[_ISC + k] * xi)))
            ws[_S1 + k] += wxi * fl
            ws[_S2 + k] += wi * fl * fl
    slx = ws[_S1:_S1 + _QX_LANES]
    sl2 = ws[_S2:_S2 + _QX_LANES]
    scale = slx[9] / sl2[9] if sl2[9] != _ZERO else _ZERO
    best = scale * slx[9]
    best_k = 9
    for k in range(19):
        if k != 9 and sl2[k] > _ZERO and slx[k] * slx[k] > best * sl2[k]:
            best_k = k
            scale = slx[k] / sl2[k]
            best = scale * slx[k]
    exact.set_levels(n, nmax, ws[_ISC + best_k], x, L, nmax)
    return scale


@njit(cache=True, error_model="numpy")
def make_q3_quants(n, nmax, x, L, do_rmse):
    """Q3_K's reference search: x^2-weighted levels refined by coordinate descent."""
    max_, amax = signed_absmax(n, x)
    if amax < GROUP_MAX_EPS:
        return exact.zero_levels(n, L)
    iscale = F32(-nmax) / max_
    if do_rmse:
        exact.set_levels(n, nmax, iscale, x, L, 0)
        sumlx, suml2 = exact.qx_sums(n, nmax, iscale, x, x, False)  # weights x^2
        sumlx, suml2 = exact.refine_levels(n, -nmax, nmax - 1, x, L, x, False, sumlx, suml2,
                                           True)
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > _ZERO else _ZERO
    exact.set_levels(n, nmax, iscale, x, L, nmax)
    return _ONE / iscale


@njit(cache=True, error_model="numpy")
def make_qkx_quants(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad, ws, quick=None):
    """Asymmetric levels in [0, nmax] with a min: ggml's make_qkx2_quants / make_qkx3_quants.

    The two C functions differ only in `max == min` versus `max <= min`, which cannot differ
    once min is clamped to <= 0 (and both are false for NaN), so one port serves both.
    Returns (scale, the_min) where the_min is C's `*the_min` (the negated offset).

    In C an accepted trial replaces `min`, which the later trials then use. So trials are
    evaluated 8 at a time with the current min, walked in order, and the next window starts
    right after any acceptance that moved min (about 3 per call on Gaussian data).
    """
    min_, max_, sum_w, sum_x = exact.qkx_stats(n, x, weights)
    if max_ == min_:
        return exact.zero_levels(n, L), -min_
    if not (_all_finite(n, x) and max_ - min_ <= _FLT_MAX):
        # a later min can only shrink |iscale * (x - min)| <= nmax + 1 while max - min stays
        # finite; it is re-checked per window below
        if quick is None:
            return exact.make_qkx_quants(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad)
        ws[FELL_BACK] = _ONE
        return _ZERO, _ZERO
    iscale = F32(nmax) / (max_ - min_)
    scale = _ONE / iscale
    best_error = _ZERO
    for i in range(n):
        l = max(0, min(nmax, nearest_int(iscale * (x[i] - min_))))
        diff = scale * F32(l) + min_ - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    best_iscale = iscale
    best_min = min_  # the min the chosen levels were rounded against
    if nstep < 1:
        for i in range(n):
            L[i] = max(0, min(nmax, nearest_int(iscale * (x[i] - min_))))
        return scale, -min_
    start = 0
    while start <= nstep:
        if not max_ - min_ <= _FLT_MAX:  # an accepted min this far out: C's order, literally
            if quick is None:
                return exact.make_qkx_quants(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad)
            ws[FELL_BACK] = _ONE
            return _ZERO, _ZERO
        _qkx_trials(n, nmax, x, weights, sum_w, sum_x, min_, max_, rmin, rdelta, start,
                    use_mad, ws)
        next_start = start + _QKX_LANES
        for k in range(min(_QKX_LANES, nstep + 1 - start)):
            if ws[_DET + k] > _ZERO and ws[_ERR + k] < best_error:
                best_error = ws[_ERR + k]
                scale = ws[_TSC + k]
                best_iscale = ws[_ISC + k]
                best_min = min_
                moved = ws[_TMN + k] != min_  # 0.0 vs -0.0 gives the same trials
                min_ = ws[_TMN + k]
                if moved:  # the later trials of this window used the old min
                    next_start = start + k + 1
                    break
        start = next_start
    for i in range(n):
        L[i] = max(0, min(nmax, nearest_int(best_iscale * (x[i] - best_min))))
    return scale, -min_


@njit(cache=True, error_model="numpy")
def _qkx_trials(n, nmax, x, weights, sum_w, sum_x, min_, max_, rmin, rdelta, start, use_mad, ws):
    """Trials is = start .. start+7 of make_qkx_quants, lane k = trial start+k: their scale
    (TSC), min (TMN), determinant (DET) and weighted error (ERR). One AVX2 vector of lanes:
    a restart then wastes at most one window (lanes past nstep are computed and ignored)."""
    for k in range(_QKX_LANES):
        ws[_ISC + k] = (rmin + rdelta * F32(start + k) + F32(nmax)) / (max_ - min_)
        ws[_S1 + k] = _ZERO
        ws[_S2 + k] = _ZERO
        ws[_S3 + k] = _ZERO
    _qkx_pass(n, nmax, x, weights, min_, use_mad, ws, False)
    for k in range(_QKX_LANES):
        sl = ws[_S1 + k]
        sl2 = ws[_S2 + k]
        sxl = ws[_S3 + k]
        D = sum_w * sl2 - sl * sl
        this_scale = (sum_w * sxl - sum_x * sl) / D
        this_min = (sl2 * sum_x - sl * sxl) / D
        if this_min > _ZERO:
            this_min = _ZERO
            this_scale = sxl / sl2
        ws[_DET + k] = D
        ws[_TSC + k] = this_scale
        ws[_TMN + k] = this_min
        ws[_ERR + k] = _ZERO
    _qkx_pass(n, nmax, x, weights, min_, use_mad, ws, True)


@njit(cache=True, error_model="numpy", inline="always")
def _qkx_pass(n, nmax, x, weights, min_, use_mad, ws, errors):
    """One pass of _qkx_trials over x, each lane's levels clamp(round(iscale * (x - min))):
    their weighted sums l, l^2, l*x (S1, S2, S3) or, with `errors` (a constant), the weighted
    errors of the lanes' fits (ERR)."""
    hi = F32(nmax)
    for i in range(n):
        xi = x[i]
        xm = xi - min_
        wi = weights[i]
        for k in range(_QKX_LANES):
            fl = min(hi, max(_ZERO, round_nearest(ws[_ISC + k] * xm)))
            if errors:
                diff = ws[_TSC + k] * fl + ws[_TMN + k] - xi
                ws[_ERR + k] += wi * (abs(diff) if use_mad else diff * diff)
            else:
                wl = wi * fl
                ws[_S1 + k] += wl
                ws[_S2 + k] += wl * fl
                ws[_S3 + k] += wl * xi


@njit(cache=True, error_model="numpy")
def make_qp_quants(n, nmax, x, L, quant_weights, ws, quick=None):
    """Levels in [0, nmax] for non-negative values (the sub-block scales of the imatrix paths)."""
    max_ = exact.c_max(n, x)
    if max_ < GROUP_MAX_EPS:
        return exact.zero_levels(n, L)
    for i in range(n):  # the trial lanes need |x| <= max (then |iscale * x| <= nmax + 1)
        if not abs(x[i]) <= max_:
            if quick is None:
                return exact.make_qp_quants(n, nmax, x, L, quant_weights)
            ws[FELL_BACK] = _ONE
            return _ZERO
    iscale, best_mse = exact.qp_levels(n, nmax, x, L, quant_weights, max_)
    # the 8 trials is = -4..-1, 1..4 side by side (lane k: is = k - 4, or k - 3 from k = 4)
    for k in range(8):
        is_ = k - 4 if k < 4 else k - 3
        ws[_ISC + k] = (_TENTH * F32(is_) + F32(nmax)) / max_
        ws[_TSC + k] = _ONE / ws[_ISC + k]
        ws[_ERR + k] = _ZERO
    hi = F32(nmax)
    for i in range(n):
        xi = x[i]
        w = quant_weights[i]
        for k in range(8):
            diff = xi - ws[_TSC + k] * min(hi, round_nearest(ws[_ISC + k] * xi))
            ws[_ERR + k] += w * diff * diff
    for k in range(8):
        if ws[_ERR + k] < best_mse:
            best_mse = ws[_ERR + k]
            iscale = ws[_ISC + k]
    return exact.qp_refine(n, nmax, x, L, quant_weights, iscale)
