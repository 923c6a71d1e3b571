"""The block quantization type registry and the two whole-tensor entry points.

A quantization type is data (:class:`QuantType`): its ggml id, block geometry and two
vectorized block functions. Type modules (``floats``, ``legacy``, later K-quants) build
their ``QuantType`` and call :func:`register`; everything else looks types up with
:func:`get_type`, never with an if-chain on names.

Shapes are in numpy order throughout: the last dimension is the row (ggml's ``ne[0]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np

from ggforge.formats.errors import QuantizationError

# Elements handled per call of a block function: bounds the temporaries of one call to a
# few MiB (cache friendly, and a 262144 x 640 embedding does not need 5x its size).
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class QuantType:
    """One ggml tensor type: block geometry plus vectorized (de)quantizers.

    ``quantize_blocks(blocks, *, imatrix=None)`` maps float32 ``(n_blocks, block_size)``
    to uint8 ``(n_blocks, type_size)``; ``imatrix``, when given, is float32
    ``(n_blocks, block_size)`` (the per-column importance of each block's columns).
    ``dequantize_blocks(raw)`` maps uint8 ``(n_blocks, type_size)`` to float32
    ``(n_blocks, block_size)``. Both are byte-for-byte ggml's reference code.

    ``quantize_rows_imatrix(rows, imatrix)``, where set, is the type's quantizer with an
    importance matrix when ggml's needs whole rows (the legacy Q4_0..Q5_1 weigh values by
    a statistic of the row): float32 ``rows`` ``(n_rows, n_per_row)`` and ``imatrix``
    ``(1, n_per_row)`` (shared by all rows) or ``(n_rows, n_per_row)`` to uint8
    ``(n_rows, row_bytes)``. :func:`quantize` prefers it to ``quantize_blocks`` whenever
    an importance matrix is given.
    """

    name: str
    ggml_type: gguf.GGMLQuantizationType
    block_size: int
    type_size: int
    quantize_blocks: Callable[..., np.ndarray]
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]
    quantize_rows_imatrix: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    def row_bytes(self, n_per_row: int) -> int:
        """Bytes of one row of ``n_per_row`` elements (a multiple of ``block_size``)."""
        n_per_row = int(n_per_row)
        if n_per_row < 0 or n_per_row % self.block_size:
            raise QuantizationError(
                f"{self.name} needs rows that are a multiple of {self.block_size} elements, "
                f"got {n_per_row}; pick another type for this tensor (e.g. F16)"
            )
        return n_per_row // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a whole tensor of ``shape`` (numpy order, last dim is the row)."""
        shape = tuple(int(s) for s in shape)
        if not shape:
            shape = (1,)
        return math.prod(shape[:-1]) * self.row_bytes(shape[-1])


TYPES: dict[str, QuantType] = {}
_BY_ID: dict[int, QuantType] = {}


def register(qtype: QuantType) -> QuantType:
    """Add ``qtype`` to the registry; its sizes must agree with gguf-py's table."""
    expected = gguf.GGML_QUANT_SIZES[qtype.ggml_type]
    if (qtype.block_size, qtype.type_size) != tuple(expected):
        raise AssertionError(f"{qtype.name}: sizes {qtype.block_size, qtype.type_size} != gguf {expected}")
    TYPES[qtype.name] = qtype
    _BY_ID[int(qtype.ggml_type)] = qtype
    return qtype


def get_type(name_or_id: str | int | gguf.GGMLQuantizationType | QuantType) -> QuantType:
    """Look a type up by case-insensitive name (``"q8_0"``), ggml id or enum member."""
    if isinstance(name_or_id, QuantType):
        return name_or_id
    if isinstance(name_or_id, str):
        found = TYPES.get(name_or_id.strip().upper())
        label = repr(name_or_id)
    elif isinstance(name_or_id, (int, np.integer)):
        found = _BY_ID.get(int(name_or_id))
        try:
            label = f"{gguf.GGMLQuantizationType(int(name_or_id)).name} (id {int(name_or_id)})"
        except ValueError:
            label = f"id {int(name_or_id)}"
    else:
        raise QuantizationError(f"quantization type must be a name or ggml id, got {name_or_id!r}")
    if found is None:
        raise QuantizationError(
            f"unsupported quantization type {label}; supported: {', '.join(TYPES)}"
        )
    return found


def _check_finite(x: np.ndarray, name: str) -> None:
    """Raise naming the tensor and the first NaN/Inf element (C order)."""
    finite = np.isfinite(x)
    if finite.all():
        return
    flat = int(np.argmin(finite.reshape(-1)))
    index = tuple(int(i) for i in np.unravel_index(flat, x.shape))
    raise QuantizationError(
        f"tensor {name!r} has a non-finite value ({x.reshape(-1)[flat]}) at index {index}; "
        "fix or drop the checkpoint's bad weights before quantizing"
    )


