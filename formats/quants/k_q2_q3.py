"""Q2_K and Q3_K: ggml's 2- and 3-bit super-block quantizers, byte for byte.

Ports of quantize_row_q2_K_ref / quantize_row_q2_K_impl and quantize_row_q3_K_ref /
quantize_row_q3_K_impl (ggml-quants.c), plus dequantize_row_q2_K / q3_K. ggml uses the
``_ref`` variant when no importance matrix is given and ``_impl`` otherwise; both
work on one 256-value super-block at a time, so blocks are independent.
Arithmetic rules: see k_common.

Block layouts (little-endian, ggml-common.h):

    Q2_K  scales:u8[16] (low nibble scale, high nibble min) | qs:u8[64] (2 bits)
          | d:f16 | dmin:f16                                               84 bytes
    Q3_K  hmask:u8[32] (bit 2 of each level 0..7) | qs:u8[64] (low 2 bits)
          | scales:u8[12] (16 x 6 bits) | d:f16                            110 bytes
"""

from __future__ import annotations

import numpy as np

from ggforge.formats.quants.k_common import (
    QK_K,
    F,
    clamp,
    driver,
    jit,
    load_fp16,
    load_row,
    nearest_int,
    pack_2bit,
    store_fp16,
    store_row,
)
from ggforge.formats.quants.k_search import (
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
)


# ---------------------------------------------------------------- Q2_K

