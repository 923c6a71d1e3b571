"""Unpack one 256-element super-block of a K-quant or IQ4_XS row into integers.

Used by the prefill kernels (mm_kquants.py), which reuse the unpacked block for every
token; the decode kernels (dot_kquants.py) unpack and multiply in one loop instead.

``un_<type>(raw, r, b, qk, w, i, mins)`` writes ``w[i, e]`` = sub-block scale x quant
for the 256 elements ``e`` of block ``b`` of row ``r`` (float32, exact: at most 4096 in
magnitude), fills ``mins[i, g]`` with the integer min of each 16-element group where the
type has mins, and returns ``(d, dmin)``, the block's fp16 super-scales as float32
(dmin 0 without mins). The dot product with a Q8_K row is then ggml's
``d*d_x * sum(w*q_x) - dmin*d_x * sum(mins*bsums_x)``.

Block layouts and element order follow ggml-quants.c ``dequantize_row_*``
(ggml-common.h):

    Q2_K    scales:u8[16] (lo 4 bits scale, hi 4 bits min) | qs[64] | d | dmin     84
    Q3_K    hmask[32] | qs[64] | scales:12 bytes (16 x 6 bits, minus 32) | d       110
    Q4_K    d | dmin | scales:12 bytes (8 x 6-bit scale + 8 x 6-bit min) | qs[128] 144
    Q5_K    d | dmin | scales:12 bytes | qh[32] | qs[128]                          176
    Q6_K    ql[128] | qh[64] | scales:int8[16] | d                                 210
    IQ4_XS  d | scales_h:u16 | scales_l[4] | qs[128] (kvalues_iq4nl levels)        136

Inner loops count ``range(n)`` with ``n`` derived from the runtime ``qk`` (_jit.py).
"""

from __future__ import annotations

import numpy as np

from ggforge.runtime.kernels._jit import KVALUES_IQ4NL, F, H, I, U, half, helper

KV = KVALUES_IQ4NL


@helper
def _scale_min_k4(raw, r, so, j):
    """get_scale_min_k4 of the 12 scale bytes at raw[r, so:]: (scale, min) j of 8."""
    if j < 4:
        return I(raw[r, so + U(j)]) & 63, I(raw[r, so + U(j + 4)]) & 63
    sc = (I(raw[r, so + U(j + 4)]) & 15) | ((I(raw[r, so + U(j - 4)]) >> 6) << 4)
    m = (I(raw[r, so + U(j + 4)]) >> 4) | ((I(raw[r, so + U(j)]) >> 6) << 4)
    return sc, m


@helper
def un_q2_K(raw, r, b, qk, w, i, mins):
    o = U(b) * U(84)
    n32 = qk >> 3
    for g in range(qk >> 4):
        mins[i, g] = raw[r, o + U(g)] >> 4
    for n in range(qk >> 7):  # 128-element chunks; group 8n + 2j + h has shift 2j, half h
        so = o + U(8 * n)
        a0, b0 = H(raw[r, so] & 15), H(raw[r, so + U(1)] & 15)
        a1, b1 = H(raw[r, so + U(2)] & 15), H(raw[r, so + U(3)] & 15)
        a2, b2 = H(raw[r, so + U(4)] & 15), H(raw[r, so + U(5)] & 15)
        a3, b3 = H(raw[r, so + U(6)] & 15), H(raw[r, so + U(7)] & 15)
        qo = o + U(16 + 32 * n)
        e0 = 128 * n
        for l in range(n32):
            q = H(raw[r, qo + U(l)])
            lo = l < 16
            w[i, e0 + l] = H((a0 if lo else b0) * (q & 3))
            w[i, e0 + 32 + l] = H((a1 if lo else b1) * ((q >> 2) & 3))
            w[i, e0 + 64 + l] = H((a2 if lo else b2) * ((q >> 4) & 3))
            w[i, e0 + 96 + l] = H((a3 if lo else b3) * (q >> 6))
    return half(raw[r, o + U(80)], raw[r, o + U(81)]), half(raw[r, o + U(82)], raw[r, o + U(83)])


