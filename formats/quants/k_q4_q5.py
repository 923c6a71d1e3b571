"""Q4_K and Q5_K: ggml's 4- and 5-bit super-block quantizers with mins, byte for byte.

Ports of quantize_row_q{4,5}_K_ref (no importance matrix) and quantize_row_q{4,5}_K_impl
(with one), plus dequantize_row_q{4,5}_K, from ggml-quants.c. The two types share
everything except the level range (15 / 31), the search parameters and the packing of
the levels, so one block function serves both. Arithmetic rules: see k_common.

Block layouts (little-endian, ggml-common.h):

    Q4_K  d:f16 dmin:f16 | scales:u8[12] (8 x 6-bit scale + 8 x 6-bit min)
          | qs:u8[128] (nibbles: x[64k+l] low, x[64k+32+l] high)               144 bytes
    Q5_K  d:f16 dmin:f16 | scales:u8[12] | qh:u8[32] (bit 4 of each level)
          | qs:u8[128] (low 4 bits, as Q4_K)                                   176 bytes
"""

from __future__ import annotations

import numpy as np
from numba.core import types

from ggforge.formats.quants.k_common import (
    F4A,
    QK_K,
    U1A,
    F,
    b1,
    clamp,
    driver,
    get_scale_min_k4,
    i8,
    jit,
    load_fp16,
    load_row,
    nearest_int,
    pack_k4_scales,
    sig,
    store_fp16,
    store_row,
)
from ggforge.formats.quants.k_search import (
    make_qkx_quants,
    make_qp_quants,
)


@sig(types.void(F4A, F4A, b1, U1A, U1A, i8))
def _levels(x, qw, has_qw, y, L, nmax):
    """Scales, mins and levels of one super-block, for Q4_K (nmax 15) or Q5_K (31).

    Writes d, dmin and the 12 scale bytes into y[0:16] and the levels (0..nmax) of
    the 256 values into uint8 ``L``.
    """
    Laux = np.empty(32, np.uint8)
    weights = np.empty(32, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    sc = y[4:16]
    sc[:] = 0
    if has_qw:  # quantize_row_q{4,5}_K_impl
        sw = np.empty(8, np.float32)
        Ls = np.empty(8, np.uint8)
        Lm = np.empty(8, np.uint8)
        sum_x2 = F(0.0)
        for l in range(QK_K):
            sum_x2 += x[l] * x[l]
        sigma2 = F(2.0) * sum_x2 / F(QK_K)
        for j in range(8):
            for l in range(32):
                xv = x[32 * j + l]
                weights[l] = qw[32 * j + l] * np.sqrt(sigma2 + xv * xv)
            sumw = F(0.0)
            for l in range(32):
                sumw += weights[l]
            sw[j] = sumw
            scales[j], mins[j] = make_qkx_quants(32, nmax, x[32 * j:32 * j + 32], weights,
                                                 L[32 * j:32 * j + 32], Laux,
                                                 F(-0.9), F(0.05), 36, False)
        d_block = make_qp_quants(8, 63, scales, Ls, sw)
        m_block = make_qp_quants(8, 63, mins, Lm, sw)
        for j in range(8):
            ls = np.int64(Ls[j])
            lm = np.int64(Lm[j])
            if nmax == 31:  # only the Q5_K variant clamps (a no-op unless a level wrapped)
                ls = min(63, ls)
                lm = min(63, lm)
            pack_k4_scales(j, ls, lm, sc)
        d = store_fp16(y, 0, d_block)
        dmin = store_fp16(y, 2, m_block)
    else:  # quantize_row_q{4,5}_K_ref
        if nmax == 15:
            rmin, nstep = F(-1.0), 20
        else:
            rmin, nstep = F(-0.5), 15
        max_scale = F(0.0)
        max_min = F(0.0)
        for j in range(8):
            sum_x2 = F(0.0)
            for l in range(32):
                sum_x2 += x[32 * j + l] * x[32 * j + l]
            av_x = np.sqrt(sum_x2 / F(32.0))
            for l in range(32):
                weights[l] = av_x + abs(x[32 * j + l])
            scales[j], mins[j] = make_qkx_quants(32, nmax, x[32 * j:32 * j + 32], weights,
                                                 L[32 * j:32 * j + 32], Laux,
                                                 rmin, F(0.1), nstep, False)
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = F(63.0) / max_scale if max_scale > 0 else F(0.0)
        inv_min = F(63.0) / max_min if max_min > 0 else F(0.0)
        for j in range(8):
            ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # uint8_t, then MIN
            lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
            pack_k4_scales(j, ls, lm, sc)
        d = store_fp16(y, 0, max_scale / F(63.0))
        dmin = store_fp16(y, 2, max_min / F(63.0))
    # Requantize against the stored (fp16-rounded, 6-bit) scales and mins.
    for j in range(8):
        s, m = get_scale_min_k4(j, sc)
        dl = d * F(s)
        if dl == 0:
            continue
        dm = dmin * F(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / dl)
            L[32 * j + ii] = clamp(0, nmax, l)


@jit
def _q4_k_block(x, qw, has_qw, y):
    """One super-block: x (256,) float32 -> y (144,) uint8."""
    L = np.empty(QK_K, np.uint8)
    _levels(x, qw, has_qw, y, L, 15)
    for c in range(4):
        for l in range(32):
            y[16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + l + 32] << 4)


