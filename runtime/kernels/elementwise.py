"""Compiled element-wise and attention steps of the forward pass (layers.py calls them).

A decode step applies a dozen small operations per layer to vectors of a few thousand
floats; as numpy expressions each costs several array passes and ~5 us of interpreter
overhead, together more than the layer's matrix products. These kernels do one pass
each, with the arithmetic of the numpy expressions they replace (layers.py documents it):
the same float32 operations in the same order, so the same bits — except where noted
(the float64 sum of squares is sequential, as ggml's, where numpy's is pairwise; the
attention of a few tokens runs in float64, where the BLAS path of long prompts is float32).
"""

from __future__ import annotations

import numpy as np
from numba import types

from ggforge.runtime.kernels._jit import FAST, F, F4M, i64, kernel
from ggforge.formats.jit import half as half_value
from ggforge.formats.jit import half_bits

F1 = types.Array(types.float32, 1, "C")
F3 = types.Array(types.float32, 3, "C")
P1 = types.Array(types.int64, 1, "C")
f32 = types.float32


@kernel(types.void(F4M, F1, f32, F4M))
def rms_norm_rows(x, w, eps, out):
    """out[t] = x[t] * (1 / sqrt(mean(x[t]^2) + eps)) * w (ggml_rms_norm, then the weight)."""
    n = x.shape[1]
    for t in range(x.shape[0]):
        s = 0.0
        for i in range(n):
            s += np.float64(x[t, i] * x[t, i])
        scale = F(1) / np.sqrt(F(s / n) + eps)
        for i in range(n):
            out[t, i] = (x[t, i] * scale) * w[i]


@kernel(types.void(F1, F1, F1))
def gelu(x, table, out):
    """ggml's CPU GELU: 0 at or below -10, the identity at or above 10, else ``table`` (the
    fp16 GELU of every fp16) at the fp16 bits of x."""
    for i in range(x.shape[0]):
        v = x[i]
        if v <= F(-10):
            out[i] = F(0)
        elif v >= F(10):
            out[i] = v
        else:
            out[i] = table[half_bits(v)]


@kernel(types.void(F3, F4M, F4M, i64, F3))
def rope(x, cos, sin, neox, out):
    """Rotate the first 2 * cos.shape[1] dims of every head of x (n_tokens, n_heads, d):
    pairs (i, i + n_rot/2) if ``neox``, else (2i, 2i + 1)."""
    half = cos.shape[1]
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for i in range(half):
                a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
                x0, x1 = x[t, h, a], x[t, h, b]
                c, s = cos[t, i], sin[t, i]
                out[t, h, a] = x0 * c - x1 * s
                out[t, h, b] = x0 * s + x1 * c
            for i in range(2 * half, x.shape[2]):
                out[t, h, i] = x[t, h, i]


@kernel(types.void(F3, F3, F3, P1, f32, i64, types.boolean, f32, F4M), fastmath=FAST)
def attend(q, k, v, q_pos, scale, window, p_f16, softcap, out):
    """Causal grouped-query attention of a few queries over the cache (layers.attention):
    softmax(q k^T * scale) v over the positions j <= q_pos (and q_pos - j < window), in
    float64 from the float32 inputs and rounded once, so that the GPU's kernels, which
    sum in other orders, give the same float32 results (docs/gpu.md).
    ``p_f16``: an F16 value cache, as llama.cpp: float32 scores and softmax weights, the
    weights rounded to F16 before the product with V (as ggml_mul_mat converts them).
    ``softcap`` > 0: each score q.k becomes softcap * tanh(q.k / softcap) before the scale."""
    n_head, d = q.shape[1], q.shape[2]
    n_kv, n_head_kv, dv = v.shape
    group = n_head // n_head_kv
    s = np.empty(n_kv, np.float64)
    p = np.empty(n_kv, np.float32)
    o64 = np.empty(dv, np.float64)
    scale64 = np.float64(scale)
    cap64 = np.float64(softcap)
    for t in range(q.shape[0]):
        hi = min(n_kv, q_pos[t] + 1)
        lo = max(0, q_pos[t] - window + 1) if window > 0 else 0
        for h in range(n_head):
            hk = h // group
            top = -np.inf
            for j in range(lo, hi):
                acc = 0.0
                for i in range(d):
                    acc += np.float64(q[t, h, i]) * np.float64(k[j, hk, i])
                if softcap > 0:
                    acc = np.tanh(acc / cap64) * cap64
                s[j] = acc * scale64
                top = max(top, s[j])
            o = h * dv
            if not p_f16:
                total = 0.0
                for i in range(dv):
                    o64[i] = 0.0
                for j in range(lo, hi):
                    e = np.exp(s[j] - top)
                    total += e
                    for i in range(dv):
                        o64[i] += e * np.float64(v[j, hk, i])
                for i in range(dv):
                    out[t, o + i] = F(o64[i] / total)
                continue
            top32 = F(-np.inf)
            for j in range(lo, hi):
                p[j] = F(s[j])
                top32 = max(top32, p[j])
            total = 0.0
            for j in range(lo, hi):
                p[j] = np.exp(p[j] - top32)
                total += np.float64(p[j])
            norm = F(total)
            for i in range(dv):
                out[t, o + i] = 0
            for j in range(lo, hi):
                pj = half_value(half_bits(p[j] / norm))
                for i in range(dv):
                    out[t, o + i] += pj * v[j, hk, i]
