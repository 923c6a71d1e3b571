"""The scale searches of ggml's K-quants, compiled with numba: make_qx_quants,
make_q3_quants, make_qkx2_quants / make_qkx3_quants and make_qp_quants of ggml-quants.c.

Each one picks the scale (and for the affine types the min) of a group of 16 or 32
values, or of a block's sub-block scales, by trying a few candidate scales and keeping
the one with the smallest weighted error; the levels go into ``L``. Ports, operation for
operation, under the rules in k_common's docstring.
"""

from __future__ import annotations

from numba.core import types

from ggforge.formats.quants.k_common import (
    F4A,
    GROUP_MAX_EPS,
    I1A,
    U1A,
    F,
    b1,
    clamp,
    f4,
    i8,
    nearest_int,
    sig,
)


@sig(f4(f4, f4))
def fmax(a, b):
    """C's ``MAX(a, b)`` on floats: ``a > b ? a : b`` (the sign of a zero tie follows b)."""
    return a if a > b else b


@sig(f4(i8, i8, F4A, I1A, F4A, b1))
def make_qx_quants(n, nmax, x, L, qw, has_qw):
    """make_qx_quants with rmse_type 1: symmetric levels in [-nmax, nmax-1] (stored +nmax
    in int8 ``L``), weights ``qw`` or x^2, then a search over 18 nearby scales.
    Returns the float32 scale."""
    mx = F(0.0)
    amax = F(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F(0.0)
    iscale = F(-nmax) / mx
    sumlx = F(0.0)
    suml2 = F(0.0)
    for i in range(n):
        l = clamp(-nmax, nmax - 1, nearest_int(iscale * x[i]))
        L[i] = l + nmax
        w = qw[i] if has_qw else x[i] * x[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    scale = sumlx / suml2 if suml2 != 0 else F(0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(step)) / mx
        sumlx = F(0.0)
        suml2 = F(0.0)
        for i in range(n):
            l = clamp(-nmax, nmax - 1, nearest_int(iscale * x[i]))
            w = qw[i] if has_qw else x[i] * x[i]
            sumlx += w * x[i] * F(l)
            suml2 += w * F(l) * F(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + clamp(-nmax, nmax - 1, nearest_int(iscale * x[i]))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@sig(f4(i8, i8, F4A, I1A))
def make_q3_quants(n, nmax, x, L):
    """make_q3_quants with do_rmse: x^2-weighted levels in [-nmax, nmax-1], refined one
    element at a time (up to 5 passes); int8 ``L`` gets level + nmax. Returns the scale."""
    mx = F(0.0)
    amax = F(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F(0.0)
    iscale = F(-nmax) / mx
    sumlx = F(0.0)
    suml2 = F(0.0)
    for i in range(n):
        l = clamp(-nmax, nmax - 1, nearest_int(iscale * x[i]))
        L[i] = l
        w = x[i] * x[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            li = F(L[i])
            slx = sumlx - w * x[i] * li
            if slx > 0:
                sl2 = suml2 - w * li * li
                new_l = clamp(-nmax, nmax - 1, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else F(0.0)


@sig(types.UniTuple(f4, 2)(i8, i8, F4A, F4A, U1A, U1A, f4, f4, i8, b1))
def make_qkx_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants, and make_qkx3_quants with weights (the same arithmetic: their
    ``max == min`` / ``max <= min`` tests agree on finite input). Affine levels in
    [0, nmax] (uint8 ``L``), scale and min fitted by weighted least squares over
    nstep+1 trial scales. Returns (scale, the_min) with the_min = -min >= 0."""
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = F(0.0)
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return F(0.0), -mn
    iscale = F(nmax) / (mx - mn)
    scale = F(1.0) / iscale
    best_error = F(0.0)
    for i in range(n):
        L[i] = clamp(0, nmax, nearest_int(iscale * (x[i] - mn)))
        diff = scale * F(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F(step) + F(nmax)) / (mx - mn)
        sum_l = F(0.0)
        sum_l2 = F(0.0)
        sum_xl = F(0.0)
        for i in range(n):
            l = clamp(0, nmax, nearest_int(iscale * (x[i] - mn)))
            Laux[i] = l
            w = weights[i]
            fl = F(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = F(0.0)
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@sig(f4(i8, i8, F4A, U1A, F4A))
def make_qp_quants(n, nmax, x, L, qw):
    """make_qp_quants: quantize the non-negative sub-block scales ``x`` to [0, nmax]
    (uint8 ``L``, wrapping like C) with importance ``qw``. Returns the super-scale."""
    mx = F(0.0)
    for i in range(n):
        mx = fmax(mx, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F(0.0)
    iscale = F(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = F(1.0) / iscale
    best_mse = F(0.0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F(0.1) * F(step) + F(nmax)) / mx
        scale_is = F(1.0) / iscale_is
        mse = F(0.0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F(0.0)
    suml2 = F(0.0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        w = qw[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            li = F(L[i])
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else F(0.0)