@jit
def _q5_k_block(x, qw, has_qw, y):
    """One super-block: x (256,) float32 -> y (176,) uint8. Bits 4 of the levels of
    chunk c (64 values) go to qh bits 2c (first 32) and 2c+1 (last 32)."""
    L = np.empty(QK_K, np.uint8)
    _levels(x, qw, has_qw, y, L, 31)
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


@driver
def quantize_q4_k(x, qw, has_qw, out):
    """x (n, 256) float32, qw (n, 256) float32 (read only when has_qw) -> out (n, 144)."""
    xs = np.empty(x.shape[1], np.float32)
    ws = np.empty(x.shape[1], np.float32)
    ys = np.empty(out.shape[1], np.uint8)
    for i in range(x.shape[0]):
        load_row(x, i, xs)
        if has_qw:
            load_row(qw, i, ws)
        _q4_k_block(xs, ws, has_qw, ys)
        store_row(ys, out, i)


@driver
def quantize_q5_k(x, qw, has_qw, out):
    """x (n, 256) float32, qw (n, 256) float32 (read only when has_qw) -> out (n, 176)."""
    xs = np.empty(x.shape[1], np.float32)
    ws = np.empty(x.shape[1], np.float32)
    ys = np.empty(out.shape[1], np.uint8)
    for i in range(x.shape[0]):
        load_row(x, i, xs)
        if has_qw:
            load_row(qw, i, ws)
        _q5_k_block(xs, ws, has_qw, ys)
        store_row(ys, out, i)


@sig(types.void(U1A, F4A, i8, b1))
def _dequantize_k45_block(b, y, qs_at, has_qh):
    """Shared Q4_K / Q5_K decoder of one block: y = d*scale * level - dmin*min
    (the product rounded first, as in C)."""
    d = load_fp16(b, 0)
    dmin = load_fp16(b, 2)
    sc = b[4:16]
    for c in range(4):
        for half in range(2):
            s, m = get_scale_min_k4(2 * c + half, sc)
            d1 = d * F(s)
            m1 = dmin * F(m)
            bit = 1 << (2 * c + half)
            for l in range(32):
                q = np.int64(b[qs_at + 32 * c + l])
                q = (q >> 4) if half else (q & 0xF)
                if has_qh and (b[16 + l] & bit):
                    q += 16
                y[64 * c + 32 * half + l] = d1 * F(q) - m1


@driver
def dequantize_q4_k(raw, out):
    """raw (n, 144) uint8 -> out (n, 256) float32."""
    bs = np.empty(raw.shape[1], np.uint8)
    ys = np.empty(out.shape[1], np.float32)
    for i in range(raw.shape[0]):
        load_row(raw, i, bs)
        _dequantize_k45_block(bs, ys, 16, False)
        store_row(ys, out, i)


@driver
def dequantize_q5_k(raw, out):
    """raw (n, 176) uint8 -> out (n, 256) float32."""
    bs = np.empty(raw.shape[1], np.uint8)
    ys = np.empty(out.shape[1], np.float32)
    for i in range(raw.shape[0]):
        load_row(raw, i, bs)
        _dequantize_k45_block(bs, ys, 48, True)
        store_row(ys, out, i)
