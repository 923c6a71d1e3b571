"""Decode (one or a few tokens) kernels of the 256-element super-block types x Q8_K rows.

ggml-cpu/quants.c ``ggml_vec_dot_<type>_q8_K``, per super-block: integer sums of
weight quant x activation quant per sub-block, multiplied by the sub-block's integer
scale into an exact ``isum``, then

    sumf += (d_w * d_x) * isum - (dmin_w * d_x) * sum_g(min_g * bsums_x[g])

(the min term only for Q2_K, Q4_K, Q5_K; ``bsums_x`` are the Q8_K row's 16-element sums).

Each kernel reads a weight row from memory once (it stays in L1 while every token of
``xq`` (T, n) takes its dot product with it); the integer sums of 16 or 32 quants come
from the vector intrinsics of _simd.py, the scales and mins are applied in scalar code.
Layouts: kq_unpack.py.
"""

from __future__ import annotations

import numpy as np
from numba import types

from ggforge.runtime.kernels._jit import F, F4M, I, I4M, I8M, RAW, U, half, i64, kernel
from ggforge.runtime.kernels._simd import (dot_iq4, dot_q2_K, dot_q3_K, dot_q4_K, dot_q5_K,
                                           dot_q6_K)
from ggforge.runtime.kernels.kq_unpack import _q3_scale, _scale_min_k4

MVK = types.void(RAW, I8M, F4M, I4M, F4M, i64, i64, i64)   # raw, xq, xd, bsums, out, qk, r0, r1

# Offsets: ``o`` is a block's byte offset in its row, ``wo`` in the whole tensor (what the
# _simd intrinsics take), ``xo`` the block's first activation of token t.


@kernel(MVK)
def mv_q2_K(raw, xq, xd, bsums, out, qk, r0, r1):
    """Q2_K: 16 groups of 16 (scale: low 4 bits, min: high 4 bits), 2-bit quants."""
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc = F(0)
            for b in range(xd.shape[1]):
                o = b * 84
                wo = r * raw.shape[1] + o
                xo = t * xq.shape[1] + b * qk
                isum = I(0)
                for g in range(4):  # 128-element chunk n, 16-element half h
                    n, h = g >> 1, g & 1
                    s0, s1, s2, s3 = dot_q2_K(raw, wo + 16 + 32 * n + 16 * h, 0, xq,
                                              xo + 128 * n + 16 * h, 0)
                    sc = o + 8 * n + h  # the scale bytes of groups 8n + 2j + h
                    isum = I(isum + I(raw[r, sc] & 15) * s0 + I(raw[r, sc + 2] & 15) * s1
                             + I(raw[r, sc + 4] & 15) * s2 + I(raw[r, sc + 6] & 15) * s3)
                summs = I(0)
                for g in range(16):
                    summs = I(summs + I(raw[r, o + g] >> 4) * bsums[t, b * 16 + g])
                dall = xd[t, b] * half(raw[r, o + 80], raw[r, o + 81])
                dmin = xd[t, b] * half(raw[r, o + 82], raw[r, o + 83])
                acc += dall * F(isum) - dmin * F(summs)
            out[t, r] = acc


@kernel(MVK)
def mv_q3_K(raw, xq, xd, bsums, out, qk, r0, r1):
    """Q3_K: 16 groups of 16, signed 6-bit scales, 2 low bits + an inverted high bit."""
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc = F(0)
            for b in range(xd.shape[1]):
                o = b * 110
                wo = r * raw.shape[1] + o
                xo = t * xq.shape[1] + b * qk
                isum = I(0)
                for g in range(4):  # 128-element chunk n, 16-element half h
                    n, h = g >> 1, g & 1
                    s0, s1, s2, s3 = dot_q3_K(raw, wo + 32 + 32 * n + 16 * h, wo + 16 * h, xq,
                                              xo + 128 * n + 16 * h, 4 * n)
                    so = U(o + 96)
                    s = 8 * n + h
                    isum = I(isum + I(_q3_scale(raw, r, so, s)) * s0
                             + I(_q3_scale(raw, r, so, s + 2)) * s1
                             + I(_q3_scale(raw, r, so, s + 4)) * s2
                             + I(_q3_scale(raw, r, so, s + 6)) * s3)
                acc += (half(raw[r, o + 108], raw[r, o + 109]) * xd[t, b]) * F(isum)
            out[t, r] = acc


