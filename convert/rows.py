"""Reading a source tensor a chunk of rows at a time, as float32, checked for NaN/Inf.

The converter's fast reading path for 2-D safetensors tensors: ``os.preadv`` of just the
rows needed into a reused buffer (no mapping whose pages count in the resident set, no
copy of the whole tensor), widened to float32 and scanned for NaN/Inf in one pass
(formats/quants/widen), in the order the architecture's transform puts the rows
(llama's q/k permutation is a row permutation). Both the read and the kernels release
the GIL, so the pipeline runs this in a prefetch thread beside the quantizers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ggforge.formats.errors import FormatError, QuantizationError

_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}
_STORAGE = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}


@dataclass(frozen=True)
class RowSource:
    """Where the rows of a 2-D source tensor lie in a file, and in which order to take
    them: output row r is source row ``order[r]`` (``r`` when order is None)."""

    name: str                  # the tensor's name in the source, for messages
    path: str
    offset: int                # absolute byte offset of source row 0
    dtype: str                 # "BF16", "F16" or "F32" (little-endian)
    n_rows: int                # output rows (the first n_rows source rows when trimmed)
    n_cols: int
    order: np.ndarray | None = None  # (n_rows,) int64, a permutation of range(n_rows)

    @staticmethod
    def supports(dtype: str) -> bool:
        return dtype in _ITEMSIZE


class RowReader:
    """Reads chunks of rows of RowSources; one per conversion (it keeps files open)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._raw = np.empty(0, np.uint8)  # reused read buffer, grown as needed

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, src: RowSource, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
        """Output rows r0..r1 of ``src`` as float32 ``(r1 - r0, n_cols)``, a view of the
        flat float32 buffer ``out``. QuantizationError names the tensor and the
        (source) index of the first NaN/Inf."""
        from ggforge.formats.quants import widen

        k, n = r1 - r0, src.n_cols
        rows = np.arange(r0, r1, dtype=np.int64) if src.order is None else src.order[r0:r1]
        lo, hi = (r0, r1) if src.order is None else (int(rows.min()), int(rows.max()) + 1)
        span = self._pread(src, lo, hi)  # (hi - lo, n) in the source dtype
        dst = out[:k * n].reshape(k, n)  # (k, n_cols) float32
        if src.dtype == "BF16":
            bad = widen.bf16_rows(span, rows - lo, dst.view(np.uint32))
        else:
            if src.order is None:
                dst[...] = span  # F16 -> F32 is exact
            else:
                dst[...] = span[rows - lo]
            bad = widen.first_nonfinite_f32(dst.view(np.uint32))
        if bad >= 0:
            r, c = divmod(int(bad), n)
            value = _source_value(span[rows[r] - lo, c], src.dtype)
            raise QuantizationError(
                f"tensor {src.name!r} has a non-finite value ({value}) at index "
                f"{(int(rows[r]), c)}; fix or drop the checkpoint's bad weights before quantizing")
        return dst

    def _pread(self, src: RowSource, lo: int, hi: int) -> np.ndarray:
        """Source rows lo..hi, (hi - lo, n_cols) in the source dtype (a view of _raw)."""
        row_bytes = src.n_cols * _ITEMSIZE[src.dtype]
        nbytes = (hi - lo) * row_bytes
        if self._raw.size < nbytes:
            self._raw = np.empty(nbytes, np.uint8)
        fd = self._fds.get(src.path)
        if fd is None:
            try:
                fd = self._fds[src.path] = os.open(src.path, os.O_RDONLY)
            except OSError as e:
                raise FormatError(f"{src.path}: cannot read: {e.strerror or e}") from None
        buf = memoryview(self._raw)[:nbytes]
        offset, done = src.offset + lo * row_bytes, 0
        while done < nbytes:  # preadv may return less than asked
            try:
                got = os.preadv(fd, [buf[done:]], offset + done)
            except OSError as e:
                raise FormatError(f"{src.path}: cannot read tensor {src.name!r}: "
                                  f"{e.strerror or e}") from None
            if got == 0:
                raise FormatError(f"{src.path}: file ends inside tensor {src.name!r}; "
                                  "it changed (or was truncated) since it was opened")
            done += got
        return self._raw[:nbytes].view(_STORAGE[src.dtype]).reshape(hi - lo, src.n_cols)


def _source_value(v, dtype: str) -> float:
    if dtype == "BF16":
        return float((np.array([v], np.uint32) << np.uint32(16)).view(np.float32)[0])
    return float(v)
