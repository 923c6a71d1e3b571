"""IQ4_NL and IQ4_XS: ggml's non-linear 4-bit quantizers, byte for byte.

Both are quantize_row_iq4_nl_impl (ggml-quants.c) over 16 fixed levels (kvalues_iq4nl):
IQ4_NL on its own 32-value blocks, IQ4_XS on 256-value super-blocks of eight 32-value
sub-blocks whose scales are quantized to 6 bits against one fp16 scale. ggml's
ggml_quantize_chunk always takes this path (quantize_iq4_nl / quantize_iq4_xs, with
ntry = 7), with or without an importance matrix: without one the weights are x^2,
with one ``qw * sqrt(sigma2 + x^2)``. (quantize_row_iq4_nl_ref, with ntry = -1, is not
what ggml_quantize_chunk calls.) Arithmetic rules: see k_common.

Block layouts (little-endian, ggml-common.h):

    IQ4_NL  d:f16 | qs:u8[16] (level index of x[j] low, of x[j+16] high)      18 bytes
    IQ4_XS  d:f16 | scales_h:u16 (2 high bits per sub-block)
            | scales_l:u8[4] (4 low bits per sub-block) | qs:u8[128]           136 bytes
"""

from __future__ import annotations

import numpy as np
from numba.core import types

from ggforge.formats.quants.k_common import (
    F4A,
    GROUP_MAX_EPS,
    KVALUES_IQ4NL,
    U1A,
    F,
    b1,
    best_index_int8,
    clamp,
    driver,
    i8,
    jit,
    load_fp16,
    load_row,
    nearest_int,
    sig,
    store_fp16,
    store_row,
)

_NTRY = 7  # what quantize_iq4_nl / quantize_iq4_xs pass: 15 trial scales around -max/127


