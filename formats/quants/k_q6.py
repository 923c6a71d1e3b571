"""Q6_K: ggml's 6-bit super-block quantizer, byte for byte.

Port of quantize_row_q6_K_ref / quantize_row_q6_K_impl and dequantize_row_q6_K
(ggml-quants.c). The two quantizers differ only in the weights of the sub-block scale
search: x^2 without an importance matrix, the importance itself with one (ggml's impl
does not mix in the variance here, unlike the other K-quants). Arithmetic rules: see
k_common. The 16 sub-block searches of a super-block (make_qx_quants, almost all of
the work) run side by side in SIMD lanes, two super-blocks at a time (k_lanes).

Block layout (little-endian, ggml-common.h):

    Q6_K  ql:u8[128] (low 4 bits) | qh:u8[64] (high 2 bits) | scales:i8[16] | d:f16
                                                                           210 bytes

Within each 128-value half h: ql[64h + l] holds x[128h + l] (low nibble) and
x[128h + l + 64] (high), ql[64h + 32 + l] holds x[+32] and x[+96]; qh[32h + l] holds
the high bits of x[+0], x[+32], x[+64], x[+96] at bit pairs 0, 2, 4, 6.
"""

from __future__ import annotations

import numpy as np
from numba import carray

from ggforge.formats.quants.k_common import (
    GROUP_MAX_EPS,
    QK_K,
    F,
    clamp,
    driver,
    jit,
    load_fp16,
    load_row,
    nearest_int,
    stack_f32,
    store_fp16,
    store_row,
)
from ggforge.formats.quants.k_lanes import MAX_LANES, qx_lanes

_BATCH = MAX_LANES // 16  # super-blocks per search


@jit
def _int8(v):
    """A stored byte read as C's int8_t."""
    v = np.int64(v)
    return v - 256 if v > 127 else v


@jit
def _q6_k_finish(x, r, y, L, Lt, g0, scales):
    """quantize_row_q6_K after the 16 sub-block searches of super-block r of x, which
    were lanes g0..g0+15 (levels + 32 in Lt, scales): -> y (210,) uint8."""
    max_scale = F(0.0)
    max_abs_scale = F(0.0)
    for ib in range(16):
        scale = scales[g0 + ib]
        a = abs(scale)
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = scale
    if max_abs_scale < GROUP_MAX_EPS:
        y[:] = 0
        store_fp16(y, 208, F(0.0))
        return
    for ib in range(16):
        for i in range(16):
            L[16 * ib + i] = Lt[i, g0 + ib]
    iscale = F(-128.0) / max_scale
    d_all = store_fp16(y, 208, F(1.0) / iscale)
    for ib in range(16):
        y[192 + ib] = min(127, nearest_int(iscale * scales[g0 + ib])) & 0xFF  # int8_t store
    for j in range(16):
        d = d_all * F(_int8(y[192 + j]))
        if d == 0:
            continue
        for ii in range(16):
            l = nearest_int(x[r, 16 * j + ii] / d)
            L[16 * j + ii] = clamp(-32, 31, l) + 32
    for h in range(2):
        for l in range(32):
            q1 = np.int64(L[128 * h + l])
            q2 = np.int64(L[128 * h + l + 32])
            q3 = np.int64(L[128 * h + l + 64])
            q4 = np.int64(L[128 * h + l + 96])
            y[64 * h + l] = ((q1 & 0xF) | ((q3 & 0xF) << 4)) & 0xFF
            y[64 * h + l + 32] = ((q2 & 0xF) | ((q4 & 0xF) << 4)) & 0xFF
            y[128 + 32 * h + l] = ((q1 >> 4) | ((q2 >> 4) << 2)
                                   | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)) & 0xFF


@driver
def quantize_q6_k(x, qw, has_qw, out):
    """x (n, 256) float32, qw (n, 256) float32 (read only when has_qw) -> out (n, 210).

    The 16 make_qx_quants searches of a super-block are almost all of the work; they
    run for _BATCH super-blocks at once, one sub-block per SIMD lane (k_lanes)."""
    xt = carray(stack_f32(512), (16, MAX_LANES))  # xt[i, 16b + j]: value i of sub-block j of block b
    wt = carray(stack_f32(512), (16, MAX_LANES))  # its importance (has_qw)
    scales = carray(stack_f32(32), (MAX_LANES,))
    Lt = np.empty((16, MAX_LANES), np.int8)
    L = np.empty(QK_K, np.int8)
    ys = np.empty(out.shape[1], np.uint8)
    for i0 in range(0, x.shape[0], _BATCH):
        nb = min(_BATCH, x.shape[0] - i0)
        for b in range(nb):
            for j in range(16):
                for i in range(16):
                    xt[i, 16 * b + j] = x[i0 + b, 16 * j + i]
                    if has_qw:
                        wt[i, 16 * b + j] = qw[i0 + b, 16 * j + i]
        qx_lanes(16, 16 * nb, 32, xt, wt, has_qw, Lt, scales)
        for b in range(nb):
            _q6_k_finish(x, i0 + b, ys, L, Lt, 16 * b, scales)
            store_row(ys, out, i0 + b)


@jit
def _q6_k_dequantize_block(b, y):
    """One block: y = (d * scale) * (level - 32)."""
    d = load_fp16(b, 208)
    for h in range(2):
        for l in range(32):
            s = 16 * h // 2 + l // 16  # ggml's sc pointer moves 8 per half
            ql0 = np.int64(b[64 * h + l])
            ql1 = np.int64(b[64 * h + l + 32])
            qh = np.int64(b[128 + 32 * h + l])
            q1 = ((ql0 & 0xF) | (((qh >> 0) & 3) << 4)) - 32
            q2 = ((ql1 & 0xF) | (((qh >> 2) & 3) << 4)) - 32
            q3 = ((ql0 >> 4) | (((qh >> 4) & 3) << 4)) - 32
            q4 = ((ql1 >> 4) | (((qh >> 6) & 3) << 4)) - 32
            y[128 * h + l] = d * F(_int8(b[192 + s])) * F(q1)
            y[128 * h + l + 32] = d * F(_int8(b[194 + s])) * F(q2)
            y[128 * h + l + 64] = d * F(_int8(b[196 + s])) * F(q3)
            y[128 * h + l + 96] = d * F(_int8(b[198 + s])) * F(q4)


@driver
def dequantize_q6_k(raw, out):
    """raw (n, 210) uint8 -> out (n, 256) float32."""
    bs = np.empty(raw.shape[1], np.uint8)
    ys = np.empty(out.shape[1], np.float32)
    for i in range(raw.shape[0]):
        load_row(raw, i, bs)
        _q6_k_dequantize_block(bs, ys)
        store_row(ys, out, i)
