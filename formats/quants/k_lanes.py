"""The K-quant scale searches run on all sub-blocks of a super-block at once, in SIMD lanes.

ggml's make_qx_quants and make_qkx2/3_quants (k_search) search one group of 16 or 32
values at a time, and each trial scale sums its group one value after the other: C
order that must be kept for the bytes, and a chain of dependent float additions that no
compiler vectorizes. But the groups of a super-block are independent. Here group g is
lane g: ``xt[i, g]`` is value i of group g, and every loop over the lanes does the same
float32 operation, in the same order, on every group, so LLVM turns it into AVX/SSE
vector instructions while each lane computes exactly what the scalar search computes
for its group. Branches of the scalar code become per-lane selects; the searches'
early returns (an all-zero group, a flat group) become masks applied at the end.

Callers pass the groups of a few super-blocks at once (up to 32 lanes), and all scratch
lives on the stack (k_common.stack_f32): memory that provably overlaps nothing lets
LLVM vectorize the lane loops without run-time overlap checks, which it refused to do
with heap scratch; and lane loops of 8 (one super-block of Q4_K) were unrolled into
scalar code instead of vectorized.

The ports follow k_search operation for operation (same rules, k_common's docstring);
tests/test_k_lanes.py compares them with the scalar searches, and the byte-identity
tests of the types that use them (tests/test_kquants.py) with libggml. Speed, one
thread, 2-core dev machine: Q6_K 4-5x its scalar kernel (about 2.3x ggml's), Q4_K and
Q5_K 3-3.5x (about 3-4x ggml's).

numba's cache keeps what a kernel inlined from here until the kernel's own file
changes: after editing this file, delete ``formats/quants/__pycache__/*.nbi`` and
``*.nbc`` (as for k_common and k_search).
"""

from __future__ import annotations

import numpy as np
from numba import carray

from ggforge.formats.quants.k_common import GROUP_MAX_EPS, F, f32_bits, jit, stack_f32

_MAGIC = F(12582912.0)  # see k_common.nearest_int
_QX_STEPS = 9           # make_qx_quants tries nmax + 0.1 * step, step = -9..9
MAX_LANES = 32          # groups per call, at most
MAX_N = 32              # values per group, at most


@jit
def nearest_clamp(v, lo, hi):
    """``MAX(lo, MIN(hi, nearest_int(v)))`` in int32: k_common.nearest_int's bit trick,
    written so that it vectorizes (int32 lanes, min/max instead of sign masks)."""
    i = (f32_bits(F(v + _MAGIC)) & np.int32(0x007FFFFF)) - np.int32(0x00400000)
    return min(max(i, lo), hi)


@jit
def qx_lanes(n, G, nmax, xt, wt, has_w, Lt, scales):
    """k_search.make_qx_quants (rmse_type 1) of G <= 32 groups of n values at once.

    xt (n, >=G) float32 holds the groups in its columns; the weights are wt (n, >=G)
    when has_w, else x^2. Levels + nmax go to Lt (n, >=G) int8, the scales to
    scales[0:G].
    """
    mx = carray(stack_f32(32), (MAX_LANES,))
    amax = carray(stack_f32(32), (MAX_LANES,))
    iscale = carray(stack_f32(32), (MAX_LANES,))
    sumlx = carray(stack_f32(32), (MAX_LANES,))
    suml2 = carray(stack_f32(32), (MAX_LANES,))
    scale = carray(stack_f32(32), (MAX_LANES,))
    best = carray(stack_f32(32), (MAX_LANES,))
    best_is = carray(stack_f32(32), (MAX_LANES,))
    for g in range(G):
        mx[g] = F(0.0)
        amax[g] = F(0.0)
    for i in range(n):
        for g in range(G):
            ax = abs(xt[i, g])
            take = ax > amax[g]
            amax[g] = ax if take else amax[g]
            mx[g] = xt[i, g] if take else mx[g]
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    fnmax = F(nmax)
    # k = 0: the first guess, -nmax / max; then steps -9..-1, 1..9, in ggml's order
    for k in range(2 * _QX_STEPS + 1):
        step = k - 1 - _QX_STEPS if k <= _QX_STEPS else k - _QX_STEPS
        for g in range(G):
            if k == 0:
                iscale[g] = F(-nmax) / mx[g]
            else:
                iscale[g] = -(fnmax + F(0.1) * F(step)) / mx[g]
            sumlx[g] = F(0.0)
            suml2[g] = F(0.0)
        for i in range(n):
            for g in range(G):
                x = xt[i, g]
                w = wt[i, g] if has_w else x * x
                fl = F(nearest_clamp(iscale[g] * x, lo, hi))
                sumlx[g] += w * x * fl
                suml2[g] += w * fl * fl
        if k == 0:
            for g in range(G):
                s = sumlx[g] / suml2[g] if suml2[g] != 0 else F(0.0)
                scale[g] = s
                best[g] = s * sumlx[g]
                best_is[g] = iscale[g]
        else:
            for g in range(G):
                better = (suml2[g] > 0) & (sumlx[g] * sumlx[g] > best[g] * suml2[g])
                s = sumlx[g] / suml2[g]
                scale[g] = s if better else scale[g]
                best[g] = s * sumlx[g] if better else best[g]
                best_is[g] = iscale[g] if better else best_is[g]
    for i in range(n):
        for g in range(G):
            Lt[i, g] = nmax + nearest_clamp(best_is[g] * xt[i, g], lo, hi)
    for g in range(G):
        if amax[g] < GROUP_MAX_EPS:  # an all-zero group: levels 0, scale 0
            scales[g] = F(0.0)
            for i in range(n):
                Lt[i, g] = 0
        else:
            scales[g] = scale[g]