@jit
def _sub_block_scale(xb, weight, Lb, values):
    """Best scale of one 32-value sub-block over the trial scales around -max/-127;
    writes the level indices of the first trial into Lb. 0 for an all-zero block."""
    amax = F(0.0)
    mx = F(0.0)
    for j in range(32):
        ax = abs(xb[j])
        if ax > amax:
            amax = ax
            mx = xb[j]
    if amax < GROUP_MAX_EPS:
        return F(0.0)
    d = -mx / F(values[0])
    inv = F(1.0) / d
    sumqx = F(0.0)
    sumq2 = F(0.0)
    for j in range(32):
        l = best_index_int8(16, values, inv * xb[j])
        Lb[j] = l
        q = F(values[l])
        w = weight[j]
        sumqx += w * q * xb[j]
        sumq2 += w * q * q
    d = sumqx / sumq2 if sumq2 > 0 else F(0.0)
    best = d * sumqx
    for itry in range(-_NTRY, _NTRY + 1):
        inv = F(itry + values[0]) / mx
        sumqx = F(0.0)
        sumq2 = F(0.0)
        for j in range(32):
            q = F(values[best_index_int8(16, values, inv * xb[j])])
            w = weight[j]
            sumqx += w * q * xb[j]
            sumq2 += w * q * q
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@sig(types.void(F4A, F4A, b1, U1A, i8))
def _iq4_block(x, qw, has_qw, y, qs_at):
    """quantize_row_iq4_nl_impl of one (super-)block of 32 (IQ4_NL) or 256 (IQ4_XS)
    values into y; the levels start at byte ``qs_at``."""
    values = KVALUES_IQ4NL
    n = x.shape[0]
    nb = n // 32
    L = np.empty(n, np.uint8)
    weight = np.empty(32, np.float32)
    scales = np.empty(nb, np.float32)
    sigma2 = F(0.0)
    for j in range(n):
        sigma2 += x[j] * x[j]
    sigma2 *= F(2.0) / F(n)
    y[qs_at:qs_at + n // 2] = 0
    store_fp16(y, 0, F(0.0))
    max_scale = F(0.0)
    amax_scale = F(0.0)
    for ib in range(nb):
        xb = x[32 * ib:32 * ib + 32]
        for j in range(32):
            if has_qw:
                weight[j] = qw[32 * ib + j] * np.sqrt(sigma2 + xb[j] * xb[j])
            else:
                weight[j] = xb[j] * xb[j]
        d = _sub_block_scale(xb, weight, L[32 * ib:32 * ib + 32], values)
        scales[ib] = d
        if abs(d) > amax_scale:
            amax_scale = abs(d)
            max_scale = d
    if nb > 1:  # IQ4_XS: 6-bit sub-block scales against one fp16 super-scale
        d = -max_scale / F(32.0)
        store_fp16(y, 0, d)
        inv = F(1.0) / d if d != 0 else F(0.0)
        scales_h = 0
        for ib in range(nb):
            l = clamp(-32, 31, nearest_int(inv * scales[ib]))
            dl = d * F(l)
            idl = F(1.0) / dl if dl != 0 else F(0.0)
            for j in range(32):
                L[32 * ib + j] = best_index_int8(16, values, idl * x[32 * ib + j])
            l += 32
            if ib % 2 == 0:
                y[4 + ib // 2] = l & 0xF
            else:
                y[4 + ib // 2] |= (l & 0xF) << 4
            scales_h |= (l >> 4) << (2 * (ib % 8))
        y[2] = scales_h & 0xFF
        y[3] = (scales_h >> 8) & 0xFF
    else:  # IQ4_NL: the block scale is stored as is, levels redone against it
        store_fp16(y, 0, scales[0])
        inv = F(1.0) / scales[0] if scales[0] != 0 else F(0.0)
        for j in range(n):
            L[j] = best_index_int8(16, values, inv * x[j])
    for i in range(nb):
        for j in range(16):
            y[qs_at + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)


@driver
def quantize_iq4_nl(x, qw, has_qw, out):
    """x (n, 32) float32, qw (n, 32) float32 (read only when has_qw) -> out (n, 18)."""
    xs = np.empty(x.shape[1], np.float32)
    ws = np.empty(x.shape[1], np.float32)
    ys = np.empty(out.shape[1], np.uint8)
    for i in range(x.shape[0]):
        load_row(x, i, xs)
        if has_qw:
            load_row(qw, i, ws)
        _iq4_block(xs, ws, has_qw, ys, 2)
        store_row(ys, out, i)


@driver
def quantize_iq4_xs(x, qw, has_qw, out):
    """x (n, 256) float32, qw (n, 256) float32 (read only when has_qw) -> out (n, 136)."""
    xs = np.empty(x.shape[1], np.float32)
    ws = np.empty(x.shape[1], np.float32)
    ys = np.empty(out.shape[1], np.uint8)
    for i in range(x.shape[0]):
        load_row(x, i, xs)
        if has_qw:
            load_row(qw, i, ws)
        _iq4_block(xs, ws, has_qw, ys, 8)
        store_row(ys, out, i)


@jit
def _iq4_nl_dequantize_block(b, y):
    """One block: b (18,) uint8 -> y (32,) float32."""
    d = load_fp16(b, 0)
    for j in range(16):
        y[j] = d * F(KVALUES_IQ4NL[b[2 + j] & 0xF])
        y[j + 16] = d * F(KVALUES_IQ4NL[b[2 + j] >> 4])


@driver
def dequantize_iq4_nl(raw, out):
    """raw (n, 18) uint8 -> out (n, 32) float32: d * level."""
    bs = np.empty(raw.shape[1], np.uint8)
    ys = np.empty(out.shape[1], np.float32)
    for i in range(raw.shape[0]):
        load_row(raw, i, bs)
        _iq4_nl_dequantize_block(bs, ys)
        store_row(ys, out, i)


@jit
def _iq4_xs_dequantize_block(b, y):
    """One block: b (136,) uint8 -> y (256,) float32."""
    d = load_fp16(b, 0)
    scales_h = np.int64(b[2]) | (np.int64(b[3]) << 8)
    for ib in range(8):
        ls = ((np.int64(b[4 + ib // 2]) >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4)
        dl = d * F(ls - 32)
        for j in range(16):
            q = b[8 + 16 * ib + j]
            y[32 * ib + j] = dl * F(KVALUES_IQ4NL[q & 0xF])
            y[32 * ib + j + 16] = dl * F(KVALUES_IQ4NL[q >> 4])


@driver
def dequantize_iq4_xs(raw, out):
    """raw (n, 136) uint8 -> out (n, 256) float32: (d * (scale - 32)) * level."""
    bs = np.empty(raw.shape[1], np.uint8)
    ys = np.empty(out.shape[1], np.float32)
    for i in range(raw.shape[0]):
        load_row(raw, i, bs)
        _iq4_xs_dequantize_block(bs, ys)
        store_row(ys, out, i)