@helper
def _q3_scale(raw, r, so, s):
    """Scale s of 16 (6 bits, minus 32) of Q3_K's 12 scale bytes at raw[r, so:]."""
    low = (I(raw[r, so + U(s % 8)]) >> (4 * (s // 8))) & 15
    high = (I(raw[r, so + U(8 + s % 4)]) >> (2 * (s // 4))) & 3
    return H((low | (high << 4)) - 32)


@helper
def un_q3_K(raw, r, b, qk, w, i, mins):
    o = U(b) * U(110)
    n32 = qk >> 3
    so = o + U(96)
    for n in range(qk >> 7):  # 128-element chunks; group 8n + 2j + h has shift 2j, half h
        s = 8 * n
        a0, b0 = _q3_scale(raw, r, so, s), _q3_scale(raw, r, so, s + 1)
        a1, b1 = _q3_scale(raw, r, so, s + 2), _q3_scale(raw, r, so, s + 3)
        a2, b2 = _q3_scale(raw, r, so, s + 4), _q3_scale(raw, r, so, s + 5)
        a3, b3 = _q3_scale(raw, r, so, s + 6), _q3_scale(raw, r, so, s + 7)
        m0 = H(1 << (4 * n))  # hmask bit of shift 2j is 4n + j; clear -> subtract 4
        m1, m2, m3 = H(m0 << 1), H(m0 << 2), H(m0 << 3)
        qo = o + U(32 + 32 * n)
        e0 = 128 * n
        for l in range(n32):
            q = H(raw[r, qo + U(l)])
            hm = H(raw[r, o + U(l)])
            lo = l < 16
            w[i, e0 + l] = H((a0 if lo else b0) * ((q & 3) - (0 if hm & m0 else 4)))
            w[i, e0 + 32 + l] = H((a1 if lo else b1) * (((q >> 2) & 3) - (0 if hm & m1 else 4)))
            w[i, e0 + 64 + l] = H((a2 if lo else b2) * (((q >> 4) & 3) - (0 if hm & m2 else 4)))
            w[i, e0 + 96 + l] = H((a3 if lo else b3) * ((q >> 6) - (0 if hm & m3 else 4)))
    return half(raw[r, o + U(108)], raw[r, o + U(109)]), F(0)


@helper
def un_q4_K(raw, r, b, qk, w, i, mins):
    o = U(b) * U(144)
    n32 = qk >> 3
    for c in range(qk >> 6):  # 64-element chunks (a runtime count: no unrolling)
        s1, m1 = _scale_min_k4(raw, r, o + U(4), 2 * c)
        s2, m2 = _scale_min_k4(raw, r, o + U(4), 2 * c + 1)
        mins[i, 4 * c] = m1
        mins[i, 4 * c + 1] = m1
        mins[i, 4 * c + 2] = m2
        mins[i, 4 * c + 3] = m2
        h1 = H(s1)
        h2 = H(s2)
        qo = o + U(16 + 32 * c)
        e0 = 64 * c
        for l in range(n32):
            q = H(raw[r, qo + U(l)])
            w[i, e0 + l] = H(h1 * (q & 15))
            w[i, e0 + 32 + l] = H(h2 * (q >> 4))
    return half(raw[r, o], raw[r, o + U(1)]), half(raw[r, o + U(2)], raw[r, o + U(3)])


@helper
def un_q5_K(raw, r, b, qk, w, i, mins):
    o = U(b) * U(176)
    n32 = qk >> 3
    for c in range(qk >> 6):  # 64-element chunks (a runtime count: no unrolling)
        s1, m1 = _scale_min_k4(raw, r, o + U(4), 2 * c)
        s2, m2 = _scale_min_k4(raw, r, o + U(4), 2 * c + 1)
        mins[i, 4 * c] = m1
        mins[i, 4 * c + 1] = m1
        mins[i, 4 * c + 2] = m2
        mins[i, 4 * c + 3] = m2
        h1 = H(s1)
        h2 = H(s2)
        u1 = H(1 << (2 * c))  # qh bits of this chunk: u1 for the low nibbles, u2 the high
        u2 = H(2 << (2 * c))
        qo = o + U(48 + 32 * c)
        ho = o + U(16)
        e0 = 64 * c
        for l in range(n32):
            q = H(raw[r, qo + U(l)])
            hb = H(raw[r, ho + U(l)])
            w[i, e0 + l] = H(h1 * ((q & 15) + (16 if hb & u1 else 0)))
            w[i, e0 + 32 + l] = H(h2 * ((q >> 4) + (16 if hb & u2 else 0)))
    return half(raw[r, o], raw[r, o + U(1)]), half(raw[r, o + U(2)], raw[r, o + U(3)])


@helper
def un_q6_K(raw, r, b, qk, w, i, mins):
    o = U(b) * U(210)
    n32 = qk >> 3
    for n in range(qk >> 7):  # 128-element chunks: 64 bytes of ql, 32 of qh, 8 scales
        so = o + U(192 + 8 * n)
        a0, b0 = H(np.int8(raw[r, so])), H(np.int8(raw[r, so + U(1)]))
        a1, b1 = H(np.int8(raw[r, so + U(2)])), H(np.int8(raw[r, so + U(3)]))
        a2, b2 = H(np.int8(raw[r, so + U(4)])), H(np.int8(raw[r, so + U(5)]))
        a3, b3 = H(np.int8(raw[r, so + U(6)])), H(np.int8(raw[r, so + U(7)]))
        lo_o = o + U(64 * n)
        hi_o = o + U(128 + 32 * n)
        e0 = 128 * n
        for l in range(n32):
            q0 = H(raw[r, lo_o + U(l)])
            q1 = H(raw[r, lo_o + U(32 + l)])
            qh = H(raw[r, hi_o + U(l)])
            lo = l < 16
            w[i, e0 + l] = H((a0 if lo else b0) * (((q0 & 15) | ((qh & 3) << 4)) - 32))
            w[i, e0 + 32 + l] = H((a1 if lo else b1) * (((q1 & 15) | (((qh >> 2) & 3) << 4)) - 32))
            w[i, e0 + 64 + l] = H((a2 if lo else b2) * (((q0 >> 4) | (((qh >> 4) & 3) << 4)) - 32))
            w[i, e0 + 96 + l] = H((a3 if lo else b3) * (((q1 >> 4) | ((qh >> 6) << 4)) - 32))
    return half(raw[r, o + U(208)], raw[r, o + U(209)]), F(0)


@helper
def un_iq4_xs(raw, r, b, qk, w, i, mins):
    o = U(b) * U(136)
    n16 = qk >> 4
    sh = I(raw[r, o + U(2)]) | (I(raw[r, o + U(3)]) << 8)
    for ib in range(qk >> 5):
        ls = (((I(raw[r, o + U(4 + ib // 2)]) >> (4 * (ib % 2))) & 15)
              | (((sh >> (2 * ib)) & 3) << 4))
        sc = H(ls - 32)
        qo = o + U(8 + 16 * ib)
        e0 = 32 * ib
        for j in range(n16):
            q = raw[r, qo + U(j)]
            w[i, e0 + j] = H(sc * KV[q & 15])
            w[i, e0 + 16 + j] = H(sc * KV[q >> 4])
    return half(raw[r, o], raw[r, o + U(1)]), F(0)

