"""Shared inner loops of the F16 / BF16 matrix-matrix (prefill) kernels (dot_float.py).

A prefill kernel takes four weight rows at a time, widened to float32 in ``w`` (4, n),
and multiplies them with the activations of *all* tokens at once: the activations are
laid out tokens-last, ``xT`` (n_in, Tp) float32 (Tp = tokens padded to a multiple of
16), so the innermost loop runs over tokens, vectorizes without any horizontal sum, and
loads each activation vector once for four rows. (The quantized types' kernels are the
row-group kernels of _rows.py.)
"""

from __future__ import annotations

import numba
import numpy as np

from ggforge.runtime.kernels._jit import U

ROWS = 4  # weight rows per iteration of a prefill kernel

_fma = numba.njit(cache=True, error_model="numpy", fastmath={"contract"})
helper = numba.njit(cache=True, error_model="numpy")


@_fma
def fma4(w, j0, n, xT, k0, sub):
    """sub[i, t] += sum_{j < n} w[i, j0 + j] * xT[k0 + j, t] for the 4 rows i.

    Four j per pass over the tokens: each load and store of ``sub`` then carries four
    multiply-adds (stores, not arithmetic, bound this loop).
    """
    tp = sub.shape[1]
    n4 = n & ~3
    for jj in range(0, n4, 4):
        j = j0 + jj
        w00, w01, w02, w03 = w[0, j], w[0, j + 1], w[0, j + 2], w[0, j + 3]
        w10, w11, w12, w13 = w[1, j], w[1, j + 1], w[1, j + 2], w[1, j + 3]
        w20, w21, w22, w23 = w[2, j], w[2, j + 1], w[2, j + 2], w[2, j + 3]
        w30, w31, w32, w33 = w[3, j], w[3, j + 1], w[3, j + 2], w[3, j + 3]
        k = U(k0 + jj)
        for t in range(tp):
            x0 = xT[k, t]
            x1 = xT[k + U(1), t]
            x2 = xT[k + U(2), t]
            x3 = xT[k + U(3), t]
            sub[0, t] += w00 * x0 + w01 * x1 + w02 * x2 + w03 * x3
            sub[1, t] += w10 * x0 + w11 * x1 + w12 * x2 + w13 * x3
            sub[2, t] += w20 * x0 + w21 * x1 + w22 * x2 + w23 * x3
            sub[3, t] += w30 * x0 + w31 * x1 + w32 * x2 + w33 * x3
    for jj in range(n4, n):
        j = j0 + jj
        k = U(k0 + jj)
        for t in range(tp):
            xv = xT[k, t]
            for i in range(4):
                sub[i, t] += w[i, j] * xv


@helper
def store(acc, out, r, r1):
    """out[t, r + i] = acc[i, t] for the rows below r1 and the real tokens."""
    for i in range(min(4, r1 - r)):
        for t in range(out.shape[0]):
            out[t, r + i] = acc[i, t]


def tokens_last(a: np.ndarray, dtype=np.float32) -> np.ndarray:
    """(T, k) -> (k, Tp) ``dtype``, tokens padded with zeros to a multiple of 16 (the
    token loops vectorize 8 wide, unrolled twice: a shorter loop would run scalar)."""
    t, k = a.shape
    tp = -(-t // 16) * 16
    out = np.zeros((k, tp), dtype)
    out[:, :t] = a.T
    return out
