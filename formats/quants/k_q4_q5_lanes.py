"""Q4_K and Q5_K quantizers with the sub-block searches of four super-blocks in SIMD lanes.

Ports of ggml-quants.c's quantize_row_q{4,5}_K_ref and _impl, byte for byte (against
libggml in tests/test_kquants.py): the make_qkx2/3_quants searches of the 8 sub-blocks of 4 super-blocks, which
are almost all of the work, run side by side in k_lanes.qkx_lanes (32 lanes) instead of
one after the other (about 3.5x faster than one block at a time). The registry (kquants)
takes its Q4_K / Q5_K quantizers from here and the decoders from k_q4_q5.

Layout: ``xt[i, 8b + j]`` is value i of sub-block j of the batch's super-block b.
"""

from __future__ import annotations

import numpy as np
from numba import carray

from ggforge.formats.quants.k_common import (
    QK_K,
    F,
    clamp,
    driver,
    get_scale_min_k4,
    jit,
    nearest_int,
    pack_k4_scales,
    stack_f32,
    store_fp16,
    store_row,
)
from ggforge.formats.quants.k_lanes import MAX_LANES, qkx_lanes
from ggforge.formats.quants.k_search import make_qp_quants

BATCH = MAX_LANES // 8  # super-blocks per search


@jit
def _weights(x, qw, has_qw, i0, nb, xt, wt, sw):
    """Load super-blocks i0..i0+nb of x into xt and their search weights into wt; sw[l]:
    the sum of lane l's weights (impl) or its av_x (ref), as ggml's quantize_row_q4_K_impl/_ref have them."""
    for b in range(nb):
        for j in range(8):
            for i in range(32):
                xt[i, 8 * b + j] = x[i0 + b, 32 * j + i]
    G = 8 * nb
    if has_qw:  # quantize_row_q{4,5}_K_impl: qw * sqrt(sigma2 + x^2)
        for b in range(nb):
            sum_x2 = F(0.0)
            for l in range(QK_K):
                sum_x2 += x[i0 + b, l] * x[i0 + b, l]
            sigma2 = F(2.0) * sum_x2 / F(QK_K)
            for j in range(8):
                for i in range(32):
                    xv = xt[i, 8 * b + j]
                    wt[i, 8 * b + j] = qw[i0 + b, 32 * j + i] * np.sqrt(sigma2 + xv * xv)
        for g in range(G):
            sw[g] = F(0.0)
        for i in range(32):
            for g in range(G):
                sw[g] += wt[i, g]
    else:  # quantize_row_q{4,5}_K_ref: av_x + |x|, av_x = sqrt(mean(x^2)) of the sub-block
        for g in range(G):
            sw[g] = F(0.0)
        for i in range(32):
            for g in range(G):
                sw[g] += xt[i, g] * xt[i, g]
        for g in range(G):
            sw[g] = np.sqrt(sw[g] / F(32.0))
        for i in range(32):
            for g in range(G):
                wt[i, g] = sw[g] + abs(xt[i, g])


