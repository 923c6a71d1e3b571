"""Rows of BF16 / F16 / F32 bytes to float32, with the NaN/Inf scan done on the way.

The converter's reading stage (convert/rows.py): one pass over each value instead of
numpy's widen-then-shift-then-isfinite (three passes and two temporaries of the chunk's
size). The kernels release the GIL, so a prefetch thread runs them while the
quantizers use the cores. Imported on first use (numba costs about a second to import).

A value is NaN or Inf exactly when its exponent bits are all ones: BF16 ``0x7F80``, F32
``0x7F800000``. ``((bits & E) + lowest_exponent_bit) & sign_bit`` is the sign bit
exactly then, so the scan is an OR of integers, which vectorizes, and the position of
the first bad value is looked for only when the OR says there is one.
"""

from __future__ import annotations

import numba
import numpy as np

_njit = numba.njit(cache=True, nogil=True, error_model="numpy")
# typed constants: with plain ints numba would widen the uint32 arithmetic to int64
_U0, _U16 = np.uint32(0), np.uint32(16)
_BF16_EXP, _BF16_LOW, _BF16_SIGN = np.uint32(0x7F80), np.uint32(0x80), np.uint32(0x8000)
_F32_EXP, _F32_LOW, _F32_SIGN = np.uint32(0x7F800000), np.uint32(0x00800000), np.uint32(0x80000000)


@_njit
def _first_bad_bf16(src, s, n):
    for c in range(n):
        if (np.uint32(src[s, c]) & _BF16_EXP) == _BF16_EXP:
            return c
    return -1


@_njit
def bf16_rows(src, src_rows, out):
    """out[r] = src[src_rows[r]] widened (bfloat16 bits -> float32 bits).

    src (m, n) uint16, src_rows (k,) int64, out (k, n) uint32 (a float32 array's view).
    Returns -1, or the flat index in out of the first NaN/Inf (rows after it unwritten).
    """
    k, n = out.shape
    for r in range(k):
        s = src_rows[r]
        bad = _U0
        for c in range(n):
            v = np.uint32(src[s, c])
            out[r, c] = v << _U16
            bad |= ((v & _BF16_EXP) + _BF16_LOW) & _BF16_SIGN
        if bad:
            return r * n + _first_bad_bf16(src, s, n)
    return -1


@_njit
def first_nonfinite_f32(bits):
    """Flat index of the first NaN/Inf of bits (k, n) uint32 (float32 bits), or -1."""
    k, n = bits.shape
    for r in range(k):
        bad = _U0
        for c in range(n):
            bad |= ((bits[r, c] & _F32_EXP) + _F32_LOW) & _F32_SIGN
        if bad:
            for c in range(n):
                if (bits[r, c] & _F32_EXP) == _F32_EXP:
                    return r * n + c
    return -1
