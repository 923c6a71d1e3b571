"""Q4_0, Q4_1, Q5_0, Q5_1 with an importance matrix: ggml's ``quantize_row_q*_impl``.

With ``quant_weights`` ggml does not run the reference quantizers of legacy.py: per row
it takes ``sigma2 = sum(x^2) / n_per_row`` (float, summed in order over the whole row),
gives each value of a 32-block the weight ``qw[j] * sqrtf(sigma2 + x[j]^2)`` and picks
the block's scale by a weighted search:

    Q4_0 / Q5_0   make_qx_quants(32, 8 / 16, x, L, rmse_type 1, weight)     d
    Q4_1 / Q5_1   make_qkx3_quants(32, 15 / 31, x, weight, L, &min, Laux,
                                   -0.9f, 0.05f, 36, false)                   d, m = -min

then packs the levels exactly as the reference functions do (layouts: see legacy.py).
Ports under the rules of k_common's docstring; the searches are k_search's.

The row statistic is why these quantizers work on whole rows, not blocks: the registry
calls :func:`quantize_rows_imatrix` (``QuantType.quantize_rows_imatrix``) with the rows
and the importance vector. The kernels release the GIL and run on slices of the rows
from kquants' thread pool. Importing this module imports numba: legacy.py imports it on
the first call only.
"""

from __future__ import annotations

import numpy as np
from numba.core import types

from ggforge.formats.errors import QuantizationError
from ggforge.formats.quants.k_common import (
    F4A,
    I1A,
    U1A,
    F,
    b1,
    driver,
    f4,
    i8,
    jit,
    sig,
    store_fp16,
    store_row,
)
from ggforge.formats.quants.k_search import make_qkx_quants, make_qx_quants

QK = 32

# name -> (kernel, nmax, bytes per block)
_KINDS = {"Q4_0": ("symmetric", 8, 18), "Q5_0": ("symmetric", 16, 22),
          "Q4_1": ("affine", 15, 20), "Q5_1": ("affine", 31, 24)}


# ---------------------------------------------------------------- per-row steps

@jit
def _copy_row(a, i, dst):
    """dst[:] = a[i] without a view of ``a`` (see k_common.load_row); compiled for
    each array type, read-only ones (memory-mapped tensors) included."""
    for j in range(dst.shape[0]):
        dst[j] = a[i, j]


@sig(f4(F4A))
def _sigma2(x):
    """``sum_x2 / n_per_row``: x^2 summed one element at a time in float32."""
    s = F(0.0)
    for j in range(x.shape[0]):
        s += x[j] * x[j]
    return s / F(x.shape[0])


@sig(types.void(F4A, F4A, i8, f4, F4A))
def _block_weights(x, qw, start, sigma2, weight):
    """weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j]) for the block at x[start:start+32]."""
    for j in range(QK):
        xv = x[start + j]
        weight[j] = qw[start + j] * np.sqrt(sigma2 + xv * xv)


@sig([types.void(I1A, U1A, i8, b1), types.void(U1A, U1A, i8, b1)])
def _pack_levels(L, y, pos, five_bits):
    """Levels of one block into y[pos:]: with ``five_bits`` first qh (little-endian
    uint32, bit j = bit 4 of L[j]), then 16 bytes of nibbles L[j] | L[j+16] << 4."""
    if five_bits:
        qh = np.int64(0)
        for j in range(16):
            qh |= ((np.int64(L[j]) & 0x10) >> 4) << j
            qh |= ((np.int64(L[j + 16]) & 0x10) >> 4) << (j + 16)
        for k in range(4):
            y[pos + k] = (qh >> (8 * k)) & 0xFF
        pos += 4
    for j in range(16):
        y[pos + j] = ((np.int64(L[j]) & 0x0F) | ((np.int64(L[j + 16]) & 0x0F) << 4)) & 0xFF


# ---------------------------------------------------------------- drivers

