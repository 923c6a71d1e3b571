"""The K-quants (Q2_K .. Q6_K) and the non-linear 4-bit types (IQ4_NL, IQ4_XS).

Importing this module registers the seven types. Each quantizer is byte-identical to
what libggml's ``ggml_quantize_chunk`` writes, both without an importance matrix (ggml's
``quantize_row_*_ref`` for the K-quants) and with one (``quantize_row_*_impl``); the
numba kernels live in k_q2_q3, k_q4_q5 (k_q4_q5_lanes for quantizing), k_q6 and iq4,
their shared steps in k_common, k_search and k_lanes.

The kernel modules are imported on the first (de)quantize call, not here: importing
numba and loading the compiled kernels from its cache takes about a second, which
``ggforge inspect`` and friends should not pay.

An importance matrix reaches ``quantize_blocks`` as float32 ``(n_blocks, block_size)``:
the importance of each block's columns (see registry.quantize). That is all ggml's
``_impl`` functions read, since they work one 256-value super-block at a time (IQ4_NL:
one 32-value block), so any split of the rows into block chunks gives the same bytes.

The kernels release the GIL; a call is cut into one contiguous slice of blocks per core
and the slices run on a shared thread pool (see k_common.driver for why not prange).
"""

from __future__ import annotations

import importlib
from typing import Callable

import gguf
import numpy as np

from ggforge.formats.errors import QuantizationError
from ggforge.formats.quants.registry import QuantType, register
from ggforge.formats.workers import executor, get_threads

# Below this many blocks per slice a thread costs more than it saves.
_MIN_BLOCKS_PER_THREAD = 64


def _kernel(module: str, name: str) -> Callable:
    """The numba kernel ``name`` of ``ggforge.formats.quants.<module>`` (imported once)."""
    return getattr(importlib.import_module(f"ggforge.formats.quants.{module}"), name)


def run_sliced(kernel: Callable, n_items: int, *arrays,
               min_items: int = _MIN_BLOCKS_PER_THREAD) -> None:
    """``kernel(*arrays)`` over slices of the leading axis (blocks or rows) on all cores.

    Array arguments whose leading dimension is ``n_items`` are cut into one contiguous
    slice per thread (each slice at least ``min_items`` long); other arguments, arrays
    of another length included, go to every slice unchanged.
    """
    parts = min(get_threads(), n_items // max(1, min_items))
    if parts <= 1:
        kernel(*arrays)
        return
    bounds = [n_items * k // parts for k in range(parts + 1)]
    futures = [
        executor().submit(kernel, *(a[lo:hi] if isinstance(a, np.ndarray) and a.shape[:1] == (n_items,)
                               else a for a in arrays))
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    for f in futures:
        f.result()  # re-raises a kernel's exception here


def _writable(a: np.ndarray) -> np.ndarray:
    """``a``, or a copy of it when read-only (a memory-mapped file, a broadcast): the
    kernels' row helpers (k_common.load_row) are compiled for writable arrays only.
    The registry hands over chunks of about a million values, so the copy stays small."""
    return a if a.flags.writeable else a.copy()


def _block_quantizer(name: str, module: str, kernel: str, block_size: int, type_size: int):
    """A registry quantize_blocks around the kernel ``kernel(x, qw, has_qw, out)``."""

    def quantize_blocks(blocks: np.ndarray, *, imatrix=None) -> np.ndarray:
        x = _writable(np.ascontiguousarray(blocks, dtype=np.float32).reshape(-1, block_size))
        if imatrix is None:
            qw = x  # never read: the kernel takes the no-imatrix path
        else:
            qw = _writable(np.ascontiguousarray(imatrix, dtype=np.float32))
            if qw.shape != x.shape:
                raise QuantizationError(
                    f"{name}: importance matrix blocks have shape {qw.shape}, expected "
                    f"{x.shape} (one weight per quantized value); pass one weight per column"
                )
        out = np.empty((x.shape[0], type_size), dtype=np.uint8)  # (n_blocks, type_size)
        if x.shape[0]:
            run_sliced(_kernel(module, kernel), x.shape[0], x, qw, imatrix is not None, out)
        return out

    quantize_blocks.__name__ = f"quantize_{name.lower()}"
    quantize_blocks.__doc__ = f"(n, {block_size}) float32 -> (n, {type_size}) uint8, as ggml's {name}."
    return quantize_blocks


def _block_dequantizer(name: str, module: str, kernel: str, block_size: int, type_size: int):
    """A registry dequantize_blocks around the kernel ``kernel(raw, out)``."""

    def dequantize_blocks(raw: np.ndarray) -> np.ndarray:
        b = _writable(np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, type_size))
        out = np.empty((b.shape[0], block_size), dtype=np.float32)  # (n_blocks, block_size)
        if b.shape[0]:
            run_sliced(_kernel(module, kernel), b.shape[0], b, out)
        return out

    dequantize_blocks.__name__ = f"dequantize_{name.lower()}"
    dequantize_blocks.__doc__ = f"(n, {type_size}) uint8 -> (n, {block_size}) float32, as ggml's {name}."
    return dequantize_blocks


_T = gguf.GGMLQuantizationType

# name, ggml type, block size, bytes per block (ggml-common.h), quantizer module,
# dequantizer module; the kernels are quantize_<name> and dequantize_<name>, lower case.
# Q4_K / Q5_K quantize in k_q4_q5_lanes (ggml's bytes, searches in SIMD
# lanes, about 3.5x faster).
_TABLE = [
    ("Q2_K", _T.Q2_K, 256, 84, "k_q2_q3", "k_q2_q3"),
    ("Q3_K", _T.Q3_K, 256, 110, "k_q2_q3", "k_q2_q3"),
    ("Q4_K", _T.Q4_K, 256, 144, "k_q4_q5_lanes", "k_q4_q5"),
    ("Q5_K", _T.Q5_K, 256, 176, "k_q4_q5_lanes", "k_q4_q5"),
    ("Q6_K", _T.Q6_K, 256, 210, "k_q6", "k_q6"),
    ("IQ4_NL", _T.IQ4_NL, 32, 18, "iq4", "iq4"),
    ("IQ4_XS", _T.IQ4_XS, 256, 136, "iq4", "iq4"),
]

KQUANT_TYPES: dict[str, QuantType] = {
    name: register(QuantType(
        name, ggml_type, bs, ts,
        _block_quantizer(name, qmodule, f"quantize_{name.lower()}", bs, ts),
        _block_dequantizer(name, dmodule, f"dequantize_{name.lower()}", bs, ts),
    ))
    for name, ggml_type, bs, ts, qmodule, dmodule in _TABLE
}