@jit
def _finish(x, r, has_qw, y, L, nmax, Lt, g0, scales, mins, sw, Ls, Lm):
    """The levels after the searches, for super-block r of x (lanes g0..g0+7): d,
    dmin and the 12 scale bytes into y[0:16], the levels 0..nmax into uint8 L."""
    sc = y[4:16]
    sc[:] = 0
    if has_qw:
        d_block = make_qp_quants(8, 63, scales[g0:g0 + 8], Ls, sw[g0:g0 + 8])
        m_block = make_qp_quants(8, 63, mins[g0:g0 + 8], Lm, sw[g0:g0 + 8])
        for j in range(8):
            ls = np.int64(Ls[j])
            lm = np.int64(Lm[j])
            if nmax == 31:  # only the Q5_K variant clamps (a no-op unless a level wrapped)
                ls = min(63, ls)
                lm = min(63, lm)
            pack_k4_scales(j, ls, lm, sc)
        d = store_fp16(y, 0, d_block)
        dmin = store_fp16(y, 2, m_block)
    else:
        max_scale = F(0.0)
        max_min = F(0.0)
        for j in range(8):
            if scales[g0 + j] > max_scale:
                max_scale = scales[g0 + j]
            if mins[g0 + j] > max_min:
                max_min = mins[g0 + j]
        inv_scale = F(63.0) / max_scale if max_scale > 0 else F(0.0)
        inv_min = F(63.0) / max_min if max_min > 0 else F(0.0)
        for j in range(8):
            ls = min(63, nearest_int(inv_scale * scales[g0 + j]) & 0xFF)  # uint8_t, then MIN
            lm = min(63, nearest_int(inv_min * mins[g0 + j]) & 0xFF)
            pack_k4_scales(j, ls, lm, sc)
        d = store_fp16(y, 0, max_scale / F(63.0))
        dmin = store_fp16(y, 2, max_min / F(63.0))
    # Requantize against the stored (fp16-rounded, 6-bit) scales and mins; a sub-block
    # whose scale rounds to 0 keeps the levels of its search.
    for j in range(8):
        ls, lm = get_scale_min_k4(j, sc)
        dl = d * F(ls)
        if dl == 0:
            for i in range(32):
                L[32 * j + i] = Lt[i, g0 + j]
            continue
        dm = dmin * F(lm)
        for i in range(32):
            L[32 * j + i] = clamp(0, nmax, nearest_int((x[r, 32 * j + i] + dm) / dl))


@jit
def _pack_q4_k(L, y):
    for c in range(4):
        for l in range(32):
            y[16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + l + 32] << 4)


@jit
def _pack_q5_k(L, y):
    """Bits 4 of the levels of chunk c (64 values) go to qh bits 2c (first 32) and
    2c+1 (last 32)."""
    qh = y[16:48]
    qh[:] = 0
    for c in range(4):
        m1 = 1 << (2 * c)
        for j in range(32):
            l1 = np.int64(L[64 * c + j])
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            l2 = np.int64(L[64 * c + j + 32])
            if l2 > 15:
                l2 -= 16
                qh[j] |= m1 << 1
            y[48 + 32 * c + j] = l1 | (l2 << 4)


@jit
def _quantize(x, qw, has_qw, out, nmax):
    """All super-blocks of x (n, 256), BATCH at a time, into out (n, 144 or 176)."""
    xt = carray(stack_f32(1024), (32, MAX_LANES))
    wt = carray(stack_f32(1024), (32, MAX_LANES))
    scales = carray(stack_f32(32), (MAX_LANES,))
    mins = carray(stack_f32(32), (MAX_LANES,))
    sw = carray(stack_f32(32), (MAX_LANES,))
    Lt = np.empty((32, MAX_LANES), np.uint8)
    Ls = np.empty(8, np.uint8)
    Lm = np.empty(8, np.uint8)
    L = np.empty(QK_K, np.uint8)
    ys = np.empty(out.shape[1], np.uint8)
    if has_qw:
        rmin, rdelta, nstep = F(-0.9), F(0.05), 36
    elif nmax == 15:
        rmin, rdelta, nstep = F(-1.0), F(0.1), 20
    else:
        rmin, rdelta, nstep = F(-0.5), F(0.1), 15
    for i0 in range(0, x.shape[0], BATCH):
        nb = min(BATCH, x.shape[0] - i0)
        _weights(x, qw, has_qw, i0, nb, xt, wt, sw)
        qkx_lanes(32, 8 * nb, nmax, xt, wt, rmin, rdelta, nstep, False, Lt, scales, mins)
        for b in range(nb):
            _finish(x, i0 + b, has_qw, ys, L, nmax, Lt, 8 * b, scales, mins, sw, Ls, Lm)
            if nmax == 15:
                _pack_q4_k(L, ys)
            else:
                _pack_q5_k(L, ys)
            store_row(ys, out, i0 + b)


@driver
def quantize_q4_k(x, qw, has_qw, out):
    """x (n, 256) float32, qw (n, 256) float32 (read only when has_qw) -> out (n, 144)."""
    _quantize(x, qw, has_qw, out, 15)


@driver
def quantize_q5_k(x, qw, has_qw, out):
    """x (n, 256) float32, qw (n, 256) float32 (read only when has_qw) -> out (n, 176)."""
    _quantize(x, qw, has_qw, out, 31)
