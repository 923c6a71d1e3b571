"""numba kernels of the legacy reference quantizers: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

The same arithmetic as legacy.py's numpy versions (ggml's ``quantize_row_*_ref``), one
block at a time in compiled loops: no temporaries of the tensor's size, and nogil, so
legacy.py runs them on slices of the blocks from kquants' thread pool. The rules:

* float32 throughout, in C's order, no fused multiply-add (see k_common's docstring);
* C's ``(int8_t)(v)`` / ``(uint8_t)(v)`` is x86's ``cvttss2si`` (truncation to int32,
  0x80000000 for NaN and out-of-range values) then the low byte: :func:`_c_int8`;
* ``roundf`` rounds half away from zero;
* scales go through GGML_FP32_TO_FP16 (k_common.store_fp16, round to nearest even);
* no data-dependent branches in the loops that compute and pack the levels (C's ifs and
  ternaries become selects), so that LLVM vectorizes them: 1.1-1.7x the branchy version.

Block layouts: see legacy.py. Each kernel maps x (n_blocks, 32) float32 to out
(n_blocks, type_size) uint8.

Speed, Mparam/s on a 4096 x 4096 float32 matrix, 2-core dev machine (shared and busy
while measured, so the second thread gained little):

    type   numpy (replaced)   registry.quantize   quantize_blocks   ggml ref, 1 thread
    Q8_0          84                437                 574               201
    Q4_0         165                341                 586               832
    Q4_1         120                431                 595              1058
    Q5_0         163                287                 407               435
    Q5_1         100                320                 484               523

(registry.quantize adds the NaN/Inf check and its 1M-value chunks.) llama-quantize
managed 150-210 Mparam/s end to end with 2 threads for Q8_0 / Q4_0 (DESIGN.md).
Since the loops lost their branches (see the rules above), one thread does Q8_0 at
about 950-1070 Mparam/s (was 590-640) and Q4_0 at about 800 (was 470-610), against
ggml's 240 and 840 measured beside them; Q4_1, Q5_0 and Q5_1 gained little.
"""

from __future__ import annotations

import numpy as np
from numba.core import types

from ggforge.formats.quants.k_common import F, driver, f4, i8, sig, store_fp16

QK = 32
_I32_MIN = -(1 << 31)
_TWO31 = F(2.0**31)


@sig(i8(f4))
def _c_int8(v):
    """C's ``(int8_t)(v)`` on x86 as a branch-free select, so that loops calling it
    vectorize: truncation to int32 (INT32_MIN for NaN and out-of-range values, as
    numba's own conversion is undefined there), then the low byte, sign-extended."""
    ok = (v > -_TWO31) & (v < _TWO31)  # False for NaN
    r = np.int32(v) if ok else np.int32(_I32_MIN)  # the select drops the undefined lanes
    return np.int64((r << np.int32(24)) >> np.int32(24))


@sig(types.void(types.int32[::1], types.uint8[:, ::1], i8, i8, i8))
def _pack_levels(q, out, i, pos, five_bits):
    """Levels q[0:32] of block i into out[i, pos:]: with ``five_bits`` the little-endian
    uint32 qh first (bit j = bit 4 of q[j]), then 16 bytes q[j] & 15 | (q[j+16] & 15) << 4."""
    if five_bits:
        qh = np.int64(0)
        for j in range(QK):
            qh |= np.int64((q[j] >> 4) & 1) << j
        for k in range(4):
            out[i, pos + k] = (qh >> (8 * k)) & 0xFF
        pos += 4
    for j in range(16):
        out[i, pos + j] = ((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)) & 0xFF


@driver
def quantize_q8_0(x, out):
    """quantize_row_q8_0_ref: d = amax / 127, qs = roundf(x * id)."""
    ys = np.empty(2, np.uint8)
    for i in range(x.shape[0]):
        amax = F(0.0)
        for j in range(QK):
            a = abs(x[i, j])
            amax = amax if amax > a else a  # MAX(amax, fabsf(v))
        d = amax / F(127.0)
        idv = F(1.0) / d if d != 0 else F(0.0)
        store_fp16(ys, 0, d)
        out[i, 0] = ys[0]
        out[i, 1] = ys[1]
        for j in range(QK):
            v = x[i, j] * idv
            t = F(np.int32(v)) if (v > -_TWO31) & (v < _TWO31) else v  # trunc
            r = v - t
            v = t + F(1.0) if r >= F(0.5) else (t - F(1.0) if r <= F(-0.5) else t)  # roundf
            out[i, 2 + j] = _c_int8(v) & 0xFF


@driver
def quantize_symmetric(x, out, bits):
    """quantize_row_q4_0_ref (bits 4) / quantize_row_q5_0_ref (bits 5): d = max / -2^(b-1)
    with max the first value of largest |x|; q = MIN(2^b - 1, (int8_t)(x*id + 2^(b-1) + 0.5f))."""
    half = 1 << (bits - 1)
    top = np.int32((1 << bits) - 1)
    offset = F(half) + F(0.5)
    q = np.empty(QK, np.int32)
    ys = np.empty(2, np.uint8)
    for i in range(x.shape[0]):
        amax = F(0.0)
        mx = F(0.0)
        for j in range(QK):  # a branch, but a predictable one (taken ~4 times in 32)
            v = x[i, j]
            if amax < abs(v):
                amax = abs(v)
                mx = v
        d = mx / F(-half)
        idv = F(1.0) / d if d != 0 else F(0.0)
        store_fp16(ys, 0, d)
        out[i, 0] = ys[0]
        out[i, 1] = ys[1]
        for j in range(QK):
            q[j] = min(np.int32(_c_int8(x[i, j] * idv + offset)), top)
        _pack_levels(q, out, i, 2, bits == 5)


@driver
def quantize_affine(x, out, bits):
    """quantize_row_q4_1_ref (bits 4) / quantize_row_q5_1_ref (bits 5): d = (max - min) /
    (2^b - 1), m = min; q = (x - min)*id + 0.5f truncated (Q4_1: MIN(15, (int8_t)...),
    Q5_1: (uint8_t) without a clamp)."""
    top = (1 << bits) - 1
    q = np.empty(QK, np.int32)
    ys = np.empty(2, np.uint8)
    for i in range(x.shape[0]):
        mn = F(3.4028234663852886e38)
        mx = -mn
        for j in range(QK):
            v = x[i, j]
            mn = v if v < mn else mn
            mx = v if v > mx else mx
        d = (mx - mn) / F(top)
        idv = F(1.0) / d if d != 0 else F(0.0)
        store_fp16(ys, 0, d)
        out[i, 0] = ys[0]
        out[i, 1] = ys[1]
        store_fp16(ys, 0, mn)
        out[i, 2] = ys[0]
        out[i, 3] = ys[1]
        for j in range(QK):
            b = _c_int8((x[i, j] - mn) * idv + F(0.5))  # (int8_t); (uint8_t) is its low byte
            q[j] = min(b, top) if bits == 4 else b & 0xFF
        _pack_levels(q, out, i, 4, bits == 5)
