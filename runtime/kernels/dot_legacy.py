"""Kernels of the 32-element block types: Q8_0, Q4_0, Q5_0, IQ4_NL (x Q8_0) and Q4_1,
Q5_1 (x Q8_1).

Block layouts (ggml-common.h, little-endian; ``qs[j]`` holds elements j and j + 16):

    Q8_0    d:f16 | qs:int8[32]                          34 bytes
    Q4_0    d:f16 | qs:u8[16]       q - 8                18 bytes
    Q4_1    d:f16 m:f16 | qs:u8[16] d*q + m              20 bytes
    Q5_0    d:f16 | qh:u32 | qs:u8[16]   (q | h<<4) - 16 22 bytes
    Q5_1    d:f16 m:f16 | qh:u32 | qs:u8[16]             24 bytes
    IQ4_NL  d:f16 | qs:u8[16]       kvalues_iq4nl[q]     18 bytes

The dot products follow ggml-cpu/quants.c ``ggml_vec_dot_<type>_q8_0/_q8_1``: an exact
int32 sum per block, then ``sumf += sumi * (d_w * d_x)`` (Q4_1/Q5_1 add ``m_w * s_x``).

Decode kernels (``mv_*``: one or a few tokens; each weight row is read from memory once
and stays in L1 for all tokens) take one block's integer dot product at a time with a
vector intrinsic (_simd.py); prefill kernels (``mm_*``) unpack four rows' blocks and run
them against every token at once (prefill.py). Activations are (T, n): ``xq`` int8,
``xd``/``xs`` float32 per block (tokens-last in prefill).
"""

from __future__ import annotations

import numpy as np
from numba import types

from ggforge.runtime.kernels._jit import (F, F4M, H, I, I8M, KVALUES_IQ4NL, RAW, U, half, helper,
                                          i64, kernel)
from ggforge.runtime.kernels._simd import dot_iq4, dot_q4_0, dot_q5_0, dot_q8_0
from ggforge.runtime.kernels.prefill import fma4, scale_add, store, work

MV0 = types.void(RAW, I8M, F4M, F4M, i64, i64, i64)           # raw, xq, xd, out, qk, r0, r1
MV1 = types.void(RAW, I8M, F4M, F4M, F4M, i64, i64, i64)      # raw, xq, xd, xs, out, qk, r0, r1
MM0 = types.void(RAW, F4M, F4M, F4M, i64, i64, i64)           # raw, xT, xdT, out, qk, r0, r1
MM1 = types.void(RAW, F4M, F4M, F4M, F4M, i64, i64, i64)      # raw, xT, xdT, xsT, out, qk, r0, r1

KV = KVALUES_IQ4NL


@helper
def _qh(raw, r, o):
    """The u32 of the high bits at raw[r, o:o+4]."""
    return (I(raw[r, o]) | (I(raw[r, o + U(1)]) << 8) | (I(raw[r, o + U(2)]) << 16)
            | (I(raw[r, o + U(3)]) << 24))


# ---------------------------------------------------------------- decode
# Offsets: ``o`` is a block's byte offset in its row, ``wo`` in the whole tensor (what
# the _simd intrinsics take), ``xo`` the block's first activation of token t.

@kernel(MV0)
def mv_q8_0(raw, xq, xd, out, qk, r0, r1):
    """out[t, r] = row r . x[t] for Q8_0 rows r0..r1-1 (ggml_vec_dot_q8_0_q8_0)."""
    bs = qk + 2
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc = F(0)
            for b in range(xd.shape[1]):
                o = b * bs
                wo = r * raw.shape[1] + o
                (s,) = dot_q8_0(raw, wo + 2, 0, xq, t * xq.shape[1] + b * qk, 0)
                acc += F(s) * (half(raw[r, o], raw[r, o + 1]) * xd[t, b])
            out[t, r] = acc


@kernel(MV0)
def mv_q4_0(raw, xq, xd, out, qk, r0, r1):
    """ggml_vec_dot_q4_0_q8_0: ``sumf += sumi * d_w * d_x``."""
    bs = (qk >> 1) + 2
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc = F(0)
            for b in range(xd.shape[1]):
                o = b * bs
                wo = r * raw.shape[1] + o
                (s,) = dot_q4_0(raw, wo + 2, 0, xq, t * xq.shape[1] + b * qk, 8)
                acc += F(s) * half(raw[r, o], raw[r, o + 1]) * xd[t, b]
            out[t, r] = acc


