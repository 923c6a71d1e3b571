"""Shared scalar steps of ggml's K-quant and IQ4 quantizers, compiled with numba.

Every function here is a port of a helper (or a step) in ggml-quants.c (bundled llama.cpp of
llama-cpp-python 0.3.36) that must give the same bits, so the rules are strict:

* all ``float`` arithmetic is float32, one rounding per C operation, in C's order:
  ``w*x*l`` is ``(w*x)*l``, sums are accumulated one element at a time. numba types
  Python float and int literals as float64 / int64, and float32 mixed with an int64 is
  float64, so every constant is an ``F(...)`` and every int is cast with ``F`` before it
  meets a float. libggml-base (home of ggml-quants.c) is built without ``-march=native``:
  no fused multiply-add, and numba does not contract without ``fastmath`` either.
* C's integer narrowing (``uint8_t l = some_int``) wraps; storing into a ``uint8``/``int8``
  numpy array wraps the same way, so scratch arrays keep C's element types.
* ``error_model="numpy"``: a float division by zero yields Inf/NaN as in C instead of
  raising (numba's default raises ZeroDivisionError).
* C's truth tests on floats (``if (!d)``, ``d ? a : b``) are ``== 0`` / ``!= 0``, which
  treat NaN as true as C does; ``MAX(a, b)`` is ``a > b ? a : b`` (matters for -0.0).

The scale searches (make_qx_quants and friends) are in k_search.

The numba decorators, bit casts and tables are the package's (formats/jit.py); its guard
drops this folder's cached kernels when any source here or there changes (numba keys a
cached function on its own file only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numba.core import types

from ggforge.formats.jit import (  # noqa: F401 (the quantizers import them from here)
    KVALUES_IQ4NL, F, bits_f32, clear_stale_cache, driver, f32_bits, jit, sig, stack_f32)

clear_stale_cache(Path(__file__).parent)
QK_K = 256
GROUP_MAX_EPS = F(1e-15)
_MAGIC = F(12582912.0)  # 1.5 * 2^23: adding it leaves round-half-even(x) in the mantissa
_SCALE_TO_INF = F(2.0**112)
_SCALE_TO_ZERO = F(2.0**-110)
_TWO_M24 = F(2.0**-24)

# numba types of the helper signatures
f4, i8, b1 = types.float32, types.int64, types.boolean
F4A, U1A, I1A = types.float32[::1], types.uint8[::1], types.int8[::1]
F4A2, U1A2 = types.float32[:, ::1], types.uint8[:, ::1]
KV = types.Array(types.int8, 1, "C", readonly=True)  # a global table, as numba sees it


@sig(i8(i8, i8, i8))
def clamp(lo, hi, v):
    """C's ``MAX(lo, MIN(hi, v))`` on integers, branch-free (sign masks).

    numba's ``max``/``min`` (and LLVM's selects, which its x86 backend turns back into
    jumps inside loops) branch, and branches mispredict where levels often hit the ends
    of their range, as Q3_K's [-4, 3] do. Exact for |values| < 2^62.
    """
    d = hi - v
    v += d & (d >> 63)  # d < 0 (v > hi): v + d = hi
    e = v - lo
    return lo + (e & ~(e >> 63))  # e < 0 (v < lo): lo


# ---------------------------------------------------------------- row copies

# The drivers run each block on private copies of its row: a view such as x[i] bumps
# the reference count of the whole input array, an atomic operation that two threads
# working on slices of the same array would fight over (1.6x instead of 1.9x on 2 cores).

@sig([types.void(F4A2, i8, F4A), types.void(U1A2, i8, U1A)])
def load_row(x, i, dst):
    """dst[:] = x[i] without making a view of x."""
    for j in range(dst.shape[0]):
        dst[j] = x[i, j]


@sig([types.void(U1A, U1A2, i8), types.void(F4A, F4A2, i8)])
def store_row(src, out, i):
    """out[i] = src[:] without making a view of out."""
    for j in range(src.shape[0]):
        out[i, j] = src[j]


# ---------------------------------------------------------------- scalars

@sig(i8(f4))
def nearest_int(fval):
    """ggml's nearest_int: round half to even through the float32 1.5*2^23 trick.

    Kept as the bit trick (not ``round``) so that out-of-range and NaN inputs give the
    same garbage as in C (the assert there is compiled out).
    """
    i = f32_bits(F(fval + _MAGIC))
    return (np.int64(i) & 0x007FFFFF) - 0x00400000


@sig(i8(f4))
def fp32_to_fp16(f):
    """GGML_FP32_TO_FP16 (ggml_compute_fp32_to_fp16) -> the uint16 bits as an int.

    Round to nearest even, overflow to Inf, NaN -> 0x7e00 with the sign.
    """
    base = (abs(f) * _SCALE_TO_INF) * _SCALE_TO_ZERO
    w = np.int64(f32_bits(f)) & 0xFFFFFFFF
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = bits_f32((bias >> 1) + 0x07800000) + base
    bits = np.int64(f32_bits(base)) & 0xFFFFFFFF
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    if shl1_w > 0xFF000000:
        nonsign = 0x7E00
    return ((sign >> 16) | nonsign) & 0xFFFF


@sig(f4(i8))
def fp16_to_fp32(h):
    """GGML_FP16_TO_FP32 of uint16 bits ``h``: exact."""
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    man = h & 0x3FF
    if exp == 0:  # zero or subnormal: man * 2^-24 is exact in float32
        v = F(man) * _TWO_M24
        return -v if sign else v
    if exp == 31:
        return bits_f32(sign | 0x7F800000 | (man << 13))
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13))


@sig(f4(U1A, i8, f4))
def store_fp16(out, pos, f):
    """Write GGML_FP32_TO_FP16(f) little-endian at out[pos:pos+2]; return the value
    read back (GGML_FP16_TO_FP32), which several quantizers reuse."""
    h = fp32_to_fp16(f)
    out[pos] = h & 0xFF
    out[pos + 1] = h >> 8
    return fp16_to_fp32(h)


@sig(f4(U1A, i8))
def load_fp16(raw, pos):
    """GGML_FP16_TO_FP32 of the little-endian half at raw[pos:pos+2]."""
    return fp16_to_fp32(np.int64(raw[pos]) | (np.int64(raw[pos + 1]) << 8))


@sig(i8(i8, KV, f4))
def best_index_int8(n, val, x):
    """Index of the level of ``val`` (sorted int8) nearest to float ``x``; ties go up."""
    if x <= F(val[0]):
        return 0
    if x >= F(val[n - 1]):
        return n - 1
    ml = 0
    mu = n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < F(val[mav]):
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - F(val[mu - 1]) < F(val[mu]) - x else mu


@sig(types.UniTuple(i8, 2)(i8, U1A))
def get_scale_min_k4(j, q):
    """Unpack the 6-bit scale and min of sub-block j from the 12 packed bytes q."""
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4)
    return d, m


@sig(types.void(i8, i8, i8, U1A))
def pack_k4_scales(j, ls, lm, sc):
    """Pack the 6-bit scale ``ls`` and min ``lm`` of sub-block j into 12 bytes ``sc``
    (zeroed by the caller), in the order ggml writes them (q4_K / q5_K)."""
    ls &= 0xFF
    lm &= 0xFF
    if j < 4:
        sc[j] = ls
        sc[j + 4] = lm
    else:
        sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
        sc[j - 4] |= (ls >> 4) << 6
        sc[j] |= (lm >> 4) << 6


@sig([types.void(U1A, U1A), types.void(I1A, U1A)])
def pack_2bit(L, qs):
    """qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6 (q2_K, q3_K)."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            qs[j // 4 + l] = ((L[j + l] & 0xFF) | (L[j + l + 32] << 2)
                              | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)) & 0xFF
