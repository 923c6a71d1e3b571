"""Prefill (many tokens) kernels of the 256-element super-block types against Q8_K rows.

Four weight rows at a time: each super-block is unpacked into pre-scaled integers
(kq_unpack.py) and multiplied with the block's activations for every token, in
32-element sub-blocks whose float32 sums are exact (prefill.py); then, as in ggml's
``ggml_vec_dot_<type>_q8_K``,

    sumf += (d_w * d_x) * isum - (dmin_w * d_x) * sum_g(min_g * bsums_x[g])
"""

from __future__ import annotations

import numpy as np
from numba import types

from ggforge.runtime.kernels._jit import F, F4M, RAW, helper, i64, kernel
from ggforge.runtime.kernels.kq_unpack import (un_iq4_xs, un_q2_K, un_q3_K, un_q4_K, un_q5_K,
                                               un_q6_K)
from ggforge.runtime.kernels.prefill import int_sums, scale_add, store, work

MMK = types.void(RAW, F4M, F4M, F4M, F4M, i64, i64, i64)   # raw, xT, xdT, bsT, out, qk, r0, r1


# ---------------------------------------------------------------- prefill helpers

@helper
def _prefill_scratch(tp):
    return np.empty((4, tp), np.int32), np.zeros((4, 16), np.int32)


@helper
def _min_sub(acc, dm, mins, bsT, xdT, b):
    """acc[i, t] -= (dmin[i] * d_x[b, t]) * sum_g mins[i, g] * bsums_x[b*16 + g, t]."""
    for i in range(4):
        mi = dm[i]
        for t in range(acc.shape[1]):
            s = F(0)  # exact: |sum| <= 16 * 63 * 2032 < 2^24
            for g in range(16):
                s += F(mins[i, g]) * bsT[b * 16 + g, t]
            acc[i, t] -= (mi * xdT[b, t]) * s


@kernel(MMK)
def mm_q2_K(raw, xT, xdT, bsT, out, qk, r0, r1):
    """Q2_K x Q8_K for rows r0..r1-1 and all tokens."""
    w, sub, acc, d, dm = work(qk, xT.shape[1])
    isum, mins = _prefill_scratch(xT.shape[1])
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for b in range(xdT.shape[0]):
            for i in range(4):
                d0, m0 = un_q2_K(raw, min(r + i, r1 - 1), b, qk, w, i, mins)
                d[i] = d0
                dm[i] = m0
            int_sums(w, qk >> 5, 32, xT, b * qk, sub, isum)
            scale_add(acc, d, isum, xdT, b)
            _min_sub(acc, dm, mins, bsT, xdT, b)
        store(acc, out, r, r1)


@kernel(MMK)
def mm_q3_K(raw, xT, xdT, bsT, out, qk, r0, r1):
    """Q3_K x Q8_K for all tokens."""
    w, sub, acc, d, dm = work(qk, xT.shape[1])
    isum, mins = _prefill_scratch(xT.shape[1])
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for b in range(xdT.shape[0]):
            for i in range(4):
                d[i] = un_q3_K(raw, min(r + i, r1 - 1), b, qk, w, i, mins)[0]
            int_sums(w, qk >> 5, 32, xT, b * qk, sub, isum)
            scale_add(acc, d, isum, xdT, b)
        store(acc, out, r, r1)


@kernel(MMK)
def mm_q4_K(raw, xT, xdT, bsT, out, qk, r0, r1):
    """Q4_K x Q8_K for all tokens."""
    w, sub, acc, d, dm = work(qk, xT.shape[1])
    isum, mins = _prefill_scratch(xT.shape[1])
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for b in range(xdT.shape[0]):
            for i in range(4):
                d0, m0 = un_q4_K(raw, min(r + i, r1 - 1), b, qk, w, i, mins)
                d[i] = d0
                dm[i] = m0
            int_sums(w, qk >> 5, 32, xT, b * qk, sub, isum)
            scale_add(acc, d, isum, xdT, b)
            _min_sub(acc, dm, mins, bsT, xdT, b)
        store(acc, out, r, r1)


@kernel(MMK)
def mm_q5_K(raw, xT, xdT, bsT, out, qk, r0, r1):
    """Q5_K x Q8_K for all tokens."""
    w, sub, acc, d, dm = work(qk, xT.shape[1])
    isum, mins = _prefill_scratch(xT.shape[1])
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for b in range(xdT.shape[0]):
            for i in range(4):
                d0, m0 = un_q5_K(raw, min(r + i, r1 - 1), b, qk, w, i, mins)
                d[i] = d0
                dm[i] = m0
            int_sums(w, qk >> 5, 32, xT, b * qk, sub, isum)
            scale_add(acc, d, isum, xdT, b)
            _min_sub(acc, dm, mins, bsT, xdT, b)
        store(acc, out, r, r1)


@kernel(MMK)
def mm_q6_K(raw, xT, xdT, bsT, out, qk, r0, r1):
    """Q6_K x Q8_K for all tokens."""
    w, sub, acc, d, dm = work(qk, xT.shape[1])
    isum, mins = _prefill_scratch(xT.shape[1])
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for b in range(xdT.shape[0]):
            for i in range(4):
                d[i] = un_q6_K(raw, min(r + i, r1 - 1), b, qk, w, i, mins)[0]
            int_sums(w, qk >> 5, 32, xT, b * qk, sub, isum)
            scale_add(acc, d, isum, xdT, b)
        store(acc, out, r, r1)


@kernel(MMK)
def mm_iq4_xs(raw, xT, xdT, bsT, out, qk, r0, r1):
    """IQ4_XS x Q8_K for all tokens."""
    w, sub, acc, d, dm = work(qk, xT.shape[1])
    isum, mins = _prefill_scratch(xT.shape[1])
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for b in range(xdT.shape[0]):
            for i in range(4):
                d[i] = un_iq4_xs(raw, min(r + i, r1 - 1), b, qk, w, i, mins)[0]
            int_sums(w, qk >> 5, 32, xT, b * qk, sub, isum)
            scale_add(acc, d, isum, xdT, b)
        store(acc, out, r, r1)