@kernel(MV0)
def mv_q5_0(raw, xq, xd, out, qk, r0, r1):
    """ggml_vec_dot_q5_0_q8_0: ``sumf += (d_w * d_x) * sumi``."""
    bs = (qk >> 1) + 6
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc = F(0)
            for b in range(xd.shape[1]):
                o = b * bs
                wo = r * raw.shape[1] + o
                (s,) = dot_q5_0(raw, wo + 6, wo + 2, xq, t * xq.shape[1] + b * qk, 16)
                acc += (half(raw[r, o], raw[r, o + 1]) * xd[t, b]) * F(s)
            out[t, r] = acc


@kernel(MV1)
def mv_q4_1(raw, xq, xd, xs, out, qk, r0, r1):
    """ggml_vec_dot_q4_1_q8_1: ``sumf += (d_w * d_x) * sumi + m_w * s_x``."""
    bs = (qk >> 1) + 4
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc = F(0)
            for b in range(xd.shape[1]):
                o = b * bs
                wo = r * raw.shape[1] + o
                (s,) = dot_q4_0(raw, wo + 4, 0, xq, t * xq.shape[1] + b * qk, 0)
                dw = half(raw[r, o], raw[r, o + 1])
                mw = half(raw[r, o + 2], raw[r, o + 3])
                acc += (dw * xd[t, b]) * F(s) + mw * xs[t, b]
            out[t, r] = acc


@kernel(MV1)
def mv_q5_1(raw, xq, xd, xs, out, qk, r0, r1):
    """ggml_vec_dot_q5_1_q8_1: ``sumf += (d_w * d_x) * sumi + m_w * s_x``."""
    bs = (qk >> 1) + 8
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc = F(0)
            for b in range(xd.shape[1]):
                o = b * bs
                wo = r * raw.shape[1] + o
                (s,) = dot_q5_0(raw, wo + 8, wo + 4, xq, t * xq.shape[1] + b * qk, 0)
                dw = half(raw[r, o], raw[r, o + 1])
                mw = half(raw[r, o + 2], raw[r, o + 3])
                acc += (dw * xd[t, b]) * F(s) + mw * xs[t, b]
            out[t, r] = acc


@kernel(MV0)
def mv_iq4_nl(raw, xq, xd, out, qk, r0, r1):
    """ggml_vec_dot_iq4_nl_q8_0: ``sumf += (d_x * d_w) * sumi``."""
    bs = (qk >> 1) + 2
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc = F(0)
            for b in range(xd.shape[1]):
                o = b * bs
                wo = r * raw.shape[1] + o
                (s,) = dot_iq4(raw, wo + 2, 0, xq, t * xq.shape[1] + b * qk, 0)
                acc += (xd[t, b] * half(raw[r, o], raw[r, o + 1])) * F(s)
            out[t, r] = acc


# ---------------------------------------------------------------- prefill unpackers
# Each writes the block's quants of row ``r`` as floats into w[i, :qk], returns d (, m).

@helper
def _un_q8_0(raw, r, b, qk, w, i):
    o = U(b) * U(qk + 2)
    for j in range(qk):
        w[i, j] = F(np.int8(raw[r, o + U(2 + j)]))
    return half(raw[r, o], raw[r, o + U(1)])


@helper
def _un_q4_0(raw, r, b, qk, w, i):
    hq = qk >> 1
    o = U(b) * U(hq + 2)
    for j in range(hq):
        q = H(raw[r, o + U(2 + j)])
        w[i, j] = F((q & 15) - 8)
        w[i, hq + j] = F((q >> 4) - 8)
    return half(raw[r, o], raw[r, o + U(1)])


@helper
def _un_iq4_nl(raw, r, b, qk, w, i):
    hq = qk >> 1
    o = U(b) * U(hq + 2)
    for j in range(hq):
        q = raw[r, o + U(2 + j)]
        w[i, j] = F(KV[q & 15])
        w[i, hq + j] = F(KV[q >> 4])
    return half(raw[r, o], raw[r, o + U(1)])


@helper
def _un_q5(raw, r, b, qk, w, i, head, offset):
    """Q5_0 (head 2, offset 16) and Q5_1 (head 4, offset 0): qh at head, qs after it."""
    hq = qk >> 1
    o = U(b) * U(hq + head + 4)
    qh = _qh(raw, r, o + U(head))
    for j in range(hq):
        q = I(raw[r, o + U(head + 4 + j)])
        w[i, j] = F(((q & 15) | (((qh >> j) & 1) << 4)) - offset)
        w[i, hq + j] = F(((q >> 4) | (((qh >> (j + hq)) & 1) << 4)) - offset)
    return half(raw[r, o], raw[r, o + U(1)])


