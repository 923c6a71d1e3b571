"""CPU kernels that compute straight from ggml-quantized weight bytes.

    from ggforge.runtime.kernels import QWeight, matmul, get_rows, set_threads
    w = QWeight.from_gguf(g, "blk.0.attn_q.weight")   # a view into the mapped file, no copy
    y = matmul(x, w)                                   # (n_tokens, n_in) -> (n_tokens, n_out)
    e = get_rows(tok_embd, token_ids)                  # (len(ids), n_embd) float32

``matmul`` computes ``x @ W.T`` as llama.cpp's CPU backend does: each activation row is
first quantized to the weight type's ``vec_dot_type`` (Q8_0 for Q8_0/Q4_0/Q5_0/IQ4_NL,
Q8_1 for Q4_1/Q5_1, Q8_K for the K-quants and IQ4_XS, rounded to F16/BF16 for F16/BF16
weights, unchanged for F32), then each block contributes an exact integer dot product
scaled by the two blocks' scales. One token (decode) streams the weight bytes once per
call; many tokens (prefill) reuse each unpacked weight block for several tokens. Both run
over output rows on :func:`set_threads` threads.

The most common types are read eight rows at a time from a copy whose groups of eight
rows are interleaved block by block (``QWeight.packed``, made on first use): memory then
streams them at full speed. That copy replaces the mapped bytes in the computation (the
mapping is read once, to pack), so the weights are in memory once, still quantized.

Kernels are compiled by numba on first use per weight type and cached on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType

from ggforge.formats.errors import FormatError, UnsupportedModelError
from ggforge.runtime.kernels.dispatch import (ROUTES, Route, get_rows_packed, get_rows_raw, matmul_raw,
                                              pack, route)
from ggforge.runtime.kernels.threads import get_threads, set_threads

__all__ = ["QWeight", "matmul", "get_rows", "set_threads", "get_threads", "vec_dot_type",
           "ROUTES", "Route"]


@dataclass(frozen=True)
class QWeight:
    """A 2-D weight in its ggml encoding: ``n_out`` rows of ``n_in`` elements.

    ``raw`` is uint8 (n_out, row_bytes), normally a read-only view into the GGUF mapping.
    """

    raw: np.ndarray
    ggml_type: int
    n_in: int
    n_out: int
    mapped: bool = False   # raw lies in a read-only file mapping (from_gguf)
    _packed: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self):
        route(self.ggml_type)
        f = route(self.ggml_type).facts
        block, size = f.qk, f.block_bytes
        if self.n_in % block:
            raise UnsupportedModelError(
                f"{f.name} weight rows of {self.n_in} "
                f"elements are not whole blocks of {block}")
        shape = (self.n_out, self.n_in // block * size)
        if self.raw.dtype != np.uint8 or self.raw.shape != shape or not self.raw.flags.c_contiguous:
            raise ValueError(f"QWeight.raw must be C-contiguous uint8 {shape}, "
                             f"got {self.raw.dtype} {self.raw.shape}")

    @classmethod
    def from_gguf(cls, g, name: str) -> QWeight:
        """The tensor ``name`` of an open GGUFFile, as a view of its bytes (no copy).

        A tensor of more than two dimensions is taken as ne[1]*ne[2]*... rows.
        """
        info = g.tensors.get(name)
        if info is None:
            raise FormatError(f"{g.path}: tensor {name!r} is missing")
        n_in = int(info.dims[0])
        n_out = int(np.prod(info.dims[1:], dtype=np.int64)) if len(info.dims) > 1 else 1
        try:
            route(info.ggml_type)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{g.path}: tensor {name!r}: {e}") from None
        raw = g.raw(name).reshape(n_out, -1)
        return cls(raw, int(info.ggml_type), n_in, n_out, mapped=True)

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(int(self.ggml_type)).name

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def packed(self) -> np.ndarray | None:
        """The rows as the row-group kernels read them (dispatch.pack, an anonymous copy
        made on first use), or None for a type whose kernels read ``raw`` in place.

        The copy replaces the mapped pages: they are dropped a few MiB at a time as they
        are copied, so resident memory never holds both in full (an embedding lookup in a
        tied table then reads the copy too: see get_rows)."""
        if not self._packed:
            done = (lambda r0, r1: _drop_rows(self.raw, r0, r1)) if self.mapped else None
            self._packed.append(pack(self.raw, self.ggml_type, done))
        return self._packed[0]


def _drop_rows(view: np.ndarray, r0: int, r1: int) -> None:
    """Let the kernel drop the file-mapped pages under rows r0..r1-1 of ``view`` (a
    read-only file mapping: they are re-read from the file if touched again, never
    zeroed). Pages shared with the bytes before or after ``view`` are kept; called for
    consecutive row ranges, the ranges cover every whole page of the view."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    base, row = view.ctypes.data, view.strides[0]
    first = -(-base // page) * page                      # the view's first whole page
    lo = max(first, (base + r0 * row) // page * page)
    hi = (base + r1 * row) // page * page
    if hi > lo and hasattr(mmap, "MADV_DONTNEED"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)
        except (OSError, AttributeError):  # no madvise: the pages stay until evicted
            pass


def matmul(x: np.ndarray, w: QWeight) -> np.ndarray:
    """``x @ W.T``: float32 (n_tokens, n_in) -> float32 (n_tokens, n_out), as llama.cpp.

    A 1-D ``x`` is one token and gives a 1-D result.
    """
    x = np.asarray(x)
    one = x.ndim == 1
    x2 = np.ascontiguousarray(x.reshape(1, -1) if one else x, dtype=np.float32)
    if x2.ndim != 2 or x2.shape[1] != w.n_in:
        raise ValueError(f"matmul: x has shape {x.shape}, the weight needs (n_tokens, {w.n_in})")
    y = matmul_raw(x2, w.raw, w.ggml_type, w.n_out, w.packed())
    return y[0] if one else y


def get_rows(w: QWeight, ids) -> np.ndarray:
    """Rows ``ids`` of ``w`` dequantized to float32 (len(ids), n_in): an embedding lookup."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= w.n_out):
        bad = int(ids[(ids < 0) | (ids >= w.n_out)][0])
        raise IndexError(f"get_rows: row {bad} is outside 0..{w.n_out - 1}")
    if w._packed and w._packed[0] is not None:
        # a tied embedding table, packed for the output head: read the rows from the copy,
        # so that the mapped pages the copy replaced stay dropped (each touch of the map
        # would bring back up to 64 KiB of it: the kernel maps pages around a fault)
        return get_rows_packed(w._packed[0], w.ggml_type, w.n_in, ids)
    return get_rows_raw(w.raw, w.ggml_type, w.n_in, ids)


def vec_dot_type(ggml_type: int) -> str:
    """What llama.cpp quantizes activations to for this weight type ("q8_K", "f16", ...)."""
    return route(ggml_type).vec_dot_type