def _imatrix_full(imatrix, shape: tuple[int, ...], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Check an importance array (..., n_per_row) against the tensor's ``shape``.

    Returns it as float32 and its (read-only) broadcast to ``shape``."""
    w = np.asarray(imatrix, dtype=np.float32)
    try:
        if w.ndim == 0 or w.shape[-1] != shape[-1]:
            raise ValueError
        return w, np.broadcast_to(w, shape)
    except ValueError:
        raise QuantizationError(
            f"importance matrix for tensor {name!r} has shape {w.shape}, which does not fit "
            f"the tensor's shape {shape} (need (..., {shape[-1]}))"
        ) from None


def _imatrix_blocks(imatrix, shape: tuple[int, ...], block_size: int, name: str) -> np.ndarray:
    """Broadcast an importance vector (..., n_per_row) to the tensor, as blocks."""
    _, full = _imatrix_full(imatrix, shape, name)
    return np.ascontiguousarray(full).reshape(-1, block_size)


def _imatrix_rows(imatrix, shape: tuple[int, ...], name: str) -> np.ndarray:
    """An importance vector as rows: (1, n_per_row) when every row shares it (the
    usual case, a single vector), else one row per tensor row."""
    w, full = _imatrix_full(imatrix, shape, name)
    if w.size == shape[-1]:
        return w.reshape(1, shape[-1])
    return np.ascontiguousarray(full).reshape(math.prod(shape[:-1]), shape[-1])


def quantize(data: np.ndarray, qtype, *, name: str = "tensor", imatrix=None) -> np.ndarray:
    """Quantize a float tensor row by row (last dim is the row), as ggml does.

    Returns uint8 of shape ``(*data.shape[:-1], row_bytes)``. The data goes through
    float32 first, as ggml's ``float *`` input does. Raises :class:`QuantizationError`
    naming ``name`` on NaN/Inf, a row length that is not a multiple of the block size,
    or a non-float input.

    ``imatrix``: the importance of each column, float ``(..., n_per_row)`` broadcast over
    the rows (llama-quantize's ``--imatrix``: one ``(n_per_row,)`` vector per tensor).
    Types whose ggml quantizer ignores it (F32, F16, BF16, Q8_0) ignore it here too.
    """
    qt = get_type(qtype)
    arr = np.asarray(data)
    if arr.dtype.kind != "f":
        raise QuantizationError(f"tensor {name!r} has dtype {arr.dtype}; quantize needs floats")
    if arr.ndim == 0:
        arr = arr.reshape(1)
    shape = arr.shape
    if shape[-1] % qt.block_size:
        raise QuantizationError(
            f"tensor {name!r} of shape {shape}: row length {shape[-1]} is not a multiple of "
            f"{qt.name}'s block size {qt.block_size}; keep this tensor in F16/F32 or pick "
            "a type with a smaller block"
        )
    x = np.ascontiguousarray(arr, dtype=np.float32)
    _check_finite(x, name)
    if imatrix is not None and qt.quantize_rows_imatrix is not None:
        rows = x.reshape(math.prod(shape[:-1]), shape[-1])  # (n_rows, n_per_row)
        with np.errstate(over="ignore", invalid="ignore"):
            out = qt.quantize_rows_imatrix(rows, _imatrix_rows(imatrix, shape, name))
        return out.reshape(*shape[:-1], qt.row_bytes(shape[-1]))
    blocks = x.reshape(-1, qt.block_size)  # (n_blocks, block_size)
    weights = None if imatrix is None else _imatrix_blocks(imatrix, shape, qt.block_size, name)
    out = np.empty((blocks.shape[0], qt.type_size), dtype=np.uint8)  # (n_blocks, type_size)
    step = max(1, _CHUNK_ELEMENTS // qt.block_size)
    # Scales beyond fp16's range become Inf as in ggml (values near 1e30); no warnings.
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, blocks.shape[0], step):
            stop = start + step
            kw = {} if weights is None else {"imatrix": weights[start:stop]}
            out[start:stop] = qt.quantize_blocks(blocks[start:stop], **kw)
    return out.reshape(*shape[:-1], qt.row_bytes(shape[-1]))


def dequantize(raw: np.ndarray, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a tensor's bytes back to float32 of ``shape`` (numpy order)."""
    qt = get_type(qtype)
    shape = tuple(int(s) for s in shape)
    buf = np.asarray(raw)
    if buf.dtype != np.uint8:
        buf = np.ascontiguousarray(buf).view(np.uint8)
    expected = qt.nbytes(shape)
    if buf.size != expected:
        raise QuantizationError(
            f"{qt.name} tensor of shape {shape} needs {expected} bytes, got {buf.size}; "
            "check the tensor's type and shape"
        )
    blocks = np.ascontiguousarray(buf).reshape(-1, qt.type_size)  # (n_blocks, type_size)
    out = np.empty((blocks.shape[0], qt.block_size), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // qt.block_size)
    with np.errstate(over="ignore", invalid="ignore"):  # Inf/NaN scales decode as in ggml
        for start in range(0, blocks.shape[0], step):
            out[start:start + step] = qt.dequantize_blocks(blocks[start:start + step])
    return out.reshape(shape)
