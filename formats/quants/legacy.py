"""The legacy 32-element block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Each quantizer is ggml's ``quantize_row_*_ref`` (ggml-quants.c) vectorized over all
blocks at once, byte for byte: every step is float32 arithmetic in C's order, C's
float -> int conversions truncate, ``roundf`` rounds half away from zero, and fp16 is
round-to-nearest-even (numpy's cast, like ``GGML_FP32_TO_FP16``).

No fused multiply-add emulation is needed: ggml-quants.c lives in libggml-base, which
llama.cpp builds without ``-march=native`` (only libggml-cpu gets the native flags), so
``x*id + 8.5f`` is a rounded product then a rounded sum, as in numpy. Checked on the
bundled build of llama-cpp-python 0.3.36 (no vfmadd in libggml-base.so) and by the
byte-identity tests in tests/test_quants.py. The dequantizers' ``q*d + m`` is exact in
the product either way (at most 5 x 11 significant bits).

Block layouts (little-endian, from ggml-common.h):

    Q8_0  d:f16 | qs:int8[32]                         34 bytes
    Q4_0  d:f16 | qs:u8[16]  (x[j] | x[j+16] << 4)    18 bytes
    Q4_1  d:f16 m:f16 | qs:u8[16]                     20 bytes
    Q5_0  d:f16 | qh:u32 (bit j = bit 4 of x[j]) | qs:u8[16]          22 bytes
    Q5_1  d:f16 m:f16 | qh:u32 | qs:u8[16]                            24 bytes
"""

from __future__ import annotations

import gguf
import numpy as np

from ggforge.formats.errors import QuantizationError
from ggforge.formats.quants.registry import QuantType, register

QK = 32
_F16 = np.dtype("<f2")
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)


# ---------------------------------------------------------------- shared steps

def _no_imatrix(name: str, imatrix) -> None:
    """ggml quantizes these types differently with an importance matrix (``*_impl``,
    which uses statistics of the whole row); only the reference path is implemented."""
    if imatrix is not None:
        raise QuantizationError(
            f"{name} with an importance matrix is not supported (ggml's imatrix variant "
            f"differs from the reference quantizer); quantize {name} without one or use a K-quant"
        )


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """(n,) float32 -> (n, 2) uint8, round to nearest even like GGML_FP32_TO_FP16."""
    return v.astype(_F16).view(np.uint8).reshape(-1, 2)


