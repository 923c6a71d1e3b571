"""Q4_K and Q5_K decoders: ports of ggml-quants.c's dequantize_row_q{4,5}_K.

The quantizers are k_q4_q5_lanes' (quantize_row_q{4,5}_K_ref and _impl, byte for byte,
their searches in SIMD lanes). The two types share everything except Q5_K's fifth bit
plane, so one block function decodes both. Arithmetic rules: see k_common.

Block layouts (little-endian, ggml-common.h):

    Q4_K  d:f16 dmin:f16 | scales:u8[12] (8 x 6-bit scale + 8 x 6-bit min)
          | qs:u8[128] (nibbles: x[64k+l] low, x[64k+32+l] high)               144 bytes
    Q5_K  d:f16 dmin:f16 | scales:u8[12] | qh:u8[32] (bit 4 of each level)
          | qs:u8[128] (low 4 bits, as Q4_K)                                   176 bytes
"""

from __future__ import annotations

import numpy as np
from numba.core import types

from ggforge.formats.quants.k_common import (
    F4A,
    U1A,
    F,
    b1,
    driver,
    get_scale_min_k4,
    i8,
    load_fp16,
    load_row,
    sig,
    store_row,
)


@sig(types.void(U1A, F4A, i8, b1))
def _dequantize_k45_block(b, y, qs_at, has_qh):
    """Shared Q4_K / Q5_K decoder of one block: y = d*scale * level - dmin*min
    (the product rounded first, as in C)."""
    d = load_fp16(b, 0)
    dmin = load_fp16(b, 2)
    sc = b[4:16]
    for c in range(4):
        for half in range(2):
            s, m = get_scale_min_k4(2 * c + half, sc)
            d1 = d * F(s)
            m1 = dmin * F(m)
            bit = 1 << (2 * c + half)
            for l in range(32):
                q = np.int64(b[qs_at + 32 * c + l])
                q = (q >> 4) if half else (q & 0xF)
                if has_qh and (b[16 + l] & bit):
                    q += 16
                y[64 * c + 32 * half + l] = d1 * F(q) - m1


@driver
def dequantize_q4_k(raw, out):
    """raw (n, 144) uint8 -> out (n, 256) float32."""
    bs = np.empty(raw.shape[1], np.uint8)
    ys = np.empty(out.shape[1], np.float32)
    for i in range(raw.shape[0]):
        load_row(raw, i, bs)
        _dequantize_k45_block(bs, ys, 16, False)
        store_row(ys, out, i)


@driver
def dequantize_q5_k(raw, out):
    """raw (n, 176) uint8 -> out (n, 256) float32."""
    bs = np.empty(raw.shape[1], np.uint8)
    ys = np.empty(out.shape[1], np.float32)
    for i in range(raw.shape[0]):
        load_row(raw, i, bs)
        _dequantize_k45_block(bs, ys, 48, True)
        store_row(ys, out, i)
