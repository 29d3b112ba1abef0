"""Literal scalar ports of ggml's make_qx/make_qkx2-3/make_qp_quants: the fallback of the
vectorized searches in search.py.

The vector versions round in float lanes, which equals C's `nearest_int` only while the
value stays within +-2^22. A non-finite input (or a spread of values that overflows float)
takes C's bit trick outside that range, where it returns mantissa bits rather than a
saturated level; these ports reproduce that, one trial after another as the C does.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .bits import F32, nearest_int, signed_absmax

GROUP_MAX_EPS = F32(1e-15)
_ZERO = F32(0.0)
_ONE = F32(1.0)
_TENTH = F32(0.1)


@njit(cache=True, error_model="numpy", inline="always")
def zero_levels(n, L):
    """L[:n] = 0; returns the scale 0 (what every search returns for an all-zero group)."""
    for i in range(n):
        L[i] = 0
    return _ZERO


@njit(cache=True, error_model="numpy", inline="always")
def set_levels(n, nmax, iscale, x, L, offset):
    """L[i] = offset + nearest_int(iscale * x[i]) clamped to [-nmax, nmax - 1]."""
    for i in range(n):
        L[i] = offset + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))


@njit(cache=True, error_model="numpy", inline="always")
def qx_sums(n, nmax, iscale, x, qw, use_qw):
    """(sum w*x*l, sum w*l*l) over the levels of set_levels, w = qw or x^2, in C's order."""
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        w = qw[i] if use_qw else x[i] * x[i]
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    return sumlx, suml2


@njit(cache=True, error_model="numpy")
def make_qx_quants(n, nmax, x, L, qw, use_qw):
    """make_qx_quants with rmse_type 1: weights qw, or x^2 without them."""
    max_, amax = signed_absmax(n, x)
    if amax < GROUP_MAX_EPS:
        return zero_levels(n, L)
    iscale = F32(-nmax) / max_
    set_levels(n, nmax, iscale, x, L, nmax)
    sumlx, suml2 = qx_sums(n, nmax, iscale, x, qw, use_qw)
    scale = sumlx / suml2 if suml2 != _ZERO else _ZERO
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(F32(nmax) + _TENTH * F32(is_)) / max_
        sumlx, suml2 = qx_sums(n, nmax, iscale, x, qw, use_qw)
        if suml2 > _ZERO and sumlx * sumlx > best * suml2:
            set_levels(n, nmax, iscale, x, L, nmax)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, error_model="numpy", inline="always")
def qkx_stats(n, x, weights):
    """The first pass of make_qkx2/3_quants: min (clamped to <= 0) and max of x, found with
    C's comparisons (a NaN is passed over unless it is x[0]), sum of weights, sum of w * x."""
    min_ = x[0]
    max_ = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < min_:
            min_ = x[i]
        if x[i] > max_:
            max_ = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if min_ > _ZERO:
        min_ = _ZERO
    return min_, max_, sum_w, sum_x


@njit(cache=True, error_model="numpy")
def make_qkx_quants(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad):
    """Asymmetric levels in [0, nmax] with a min: ggml's make_qkx2_quants / make_qkx3_quants.

    The two C functions differ only in `max == min` versus `max <= min`, which cannot differ
    once min is clamped to <= 0 (and both are false for NaN), so one port serves both.
    Returns (scale, the_min) where the_min is C's `*the_min` (the negated offset).
    """
    Laux = np.empty(n, np.uint8)
    min_, max_, sum_w, sum_x = qkx_stats(n, x, weights)
    if max_ == min_:
        return zero_levels(n, L), -min_
    iscale = F32(nmax) / (max_ - min_)
    scale = _ONE / iscale
    best_error = _ZERO
    for i in range(n):
        l = nearest_int(iscale * (x[i] - min_))
        L[i] = max(0, min(nmax, l))
        diff = scale * F32(L[i]) + min_ - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -min_
    for is_ in range(nstep + 1):
        iscale = (rmin + rdelta * F32(is_) + F32(nmax)) / (max_ - min_)
        sum_l = _ZERO
        sum_l2 = _ZERO
        sum_xl = _ZERO
        for i in range(n):
            l = nearest_int(iscale * (x[i] - min_))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            fl = F32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _ZERO:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _ZERO:
                this_min = _ZERO
                this_scale = sum_xl / sum_l2
            cur_error = _ZERO
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                min_ = this_min
    return scale, -min_