@kernel(MVK)
def mv_q4_K(raw, xq, xd, bsums, out, qk, r0, r1):
    """Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins, 4-bit quants."""
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc = F(0)
            for b in range(xd.shape[1]):
                o = b * 144
                wo = r * raw.shape[1] + o
                xo = t * xq.shape[1] + b * qk
                isum = I(0)
                summs = I(0)
                for c in range(4):  # 64-element chunks
                    s1, m1 = _scale_min_k4(raw, r, U(o + 4), 2 * c)
                    s2, m2 = _scale_min_k4(raw, r, U(o + 4), 2 * c + 1)
                    a1, a2 = dot_q4_K(raw, wo + 16 + 32 * c, 0, xq, xo + 64 * c, 0)
                    isum = I(isum + s1 * a1 + s2 * a2)
                    g = b * 16 + 4 * c
                    summs = I(summs + m1 * (bsums[t, g] + bsums[t, g + 1])
                              + m2 * (bsums[t, g + 2] + bsums[t, g + 3]))
                d = half(raw[r, o], raw[r, o + 1]) * xd[t, b]
                dmin = half(raw[r, o + 2], raw[r, o + 3]) * xd[t, b]
                acc += d * F(isum) - dmin * F(summs)
            out[t, r] = acc


@kernel(MVK)
def mv_q5_K(raw, xq, xd, bsums, out, qk, r0, r1):
    """Q5_K: as Q4_K with a fifth bit per quant in qh."""
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc = F(0)
            for b in range(xd.shape[1]):
                o = b * 176
                wo = r * raw.shape[1] + o
                xo = t * xq.shape[1] + b * qk
                isum = I(0)
                summs = I(0)
                for c in range(4):  # 64-element chunks; qh bits 2c (low nibbles), 2c + 1
                    s1, m1 = _scale_min_k4(raw, r, U(o + 4), 2 * c)
                    s2, m2 = _scale_min_k4(raw, r, U(o + 4), 2 * c + 1)
                    a1, a2 = dot_q5_K(raw, wo + 48 + 32 * c, wo + 16, xq, xo + 64 * c, 2 * c)
                    isum = I(isum + s1 * a1 + s2 * a2)
                    g = b * 16 + 4 * c
                    summs = I(summs + m1 * (bsums[t, g] + bsums[t, g + 1])
                              + m2 * (bsums[t, g + 2] + bsums[t, g + 3]))
                d = half(raw[r, o], raw[r, o + 1]) * xd[t, b]
                dmin = half(raw[r, o + 2], raw[r, o + 3]) * xd[t, b]
                acc += d * F(isum) - dmin * F(summs)
            out[t, r] = acc


@kernel(MVK)
def mv_q6_K(raw, xq, xd, bsums, out, qk, r0, r1):
    """Q6_K: 16 groups of 16 with int8 scales, 4 low bits in ql + 2 high bits in qh, minus 32."""
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc = F(0)
            for b in range(xd.shape[1]):
                o = b * 210
                wo = r * raw.shape[1] + o
                xo = t * xq.shape[1] + b * qk
                isum = I(0)
                for g in range(4):  # 128-element chunk n, 16-element half h
                    n, h = g >> 1, g & 1
                    s0, s1, s2, s3 = dot_q6_K(raw, wo + 64 * n + 16 * h, wo + 128 + 32 * n + 16 * h,
                                              xq, xo + 128 * n + 16 * h, 0)
                    sc = o + 192 + 8 * n + h  # the int8 scales of groups 8n + 2j + h
                    isum = I(isum + I(np.int8(raw[r, sc])) * s0 + I(np.int8(raw[r, sc + 2])) * s1
                             + I(np.int8(raw[r, sc + 4])) * s2 + I(np.int8(raw[r, sc + 6])) * s3)
                acc += (half(raw[r, o + 208], raw[r, o + 209]) * xd[t, b]) * F(isum)
            out[t, r] = acc


@kernel(MVK)
def mv_iq4_xs(raw, xq, xd, bsums, out, qk, r0, r1):
    """IQ4_XS: 8 sub-blocks of 32 with 6-bit scales (minus 32), non-linear 4-bit levels."""
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc = F(0)
            for b in range(xd.shape[1]):
                o = b * 136
                wo = r * raw.shape[1] + o
                xo = t * xq.shape[1] + b * qk
                sh = I(raw[r, o + 2]) | (I(raw[r, o + 3]) << 8)
                isum = I(0)
                for ib in range(8):
                    (s,) = dot_iq4(raw, wo + 8 + 16 * ib, 0, xq, xo + 32 * ib, 0)
                    ls = (((I(raw[r, o + 4 + ib // 2]) >> (4 * (ib % 2))) & 15)
                          | (((sh >> (2 * ib)) & 3) << 4))
                    isum = I(isum + (ls - 32) * s)
                acc += (half(raw[r, o], raw[r, o + 1]) * xd[t, b]) * F(isum)
            out[t, r] = acc