@jit
def _q2_k_block(x, qw, has_qw, y):
    """One super-block: x (256,) float32 -> y (84,) uint8; qw (256,) when has_qw."""
    L = np.empty(QK_K, np.uint8)
    Laux = np.empty(16, np.uint8)
    weights = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    sc = y[0:16]
    if has_qw:  # quantize_row_q2_K_impl
        sw = np.zeros(16, np.float32)
        Ls = np.empty(16, np.uint8)
        Lm = np.empty(16, np.uint8)
        sumx2 = F(0.0)
        for j in range(QK_K):
            sumx2 += x[j] * x[j]
        sigma2 = sumx2 / F(QK_K)
        for j in range(16):
            for l in range(16):
                xv = x[16 * j + l]
                weights[l] = qw[16 * j + l] * np.sqrt(sigma2 + xv * xv)
            for l in range(16):
                sw[j] += weights[l]
            scales[j], mins[j] = make_qkx_quants(16, 3, x[16 * j:16 * j + 16], weights,
                                                 L[16 * j:16 * j + 16], Laux,
                                                 F(-0.9), F(0.05), 36, False)
        dm = make_qp_quants(16, 15, scales, Ls, sw)
        mm = make_qp_quants(16, 15, mins, Lm, sw)
        dm = store_fp16(y, 80, dm)
        mm = store_fp16(y, 82, mm)
        for j in range(16):
            sc[j] = (Ls[j] | (np.int64(Lm[j]) << 4)) & 0xFF
    else:  # quantize_row_q2_K_ref
        max_scale = F(0.0)
        max_min = F(0.0)
        for j in range(16):
            for l in range(16):
                weights[l] = abs(x[16 * j + l])
            scales[j], mins[j] = make_qkx_quants(16, 3, x[16 * j:16 * j + 16], weights,
                                                 L[16 * j:16 * j + 16], Laux,
                                                 F(-0.5), F(0.1), 15, True)
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        if max_scale > 0:
            iscale = F(15.0) / max_scale
            for j in range(16):
                sc[j] = nearest_int(iscale * scales[j]) & 0xFF
            dm = store_fp16(y, 80, max_scale / F(15.0))
        else:
            sc[:] = 0
            dm = store_fp16(y, 80, F(0.0))
        if max_min > 0:
            iscale = F(15.0) / max_min
            for j in range(16):
                sc[j] = (sc[j] | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
            mm = store_fp16(y, 82, max_min / F(15.0))
        else:
            mm = store_fp16(y, 82, F(0.0))
    # Requantize against the stored (fp16-rounded, 4-bit) scales and mins.
    for j in range(16):
        d = dm * F(sc[j] & 0xF)
        if d == 0:
            continue
        m = mm * F(sc[j] >> 4)
        for ii in range(16):
            l = nearest_int((x[16 * j + ii] + m) / d)
            L[16 * j + ii] = clamp(0, 3, l)
    pack_2bit(L, y[16:80])


@driver
def quantize_q2_k(x, qw, has_qw, out):
    """x (n, 256) float32, qw (n, 256) float32 (read only when has_qw) -> out (n, 84) uint8."""
    xs = np.empty(x.shape[1], np.float32)
    ws = np.empty(x.shape[1], np.float32)
    ys = np.empty(out.shape[1], np.uint8)
    for i in range(x.shape[0]):
        load_row(x, i, xs)
        if has_qw:
            load_row(qw, i, ws)
        _q2_k_block(xs, ws, has_qw, ys)
        store_row(ys, out, i)


@jit
def _q2_k_dequantize_block(b, y):
    """One block: b (84,) uint8 -> y (256,) float32."""
    d = load_fp16(b, 80)
    mn = load_fp16(b, 82)
    k = 0
    for n in range(2):
        for shift in range(0, 8, 2):
            for half in range(2):
                s = b[k // 16]
                dl = d * F(s & 0xF)
                ml = mn * F(s >> 4)
                for l in range(16):
                    q = (b[16 + 32 * n + 16 * half + l] >> shift) & 3
                    y[k] = dl * F(q) - ml
                    k += 1


@driver
def dequantize_q2_k(raw, out):
    """raw (n, 84) uint8 -> out (n, 256) float32: dl * q - ml per 16 values."""
    bs = np.empty(raw.shape[1], np.uint8)
    ys = np.empty(out.shape[1], np.float32)
    for i in range(raw.shape[0]):
        load_row(raw, i, bs)
        _q2_k_dequantize_block(bs, ys)
        store_row(ys, out, i)


# ---------------------------------------------------------------- Q3_K

@jit
def _q3_k_scale(sc, j):
    """The signed 6-bit scale of sub-block j from the 12 packed bytes (ggml's int8 ``sc``)."""
    s = (np.int64(sc[j]) & 0xF) if j < 8 else (np.int64(sc[j - 8]) >> 4)
    return (s | (((np.int64(sc[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@jit
def _q3_k_put_scale(sc, j, l):
    """Store the 6-bit level l (0..63) of sub-block j into the packed bytes."""
    if j < 8:
        sc[j] = l & 0xF
    else:
        sc[j - 8] = (sc[j - 8] | ((l & 0xF) << 4)) & 0xFF
    l >>= 4
    sc[j % 4 + 8] = (sc[j % 4 + 8] | (l << (2 * (j // 4)))) & 0xFF


@jit
def _q3_k_block(x, qw, has_qw, y):
    """One super-block: x (256,) float32 -> y (110,) uint8; qw (256,) when has_qw."""
    L = np.empty(QK_K, np.int8)
    scales = np.empty(16, np.float32)
    sc = y[96:108]
    sc[:] = 0
    if has_qw:  # quantize_row_q3_K_impl (weights from the imatrix)
        weight = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        Ls = np.empty(16, np.int8)
        sumx2 = F(0.0)
        for j in range(QK_K):
            sumx2 += x[j] * x[j]
        sigma2 = F(2.0) * sumx2 / F(QK_K)
        for j in range(16):
            for l in range(16):
                xv = x[16 * j + l]
                weight[l] = qw[16 * j + l] * np.sqrt(sigma2 + xv * xv)
            sumw = F(0.0)
            for l in range(16):
                sumw += weight[l]
            sw[j] = sumw
            scales[j] = make_qx_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16],
                                       weight, True)
        d_block = make_qx_quants(16, 32, scales, Ls, sw, True)
        for j in range(16):
            _q3_k_put_scale(sc, j, np.int64(Ls[j]))
        d_all = store_fp16(y, 108, d_block)
    else:  # quantize_row_q3_K_ref
        max_scale = F(0.0)
        amax = F(0.0)
        for j in range(16):
            scales[j] = make_q3_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16])
            a = abs(scales[j])
            if a > amax:
                amax = a
                max_scale = scales[j]
        if max_scale != 0:
            iscale = F(-32.0) / max_scale
            for j in range(16):
                l8 = np.int8(nearest_int(iscale * scales[j]) & 0xFF)  # C's int8_t l
                _q3_k_put_scale(sc, j, clamp(-32, 31, np.int64(l8)) + 32)
            d_all = store_fp16(y, 108, F(1.0) / iscale)
        else:
            d_all = store_fp16(y, 108, F(0.0))
    for j in range(16):
        d = d_all * F(_q3_k_scale(sc, j))
        if d == 0:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = clamp(-4, 3, l) + 4
    # Bit 2 of level j goes to hmask[j % 32], bit j // 32 (the first 32 levels in bit 0).
    hmask = y[0:32]
    hmask[:] = 0
    for j in range(QK_K):
        if L[j] > 3:
            hmask[j % 32] |= 1 << (j // 32)
            L[j] -= 4
    pack_2bit(L, y[32:96])


@driver
def quantize_q3_k(x, qw, has_qw, out):
    """x (n, 256) float32, qw (n, 256) float32 (read only when has_qw) -> out (n, 110) uint8."""
    xs = np.empty(x.shape[1], np.float32)
    ws = np.empty(x.shape[1], np.float32)
    ys = np.empty(out.shape[1], np.uint8)
    for i in range(x.shape[0]):
        load_row(x, i, xs)
        if has_qw:
            load_row(qw, i, ws)
        _q3_k_block(xs, ws, has_qw, ys)
        store_row(ys, out, i)


@jit
def _q3_k_dequantize_block(b, y):
    """One block: b (110,) uint8 -> y (256,) float32."""
    d_all = load_fp16(b, 108)
    sc = b[96:108]
    k = 0
    for n in range(2):
        for j in range(4):
            m = 1 << (4 * n + j)
            shift = 2 * j
            for half in range(2):
                dl = d_all * F(_q3_k_scale(sc, k // 16))
                for l in range(16):
                    pos = 16 * half + l
                    q = (b[32 + 32 * n + pos] >> shift) & 3
                    hi = 0 if (b[pos] & m) else 4
                    y[k] = dl * F(q - hi)
                    k += 1


@driver
def dequantize_q3_k(raw, out):
    """raw (n, 110) uint8 -> out (n, 256) float32: d * (scale - 32) * (level - 4)."""
    bs = np.empty(raw.shape[1], np.uint8)
    ys = np.empty(out.shape[1], np.float32)
    for i in range(raw.shape[0]):
        load_row(raw, i, bs)
        _q3_k_dequantize_block(bs, ys)
        store_row(ys, out, i)
