"""Unquantized float types: F32, F16, BF16 (block size 1), stored little-endian.

F16 uses numpy's float32 <-> float16 casts, which round to nearest even like ggml's
``GGML_FP32_TO_FP16``; only NaNs are patched to ggml's bits (fp32 -> fp16 writes the
canonical quiet NaN 0x7e00 with the sign; fp16 -> fp32 sets the quiet bit, where numpy
keeps a signaling NaN signaling).
BF16 follows ggml's ``ggml_compute_fp32_to_bf16`` bit for bit (round to nearest even,
NaN forced quiet); see :func:`float32_to_bf16`.
"""

from __future__ import annotations

import gguf
import numpy as np

from ggforge.formats.quants.registry import QuantType, register

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 bit patterns (uint16), exactly as ggml does.

    NaN -> ``(bits >> 16) | 64`` (quiet NaN keeping sign and high payload); everything
    else -> ``(bits + 0x7fff + ((bits >> 16) & 1)) >> 16``, i.e. round to nearest even,
    overflowing to Inf.
    """
    bits = np.ascontiguousarray(x, dtype=_F32).view(_U32)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    # No wrap for non-NaN values: the largest, -Inf (0xff800000), plus 0x8000 fits in 32 bits.
    rounded = (bits + (np.uint32(0x7FFF) + lsb)) >> np.uint32(16)
    quiet = (bits >> np.uint32(16)) | np.uint32(64)
    return np.where(nan, quiet, rounded).astype(_U16)


def bf16_to_float32(u16: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 (exact)."""
    bits = np.ascontiguousarray(u16).view(_U16).astype(_U32) << np.uint32(16)
    return bits.view(_F32).astype(np.float32, copy=False)


def _as_bytes(values: np.ndarray, itemsize: int) -> np.ndarray:
    """(n, 1) array of a little-endian dtype -> (n, itemsize) uint8."""
    return np.ascontiguousarray(values).view(np.uint8).reshape(-1, itemsize)


def _quantize_f32(blocks: np.ndarray, *, imatrix=None) -> np.ndarray:
    return _as_bytes(blocks.astype(_F32, copy=False), 4)  # (n, 4)


def _dequantize_f32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(_F32).astype(np.float32).reshape(-1, 1)


def float32_to_f16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half bit patterns (uint16), exactly as GGML_FP32_TO_FP16."""
    x = np.ascontiguousarray(x, dtype=_F32)
    bits = x.astype(_F16).view(_U16)
    nan = np.isnan(x)
    if nan.any():
        sign = (x.view(_U32)[nan] >> np.uint32(16)) & np.uint32(0x8000)
        bits[nan] = sign.astype(_U16) | np.uint16(0x7E00)
    return bits


def f16_bits_to_float32(h: np.ndarray) -> np.ndarray:
    """IEEE half bit patterns (uint16) -> float32, exactly as GGML_FP16_TO_FP32."""
    y = np.ascontiguousarray(h).view(_F16).astype(np.float32)
    nan = np.isnan(y)
    if nan.any():
        y.view(np.uint32)[nan] |= np.uint32(0x00400000)
    return y


def _quantize_f16(blocks: np.ndarray, *, imatrix=None) -> np.ndarray:
    return _as_bytes(float32_to_f16_bits(blocks), 2)  # (n, 2)


def _dequantize_f16(raw: np.ndarray) -> np.ndarray:
    return f16_bits_to_float32(np.ascontiguousarray(raw).view(_U16)).reshape(-1, 1)


def _quantize_bf16(blocks: np.ndarray, *, imatrix=None) -> np.ndarray:
    return _as_bytes(float32_to_bf16(blocks), 2)  # (n, 2)


def _dequantize_bf16(raw: np.ndarray) -> np.ndarray:
    return bf16_to_float32(np.ascontiguousarray(raw).view(_U16)).reshape(-1, 1)


_T = gguf.GGMLQuantizationType
F32 = register(QuantType("F32", _T.F32, 1, 4, _quantize_f32, _dequantize_f32))
F16 = register(QuantType("F16", _T.F16, 1, 2, _quantize_f16, _dequantize_f16))
BF16 = register(QuantType("BF16", _T.BF16, 1, 2, _quantize_bf16, _dequantize_bf16))
