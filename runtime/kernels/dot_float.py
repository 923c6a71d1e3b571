"""Kernels of the float weight types F16 and BF16 (F32 goes to numpy's BLAS).

ggml's ``vec_dot_type`` of F16 is F16 and of BF16 is BF16: the activations are rounded
to the weight's format first (act_quant.round_fp16 / round_bf16), so every product of
two halves (or two bfloats) is exact in float32, and the dot product is a float32 sum,
as in ``ggml_vec_dot_f16`` / ``ggml_vec_dot_bf16`` (whose SIMD code orders its sums its
own way; these order theirs to vectorize).

Weights come in as their 16-bit patterns, (n_out, n_in) uint16.
"""

from __future__ import annotations

import numpy as np
from numba import types

from ggforge.runtime.kernels._jit import (FAST, RAW16, F, F4M, I, bits_f32, half_bits_to_f32,
                                          helper, i64, kernel)
from ggforge.runtime.kernels.prefill import fma4, store

MVF = types.void(RAW16, F4M, F4M, i64, i64)    # w16, x (T, n_in), out (T, n_out), r0, r1
MMF = types.void(RAW16, F4M, F4M, i64, i64)    # w16, xT (n_in, Tp), out (T, n_out), r0, r1

_CHUNK = 256  # elements of four rows widened to float32 at a time in prefill


@helper
def bf16_bits_to_f32(h):
    """bfloat16 bits -> float32 (exact: the high half of a float32)."""
    return bits_f32(I(I(h) << I(16)))


@kernel(MVF, fastmath=FAST)
def mv_f16(w, x, out, r0, r1):
    """out[t, r] = sum_k half(w[r, k]) * x[t, k] for rows r0..r1-1 and a few tokens."""
    n = x.shape[1]
    for r in range(r0, r1):
        for t in range(x.shape[0]):
            acc = F(0)
            for k in range(n):
                acc += half_bits_to_f32(w[r, k]) * x[t, k]
            out[t, r] = acc


@kernel(MVF, fastmath=FAST)
def mv_bf16(w, x, out, r0, r1):
    """out[t, r] = sum_k bf16(w[r, k]) * x[t, k] for rows r0..r1-1 and a few tokens."""
    n = x.shape[1]
    for r in range(r0, r1):
        for t in range(x.shape[0]):
            acc = F(0)
            for k in range(n):
                acc += bf16_bits_to_f32(w[r, k]) * x[t, k]
            out[t, r] = acc


@helper
def _widen_f16(w, ri, k0, m, wf, i):
    for j in range(m):
        wf[i, j] = half_bits_to_f32(w[ri, k0 + j])


@helper
def _widen_bf16(w, ri, k0, m, wf, i):
    for j in range(m):
        wf[i, j] = bf16_bits_to_f32(w[ri, k0 + j])


@kernel(MMF, fastmath=FAST)
def mm_f16(w, xT, out, r0, r1):
    """out[t, r] = sum_k half(w[r, k]) * xT[k, t] for rows r0..r1-1, all tokens."""
    n, tp = xT.shape
    wf = np.empty((4, _CHUNK), np.float32)
    acc = np.zeros((4, tp), np.float32)
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for k0 in range(0, n, _CHUNK):
            m = min(_CHUNK, n - k0)
            for i in range(4):
                _widen_f16(w, min(r + i, r1 - 1), k0, m, wf, i)
            fma4(wf, 0, m, xT, k0, acc)
        store(acc, out, r, r1)


@kernel(MMF, fastmath=FAST)
def mm_bf16(w, xT, out, r0, r1):
    """out[t, r] = sum_k bf16(w[r, k]) * xT[k, t] for rows r0..r1-1, all tokens."""
    n, tp = xT.shape
    wf = np.empty((4, _CHUNK), np.float32)
    acc = np.zeros((4, tp), np.float32)
    for r in range(r0, r1, 4):
        acc[:, :] = 0
        for k0 in range(0, n, _CHUNK):
            m = min(_CHUNK, n - k0)
            for i in range(4):
                _widen_bf16(w, min(r + i, r1 - 1), k0, m, wf, i)
            fma4(wf, 0, m, xT, k0, acc)
        store(acc, out, r, r1)