@njit(cache=True, error_model="numpy", inline="always")
def c_max(n, x):
    """C's MAX over x[:n] from 0: takes a NaN x[i] (Numba's max skips it)."""
    max_ = _ZERO
    for i in range(n):
        max_ = max_ if max_ > x[i] else x[i]
    return max_


@njit(cache=True, error_model="numpy", inline="always")
def qp_levels(n, nmax, x, L, quant_weights, max_):
    """make_qp_quants' first try, iscale = nmax / max: its levels in L (uint8: stores wrap,
    and C reads the wrapped level back) and weighted squared error. Returns both."""
    iscale = F32(nmax) / max_
    for i in range(n):
        L[i] = nearest_int(iscale * x[i])
    scale = _ONE / iscale
    best_mse = _ZERO
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        w = quant_weights[i]
        best_mse += w * diff * diff
    return iscale, best_mse


@njit(cache=True, error_model="numpy")
def make_qp_quants(n, nmax, x, L, quant_weights):
    """Levels in [0, nmax] for non-negative values (the sub-block scales of the imatrix paths)."""
    max_ = c_max(n, x)
    if max_ < GROUP_MAX_EPS:
        return zero_levels(n, L)
    iscale, best_mse = qp_levels(n, nmax, x, L, quant_weights, max_)
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (_TENTH * F32(is_) + F32(nmax)) / max_
        scale_is = _ONE / iscale_is
        mse = _ZERO
        for i in range(n):
            l = nearest_int(iscale_is * x[i])
            l = min(nmax, l)
            diff = x[i] - scale_is * F32(l)
            w = quant_weights[i]
            mse += w * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    return qp_refine(n, nmax, x, L, quant_weights, iscale)


@njit(cache=True, error_model="numpy")
def qp_refine(n, nmax, x, L, quant_weights, iscale):
    """make_qp_quants after its scale search: levels at the chosen iscale, then up to five
    passes moving single levels while that improves the weighted fit. Scalar, as the C
    (each change feeds the next), and shared with the vectorized search."""
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = min(nmax, l)
        L[i] = l
        w = quant_weights[i]
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    sumlx, suml2 = refine_levels(n, 0, nmax, x, L, quant_weights, True, sumlx, suml2, False)
    return sumlx / suml2 if suml2 > _ZERO else _ZERO


@njit(cache=True, error_model="numpy", inline="always")
def refine_levels(n, lo, hi, x, L, qw, use_qw, sumlx, suml2, q3_order):
    """The passes closing make_q3_quants (`q3_order`) and make_qp_quants: up to five sweeps
    moving single levels L[i] to the best level for the others' fit while that improves
    sumlx^2 / suml2 (weights qw, or x^2). Returns the new sumlx, suml2.

    The two C loops differ in their clamps and in one guard: make_q3_quants clamps to
    [lo, hi] and needs the new sl2 > 0, make_qp_quants clamps to hi only and needs the old
    sl2 > 0 (computing sl2 before C's make_q3_quants does changes nothing)."""
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i] if use_qw else x[i] * x[i]
            fli = F32(L[i])
            slx = sumlx - w * x[i] * fli
            sl2 = suml2 - w * fli * fli
            if slx > _ZERO and (q3_order or sl2 > _ZERO):
                new_l = min(hi, nearest_int(x[i] * sl2 / slx))
                if q3_order:
                    new_l = max(lo, new_l)
                if new_l != L[i]:
                    fnl = F32(new_l)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if (sl2 > _ZERO or not q3_order) and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx, suml2