@helper
def _un_q4_1(raw, r, b, qk, w, i):
    hq = qk >> 1
    o = U(b) * U(hq + 4)
    for j in range(hq):
        q = H(raw[r, o + U(4 + j)])
        w[i, j] = F(q & 15)
        w[i, hq + j] = F(q >> 4)
    return half(raw[r, o], raw[r, o + U(1)])


@helper
def _min_add(acc, m, xsT, b):
    """acc[i, t] += m_w[i] * s_x[b, t] (the Q4_1/Q5_1 offset term)."""
    for i in range(4):
        for t in range(acc.shape[1]):
            acc[i, t] += m[i] * xsT[b, t]


@helper
def _m_of(raw, r, b, block_bytes):
    """The second half of a Q4_1/Q5_1 block header (m)."""
    o = U(b) * U(block_bytes)
    return half(raw[r, o + U(2)], raw[r, o + U(3)])


# ---------------------------------------------------------------- prefill

@kernel(MM0)
def mm_q8_0(raw, xT, xdT, out, qk, r0, r1):
    """out[t, r] for rows r0..r1-1 and all tokens: Q8_0 x Q8_0."""
    w, sub, acc, d, _ = work(qk, xT.shape[1])
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for b in range(xdT.shape[0]):
            for i in range(4):
                d[i] = _un_q8_0(raw, min(r + i, r1 - 1), b, qk, w, i)
            sub[:, :] = 0
            fma4(w, 0, qk, xT, b * qk, sub)
            scale_add(acc, d, sub, xdT, b)
        store(acc, out, r, r1)


@kernel(MM0)
def mm_q4_0(raw, xT, xdT, out, qk, r0, r1):
    """Q4_0 x Q8_0 for all tokens."""
    w, sub, acc, d, _ = work(qk, xT.shape[1])
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for b in range(xdT.shape[0]):
            for i in range(4):
                d[i] = _un_q4_0(raw, min(r + i, r1 - 1), b, qk, w, i)
            sub[:, :] = 0
            fma4(w, 0, qk, xT, b * qk, sub)
            scale_add(acc, d, sub, xdT, b)
        store(acc, out, r, r1)


@kernel(MM0)
def mm_iq4_nl(raw, xT, xdT, out, qk, r0, r1):
    """IQ4_NL x Q8_0 for all tokens."""
    w, sub, acc, d, _ = work(qk, xT.shape[1])
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for b in range(xdT.shape[0]):
            for i in range(4):
                d[i] = _un_iq4_nl(raw, min(r + i, r1 - 1), b, qk, w, i)
            sub[:, :] = 0
            fma4(w, 0, qk, xT, b * qk, sub)
            scale_add(acc, d, sub, xdT, b)
        store(acc, out, r, r1)


@kernel(MM0)
def mm_q5_0(raw, xT, xdT, out, qk, r0, r1):
    """Q5_0 x Q8_0 for all tokens."""
    w, sub, acc, d, _ = work(qk, xT.shape[1])
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for b in range(xdT.shape[0]):
            for i in range(4):
                d[i] = _un_q5(raw, min(r + i, r1 - 1), b, qk, w, i, 2, 16)
            sub[:, :] = 0
            fma4(w, 0, qk, xT, b * qk, sub)
            scale_add(acc, d, sub, xdT, b)
        store(acc, out, r, r1)


@kernel(MM1)
def mm_q4_1(raw, xT, xdT, xsT, out, qk, r0, r1):
    """Q4_1 x Q8_1 for all tokens."""
    w, sub, acc, d, m = work(qk, xT.shape[1])
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for b in range(xdT.shape[0]):
            for i in range(4):
                ri = min(r + i, r1 - 1)
                d[i] = _un_q4_1(raw, ri, b, qk, w, i)
                m[i] = _m_of(raw, ri, b, (qk >> 1) + 4)
            sub[:, :] = 0
            fma4(w, 0, qk, xT, b * qk, sub)
            scale_add(acc, d, sub, xdT, b)
            _min_add(acc, m, xsT, b)
        store(acc, out, r, r1)


@kernel(MM1)
def mm_q5_1(raw, xT, xdT, xsT, out, qk, r0, r1):
    """Q5_1 x Q8_1 for all tokens."""
    w, sub, acc, d, m = work(qk, xT.shape[1])
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for b in range(xdT.shape[0]):
            for i in range(4):
                ri = min(r + i, r1 - 1)
                d[i] = _un_q5(raw, ri, b, qk, w, i, 4, 0)
                m[i] = _m_of(raw, ri, b, (qk >> 1) + 8)
            sub[:, :] = 0
            fma4(w, 0, qk, xT, b * qk, sub)
            scale_add(acc, d, sub, xdT, b)
            _min_add(acc, m, xsT, b)
        store(acc, out, r, r1)