def _fp16_values(raw: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32."""
    return np.ascontiguousarray(raw).view(_F16).astype(np.float32)


def _inverse(d: np.ndarray) -> np.ndarray:
    """``id = d ? 1.0f/d : 0.0f`` per block; (n,) float32."""
    with np.errstate(divide="ignore"):
        return np.where(d != _ZERO, _ONE / d, _ZERO).astype(np.float32, copy=False)


def _signed_absmax(b: np.ndarray) -> np.ndarray:
    """The value with the largest |x| in each block, first one on ties, sign kept.

    Mirrors ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` from amax = max = 0:
    an all-zero block (even of -0.0) gives +0.0. (n, 32) -> (n,) float32.
    """
    absb = np.abs(b)
    idx = absb.argmax(axis=1)  # first occurrence, like the strict '<'
    rows = np.arange(b.shape[0])
    picked = b[rows, idx]
    return np.where(absb[rows, idx] > _ZERO, picked, _ZERO)


def _block_min(b: np.ndarray) -> np.ndarray:
    """``if (v < min) min = v`` from FLT_MAX: the first minimal element, so a zero
    minimum keeps the sign of the first zero (numpy's min may pick either). (n,)"""
    mn = b.min(axis=1)
    zero = np.flatnonzero(mn == _ZERO)
    if zero.size:
        mn[zero] = b[zero, b[zero].argmin(axis=1)]
    return mn


def _trunc_to_int(v: np.ndarray) -> np.ndarray:
    """C's float -> integer conversion (truncation toward zero), as int32."""
    with np.errstate(invalid="ignore"):
        return v.astype(np.int32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: round half away from zero (numpy's rint rounds half to even)."""
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= _HALF, t + np.sign(v), t)  # v - t is exact


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) ints -> (n, 16) uint8: low nibble x[j], high nibble x[j+16]."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 -> (n, 32) uint8 in element order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) ints -> (n, 4) uint8 = little-endian uint32 qh, bit j = bit 4 of x[j]."""
    bits = ((q >> 4) & 1).astype(np.uint8)
    return np.packbits(bits, axis=1, bitorder="little")


def _unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) uint8 -> (n, 32) uint8 holding 0x10 where bit j of qh is set."""
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


# ---------------------------------------------------------------- Q8_0

def quantize_q8_0(b: np.ndarray, *, imatrix=None) -> np.ndarray:
    """quantize_row_q8_0_ref. (n, 32) float32 -> (n, 34) uint8. ggml ignores imatrix."""
    amax = np.abs(b).max(axis=1)
    d = amax / np.float32(127)
    q = _roundf(b * _inverse(d)[:, None])  # |q| <= 127
    out = np.empty((b.shape[0], 34), dtype=np.uint8)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:] = q.astype(np.int8).view(np.uint8)
    return out


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """(n, 34) uint8 -> (n, 32) float32: qs * d."""
    d = _fp16_values(raw[:, :2])
    return raw[:, 2:].view(np.int8).astype(np.float32) * d


# ---------------------------------------------------------------- Q4_0 / Q5_0

def _quantize_symmetric(b: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared Q4_0/Q5_0 core: d = max / -2^(bits-1);
    xi = MIN(2^bits - 1, (int8_t)(x*id + 2^(bits-1) + 0.5f)). Returns d (n,), xi (n, 32)."""
    half = 1 << (bits - 1)
    d = _signed_absmax(b) / np.float32(-half)
    v = b * _inverse(d)[:, None] + np.float32(half + 0.5)
    return d, np.minimum(_trunc_to_int(v), (1 << bits) - 1)


def quantize_q4_0(b: np.ndarray, *, imatrix=None) -> np.ndarray:
    """quantize_row_q4_0_ref. (n, 32) float32 -> (n, 18) uint8."""
    _no_imatrix("Q4_0", imatrix)
    d, q = _quantize_symmetric(b, 4)
    out = np.empty((b.shape[0], 18), dtype=np.uint8)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:] = _pack_nibbles(q)
    return out


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """(n, 18) uint8 -> (n, 32) float32: (q - 8) * d."""
    d = _fp16_values(raw[:, :2])
    q = _unpack_nibbles(raw[:, 2:]).astype(np.int8) - np.int8(8)
    return q.astype(np.float32) * d


def quantize_q5_0(b: np.ndarray, *, imatrix=None) -> np.ndarray:
    """quantize_row_q5_0_ref. (n, 32) float32 -> (n, 22) uint8."""
    _no_imatrix("Q5_0", imatrix)
    d, q = _quantize_symmetric(b, 5)
    out = np.empty((b.shape[0], 22), dtype=np.uint8)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:6] = _pack_high_bits(q)
    out[:, 6:] = _pack_nibbles(q)
    return out


def dequantize_q5_0(raw: np.ndarray) -> np.ndarray:
    """(n, 22) uint8 -> (n, 32) float32: (q - 16) * d."""
    d = _fp16_values(raw[:, :2])
    q = _unpack_nibbles(raw[:, 6:]) | _unpack_high_bits(raw[:, 2:6])
    return (q.astype(np.int8) - np.int8(16)).astype(np.float32) * d


# ---------------------------------------------------------------- Q4_1 / Q5_1

def _quantize_affine(b: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared Q4_1/Q5_1 core: d = (max - min) / (2^bits - 1); xi = (int)((x - min)*id + 0.5f).
    Returns d (n,), min (n,), xi (n, 32) before any clamp."""
    mn = _block_min(b)
    # In C, max and min of an all-equal block come from the same element, so max - min
    # is +0.0; numpy's max may pick -0.0 against min's +0.0: "+ 0" turns -0.0 into +0.0.
    span = (b.max(axis=1) - mn) + _ZERO
    d = span / np.float32((1 << bits) - 1)
    v = (b - mn[:, None]) * _inverse(d)[:, None] + _HALF
    return d, mn, _trunc_to_int(v)


def quantize_q4_1(b: np.ndarray, *, imatrix=None) -> np.ndarray:
    """quantize_row_q4_1_ref. (n, 32) float32 -> (n, 20) uint8."""
    _no_imatrix("Q4_1", imatrix)
    d, mn, q = _quantize_affine(b, 4)
    out = np.empty((b.shape[0], 20), dtype=np.uint8)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:4] = _fp16_bytes(mn)
    out[:, 4:] = _pack_nibbles(np.minimum(q, 15))
    return out


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """(n, 20) uint8 -> (n, 32) float32: q * d + m (the product is exact, so a fused
    multiply-add in C gives the same float)."""
    d, m = _fp16_values(raw[:, :2]), _fp16_values(raw[:, 2:4])
    return _unpack_nibbles(raw[:, 4:]).astype(np.float32) * d + m


def quantize_q5_1(b: np.ndarray, *, imatrix=None) -> np.ndarray:
    """quantize_row_q5_1_ref. (n, 32) float32 -> (n, 24) uint8. ggml has no MIN clamp
    here: ``(uint8_t)(x0 + 0.5f)`` keeps the low 5 bits through the masks below."""
    _no_imatrix("Q5_1", imatrix)
    d, mn, q = _quantize_affine(b, 5)
    out = np.empty((b.shape[0], 24), dtype=np.uint8)
    out[:, :2] = _fp16_bytes(d)
    out[:, 2:4] = _fp16_bytes(mn)
    out[:, 4:8] = _pack_high_bits(q)
    out[:, 8:] = _pack_nibbles(q)
    return out


def dequantize_q5_1(raw: np.ndarray) -> np.ndarray:
    """(n, 24) uint8 -> (n, 32) float32: q * d + m."""
    d, m = _fp16_values(raw[:, :2]), _fp16_values(raw[:, 2:4])
    q = _unpack_nibbles(raw[:, 8:]) | _unpack_high_bits(raw[:, 4:8])
    return q.astype(np.float32) * d + m


_T = gguf.GGMLQuantizationType
Q8_0 = register(QuantType("Q8_0", _T.Q8_0, QK, 34, quantize_q8_0, dequantize_q8_0))
Q4_0 = register(QuantType("Q4_0", _T.Q4_0, QK, 18, quantize_q4_0, dequantize_q4_0))
Q4_1 = register(QuantType("Q4_1", _T.Q4_1, QK, 20, quantize_q4_1, dequantize_q4_1))
Q5_0 = register(QuantType("Q5_0", _T.Q5_0, QK, 22, quantize_q5_0, dequantize_q5_0))
Q5_1 = register(QuantType("Q5_1", _T.Q5_1, QK, 24, quantize_q5_1, dequantize_q5_1))
