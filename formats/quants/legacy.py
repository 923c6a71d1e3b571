"""The legacy 32-element block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Each quantizer is ggml's ``quantize_row_*_ref`` (ggml-quants.c) byte for byte: numba
kernels in legacy_kernels (float32 arithmetic in C's order, C's float -> int conversions
truncate, ``roundf`` rounds half away from zero, fp16 rounds to nearest even), which
release the GIL and run on slices of the blocks from kquants' thread pool: 5-10x the
numpy versions they replaced (legacy_kernels' docstring has the table). With an
importance matrix ggml runs other quantizers, which need whole rows: legacy_imatrix,
reached through ``QuantType.quantize_rows_imatrix`` (Q8_0 ignores the matrix, as ggml).
The dequantizers are vectorized numpy, here.

No fused multiply-add emulation is needed: ggml-quants.c lives in libggml-base, which
llama.cpp builds without ``-march=native`` (only libggml-cpu gets the native flags), so
``x*id + 8.5f`` is a rounded product then a rounded sum, as in numba without fastmath.
Checked on the bundled build of llama-cpp-python 0.3.36 (no vfmadd in libggml-base.so)
and by the byte-identity tests in tests/test_quants.py. The dequantizers' ``q*d + m``
is exact in the product either way (at most 5 x 11 significant bits).

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
# Below this many blocks per thread slice a thread costs more than it saves (these
# kernels do about 50 ns of work per block).
_MIN_BLOCKS_PER_THREAD = 4096


# ---------------------------------------------------------------- quantizers

def _no_imatrix(name: str, imatrix) -> None:
    """ggml quantizes these types differently with an importance matrix (``*_impl``,
    which uses a statistic of the whole row): that path is the type's
    ``quantize_rows_imatrix`` (legacy_imatrix), which registry.quantize calls; blocks
    alone cannot give ggml's bytes."""
    if imatrix is not None:
        raise QuantizationError(
            f"{name} with an importance matrix needs whole rows (ggml weighs each value by "
            f"a statistic of its row): call registry.quantize, not {name}'s quantize_blocks"
        )


def _block_quantizer(name: str, kernel: str, type_size: int, *extra):
    """A registry quantize_blocks around legacy_kernels' ``kernel(x, out, *extra)``,
    run on slices of the blocks from kquants' thread pool. (numba and the kernels are
    imported on the first call: about a second that ``ggforge inspect`` should not pay.)"""

    def quantize_blocks(blocks: np.ndarray, *, imatrix=None) -> np.ndarray:
        if name != "Q8_0":  # ggml's quantize_q8_0 ignores quant_weights
            _no_imatrix(name, imatrix)
        from ggforge.formats.quants import legacy_kernels
        from ggforge.formats.quants.kquants import run_sliced

        x = np.ascontiguousarray(blocks, dtype=np.float32).reshape(-1, QK)
        out = np.empty((x.shape[0], type_size), dtype=np.uint8)  # (n_blocks, type_size)
        if x.shape[0]:
            run_sliced(getattr(legacy_kernels, kernel), x.shape[0], x, out, *extra,
                       min_items=_MIN_BLOCKS_PER_THREAD)
        return out

    quantize_blocks.__name__ = f"quantize_{name.lower()}"
    quantize_blocks.__doc__ = (f"quantize_row_{name.lower()}_ref. (n, 32) float32 -> "
                               f"(n, {type_size}) uint8.")
    return quantize_blocks


quantize_q8_0 = _block_quantizer("Q8_0", "quantize_q8_0", 34)
quantize_q4_0 = _block_quantizer("Q4_0", "quantize_symmetric", 18, 4)
quantize_q5_0 = _block_quantizer("Q5_0", "quantize_symmetric", 22, 5)
quantize_q4_1 = _block_quantizer("Q4_1", "quantize_affine", 20, 4)
quantize_q5_1 = _block_quantizer("Q5_1", "quantize_affine", 24, 5)


# ---------------------------------------------------------------- dequantizers

def _fp16_values(raw: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32."""
    return np.ascontiguousarray(raw).view(_F16).astype(np.float32)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 -> (n, 32) uint8 in element order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) uint8 -> (n, 32) uint8 holding 0x10 where bit j of qh is set."""
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """(n, 34) uint8 -> (n, 32) float32: qs * d."""
    d = _fp16_values(raw[:, :2])
    return raw[:, 2:].view(np.int8).astype(np.float32) * d


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """(n, 18) uint8 -> (n, 32) float32: (q - 8) * d."""
    d = _fp16_values(raw[:, :2])
    q = _unpack_nibbles(raw[:, 2:]).astype(np.int8) - np.int8(8)
    return q.astype(np.float32) * d


def dequantize_q5_0(raw: np.ndarray) -> np.ndarray:
    """(n, 22) uint8 -> (n, 32) float32: (q - 16) * d."""
    d = _fp16_values(raw[:, :2])
    q = _unpack_nibbles(raw[:, 6:]) | _unpack_high_bits(raw[:, 2:6])
    return (q.astype(np.int8) - np.int8(16)).astype(np.float32) * d


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """(n, 20) uint8 -> (n, 32) float32: q * d + m (the product is exact, so a fused
    multiply-add in C gives the same float)."""
    d, m = _fp16_values(raw[:, :2]), _fp16_values(raw[:, 2:4])
    return _unpack_nibbles(raw[:, 4:]).astype(np.float32) * d + m


def dequantize_q5_1(raw: np.ndarray) -> np.ndarray:
    """(n, 24) uint8 -> (n, 32) float32: q * d + m."""
    d, m = _fp16_values(raw[:, :2]), _fp16_values(raw[:, 2:4])
    q = _unpack_nibbles(raw[:, 8:]) | _unpack_high_bits(raw[:, 4:8])
    return q.astype(np.float32) * d + m


# ---------------------------------------------------------------- registration

def _rows_imatrix(name: str):
    """The type's ``quantize_rows_imatrix``: legacy_imatrix's numba kernels, imported on
    the first call (numba costs about a second to import)."""

    def quantize_rows_imatrix(rows: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
        from ggforge.formats.quants.legacy_imatrix import quantize_rows_imatrix as impl

        return impl(name, rows, imatrix)

    quantize_rows_imatrix.__name__ = f"quantize_{name.lower()}_imatrix"
    quantize_rows_imatrix.__doc__ = f"ggml's quantize_row_{name.lower()}_impl over rows."
    return quantize_rows_imatrix


_T = gguf.GGMLQuantizationType
Q8_0 = register(QuantType("Q8_0", _T.Q8_0, QK, 34, quantize_q8_0, dequantize_q8_0))
Q4_0 = register(QuantType("Q4_0", _T.Q4_0, QK, 18, quantize_q4_0, dequantize_q4_0,
                          _rows_imatrix("Q4_0")))
Q4_1 = register(QuantType("Q4_1", _T.Q4_1, QK, 20, quantize_q4_1, dequantize_q4_1,
                          _rows_imatrix("Q4_1")))
Q5_0 = register(QuantType("Q5_0", _T.Q5_0, QK, 22, quantize_q5_0, dequantize_q5_0,
                          _rows_imatrix("Q5_0")))
Q5_1 = register(QuantType("Q5_1", _T.Q5_1, QK, 24, quantize_q5_1, dequantize_q5_1,
                          _rows_imatrix("Q5_1")))