@jit
def qkx_lanes(n, G, nmax, xt, wt, rmin, rdelta, nstep, use_mad, Lt, scales, mins):
    """k_search.make_qkx_quants (make_qkx2/3_quants) of G <= 32 groups of n <= 32 values.

    xt, wt (n, >=G) float32: the values and weights of the groups, in columns. Levels
    0..nmax go to Lt (n, >=G) uint8, the scales to scales[0:G] and -min (>= 0) to
    mins[0:G].
    """
    mn = carray(stack_f32(32), (MAX_LANES,))
    mx = carray(stack_f32(32), (MAX_LANES,))
    sum_w = carray(stack_f32(32), (MAX_LANES,))
    sum_x = carray(stack_f32(32), (MAX_LANES,))
    scale = carray(stack_f32(32), (MAX_LANES,))
    best_err = carray(stack_f32(32), (MAX_LANES,))
    best_is = carray(stack_f32(32), (MAX_LANES,))
    best_mn = carray(stack_f32(32), (MAX_LANES,))
    isc = carray(stack_f32(32), (MAX_LANES,))
    s_l = carray(stack_f32(32), (MAX_LANES,))
    s_l2 = carray(stack_f32(32), (MAX_LANES,))
    s_xl = carray(stack_f32(32), (MAX_LANES,))
    t_sc = carray(stack_f32(32), (MAX_LANES,))
    t_mn = carray(stack_f32(32), (MAX_LANES,))
    err = carray(stack_f32(32), (MAX_LANES,))
    ok = carray(stack_f32(32), (MAX_LANES,))    # 1: D > 0 this step
    flat = carray(stack_f32(32), (MAX_LANES,))  # 1: max <= min, where ggml returns before searching
    grid = carray(stack_f32(1024), (MAX_N, MAX_LANES))  # this step's levels, as floats
    lo = np.int32(0)
    hi = np.int32(nmax)
    for g in range(G):
        mn[g] = xt[0, g]
        mx[g] = xt[0, g]
        sum_w[g] = wt[0, g]
        sum_x[g] = sum_w[g] * xt[0, g]
    for i in range(1, n):
        for g in range(G):
            x = xt[i, g]
            mn[g] = x if x < mn[g] else mn[g]
            mx[g] = x if x > mx[g] else mx[g]
            w = wt[i, g]
            sum_w[g] += w
            sum_x[g] += w * x
    for g in range(G):
        mn[g] = F(0.0) if mn[g] > 0 else mn[g]
        flat[g] = F(1.0) if mx[g] <= mn[g] else F(0.0)
        isc[g] = F(nmax) / (mx[g] - mn[g])
        scale[g] = F(1.0) / isc[g]
        best_err[g] = F(0.0)
        best_is[g] = isc[g]
        best_mn[g] = mn[g]
    for i in range(n):
        for g in range(G):
            x = xt[i, g]
            diff = scale[g] * F(nearest_clamp(isc[g] * (x - mn[g]), lo, hi)) + mn[g] - x
            diff = abs(diff) if use_mad else diff * diff
            best_err[g] += wt[i, g] * diff
    for step in range(nstep + 1 if nstep >= 1 else 0):
        for g in range(G):
            isc[g] = (rmin + rdelta * F(step) + F(nmax)) / (mx[g] - mn[g])
            s_l[g] = F(0.0)
            s_l2[g] = F(0.0)
            s_xl[g] = F(0.0)
            err[g] = F(0.0)
        for i in range(n):
            for g in range(G):
                x = xt[i, g]
                fl = F(nearest_clamp(isc[g] * (x - mn[g]), lo, hi))
                grid[i, g] = fl
                wl = wt[i, g] * fl
                s_l[g] += wl
                s_l2[g] += wl * fl
                s_xl[g] += wl * x
        for g in range(G):
            D = sum_w[g] * s_l2[g] - s_l[g] * s_l[g]
            ts = (sum_w[g] * s_xl[g] - sum_x[g] * s_l[g]) / D
            tm = (s_l2[g] * sum_x[g] - s_l[g] * s_xl[g]) / D
            pos = tm > 0
            t_sc[g] = s_xl[g] / s_l2[g] if pos else ts
            t_mn[g] = F(0.0) if pos else tm
            ok[g] = F(1.0) if D > 0 else F(0.0)
        for i in range(n):
            for g in range(G):
                diff = t_sc[g] * grid[i, g] + t_mn[g] - xt[i, g]
                diff = abs(diff) if use_mad else diff * diff
                err[g] += wt[i, g] * diff
        for g in range(G):
            better = (ok[g] != 0) & (flat[g] == 0) & (err[g] < best_err[g])
            best_err[g] = err[g] if better else best_err[g]
            scale[g] = t_sc[g] if better else scale[g]
            best_is[g] = isc[g] if better else best_is[g]
            best_mn[g] = mn[g] if better else best_mn[g]
            mn[g] = t_mn[g] if better else mn[g]
    for i in range(n):
        for g in range(G):
            Lt[i, g] = nearest_clamp(best_is[g] * (xt[i, g] - best_mn[g]), lo, hi)
    for g in range(G):
        if flat[g] != 0:  # levels 0, scale 0, min as found
            scales[g] = F(0.0)
            for i in range(n):
                Lt[i, g] = 0
        else:
            scales[g] = scale[g]
        mins[g] = -mn[g]