@driver
def quantize_rows_symmetric(x, qw, nmax, out):
    """Q4_0 (nmax 8) / Q5_0 (nmax 16). x (n_rows, n_per_row) float32; qw (1 or n_rows,
    n_per_row) float32, one row shared by all rows or one per row; out (n_rows, row_bytes)."""
    n = x.shape[1]
    five_bits = nmax == 16
    ts = 22 if five_bits else 18
    xs = np.empty(n, np.float32)
    ws = np.empty(n, np.float32)
    ys = np.empty(out.shape[1], np.uint8)
    weight = np.empty(QK, np.float32)
    L = np.empty(QK, np.int8)
    shared = qw.shape[0] == 1
    if shared:
        _copy_row(qw, 0, ws)
    for r in range(x.shape[0]):
        _copy_row(x, r, xs)
        if not shared:
            _copy_row(qw, r, ws)
        sigma2 = _sigma2(xs)
        for ib in range(n // QK):
            _block_weights(xs, ws, QK * ib, sigma2, weight)
            d = make_qx_quants(QK, nmax, xs[QK * ib:QK * ib + QK], L, weight, True)
            store_fp16(ys, ts * ib, d)
            _pack_levels(L, ys, ts * ib + 2, five_bits)
        store_row(ys, out, r)


@driver
def quantize_rows_affine(x, qw, nmax, out):
    """Q4_1 (nmax 15) / Q5_1 (nmax 31); arguments as quantize_rows_symmetric."""
    n = x.shape[1]
    five_bits = nmax == 31
    ts = 24 if five_bits else 20
    xs = np.empty(n, np.float32)
    ws = np.empty(n, np.float32)
    ys = np.empty(out.shape[1], np.uint8)
    weight = np.empty(QK, np.float32)
    L = np.empty(QK, np.uint8)
    Laux = np.empty(QK, np.uint8)
    shared = qw.shape[0] == 1
    if shared:
        _copy_row(qw, 0, ws)
    for r in range(x.shape[0]):
        _copy_row(x, r, xs)
        if not shared:
            _copy_row(qw, r, ws)
        sigma2 = _sigma2(xs)
        for ib in range(n // QK):
            _block_weights(xs, ws, QK * ib, sigma2, weight)
            d, the_min = make_qkx_quants(QK, nmax, xs[QK * ib:QK * ib + QK], weight, L, Laux,
                                         F(-0.9), F(0.05), 36, False)
            store_fp16(ys, ts * ib, d)
            store_fp16(ys, ts * ib + 2, -the_min)
            _pack_levels(L, ys, ts * ib + 4, five_bits)
        store_row(ys, out, r)


# ---------------------------------------------------------------- entry point

def quantize_rows_imatrix(name: str, rows: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """ggml's ``quantize_<name>`` with quant_weights, for Q4_0, Q4_1, Q5_0 or Q5_1.

    ``rows`` float32 (n_rows, n_per_row), n_per_row a multiple of 32; ``imatrix`` float32
    (n_per_row,), (1, n_per_row) or (n_rows, n_per_row): per-column importance, shared by
    all rows or one vector per row. Returns uint8 (n_rows, row_bytes).
    """
    from ggforge.formats.quants.kquants import run_sliced

    kind, nmax, type_size = _KINDS[name]
    x = np.ascontiguousarray(rows, dtype=np.float32)  # read-only (a memory map) is fine
    n_rows, n = x.shape
    if n == 0:
        return np.empty((n_rows, 0), dtype=np.uint8)
    qw = np.ascontiguousarray(imatrix, dtype=np.float32)
    qw = qw.reshape(-1, n) if qw.size in (n, n_rows * n) else qw
    if n % QK or qw.ndim != 2 or qw.shape[1] != n or qw.shape[0] not in (1, n_rows):
        raise QuantizationError(
            f"{name}: rows {x.shape} and importance matrix {np.shape(imatrix)} do not fit; "
            f"need rows of a multiple of {QK} values and one weight per column"
        )
    out = np.empty((n_rows, n // QK * type_size), dtype=np.uint8)  # (n_rows, row_bytes)
    if n_rows:
        kernel = quantize_rows_symmetric if kind == "symmetric" else quantize_rows_affine
        # A shared (1, n) qw goes whole to every slice (run_sliced slices n_rows-long arrays).
        run_sliced(kernel, n_rows, x, qw, nmax, out, min_items=max(1, 2048 // max(n // QK, 1)))
    return out
