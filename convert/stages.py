"""The converter's three overlapped stages: read, quantize, write.

    prefetch thread       reads the next chunks of rows (RowReader: pread + widen +
                          NaN/Inf scan, GIL released) into a small pool of buffers
    the caller's thread   quantizes each chunk (the kernels run on all cores)
    writer thread         writes the quantized chunks to the file, in order

Done one after the other, a conversion waits on each stage in turn; overlapped, the
reading and the writing hide behind the quantizing. Memory stays bounded: at most
_POOL_BUFFERS chunks of float32 rows are read ahead, at most _QUEUED_OUT quantized
chunks wait for the writer, and a tensor without a row source (read whole by
ConversionPlan.read: generated tensors, 1-D norms, GGUF sources) is only read once the
previous one of its kind has been quantized, so no two are in memory at once.

An error in any stage (a NaN in the checkpoint, a full disk, Ctrl-C) stops the others
and is raised in the caller's thread, in the order the tensors come.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ggforge.convert.plan import ConversionPlan, PlannedTensor
from ggforge.convert.rows import RowReader
from ggforge.formats.gguf_writer import GGUFWriter
from ggforge.formats.imatrix import imatrix_for

CHUNK_ELEMENTS = 1 << 22  # rows are read and quantized in chunks of about this many elements
_POOL_BUFFERS = 3         # float32 chunk buffers: one being read, one queued, one quantized
_QUEUED_OUT = 4           # quantized chunks waiting for the writer
_POLL_S = 0.1             # how often a blocked stage looks whether another one failed


class _Stopped(Exception):
    """Another stage failed or the conversion was interrupted: wind this one down."""


@dataclass
class Chunk:
    """Work for the quantizing thread: rows of one tensor, or its bytes as they are."""

    tensor: PlannedTensor
    rows: np.ndarray | None = None     # (n, n_per_row) float32
    raw: np.ndarray | None = None      # the whole tensor, copied as is (same type)
    weights: np.ndarray | None = None  # its importance vector (imatrix), if any
    checked: bool = False              # rows already scanned for NaN/Inf
    buf: np.ndarray | None = None      # the pool buffer rows is a view of
    last: bool = False                 # the tensor's last chunk
    whole: bool = False                # the tensor was read whole (holds the token)


class Stages:
    """Runs the prefetch and writer threads around the caller's quantizing loop::

        with Stages(writer, plan, imatrix) as stages:
            for chunk in stages.chunks():
                stages.done(chunk, quantize(chunk.rows ...))
    """

    def __init__(self, writer: GGUFWriter, plan: ConversionPlan,
                 imatrix: dict[str, np.ndarray] | None):
        self._writer, self._plan, self._imatrix = writer, plan, imatrix
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._ready: queue.Queue = queue.Queue()  # bounded by the pool and the token
        self._out: queue.Queue = queue.Queue(maxsize=_QUEUED_OUT)
        self._pool: queue.Queue = queue.Queue()
        self._whole = threading.Semaphore(1)  # one whole-tensor read in memory at a time
        self._reader = RowReader()
        self._n_buffers = 0  # pool buffers made so far
        self._threads = [threading.Thread(target=self._guard, args=(f,), daemon=True, name=n)
                         for f, n in ((self._prefetch, "ggforge-read"),
                                      (self._write, "ggforge-write"))]

    def __enter__(self) -> Stages:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._stop.set()
        for t in self._threads:
            t.join()
        self._reader.close()
        if exc_type is None and self._errors:
            raise self._errors[0]

    # -- the caller's side ----------------------------------------------------------

    def chunks(self) -> Iterator[Chunk]:
        """The chunks to quantize, in file order; raises the error of a failed stage."""
        while True:
            item = self._get(self._ready)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def done(self, chunk: Chunk, out: np.ndarray) -> None:
        """Hand the quantized bytes of `chunk` to the writer; recycle its buffer."""
        if chunk.buf is not None:
            self._pool.put(chunk.buf)
        self._put(self._out, out)
        if chunk.last:
            self._put(self._out, None)  # end of the tensor
            if chunk.whole:
                self._whole.release()

    # -- the threads ------------------------------------------------------------------

    def _guard(self, stage) -> None:
        try:
            stage()
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self._errors.append(e)
            self._stop.set()

    def _prefetch(self) -> None:
        try:
            for t in self._plan.tensors:
                self._read(t)
        except _Stopped:
            raise
        except BaseException as e:  # in order: the caller raises it after earlier tensors
            self._put(self._ready, e)
            return
        self._put(self._ready, None)

    def _read(self, t: PlannedTensor) -> None:
        plan = self._plan
        if plan.read_raw is not None and t.qtype.name == t.source_type:
            self._acquire_whole()
            self._put(self._ready, Chunk(t, raw=plan.read_raw(t), last=True, whole=True))
            return
        src = plan.row_source(t) if plan.row_source is not None else None
        n_per_row = t.shape[-1] if t.shape else 1
        weights = (imatrix_for(self._imatrix, t.name, n_per_row)
                   if t.qtype.block_size > 1 else None)
        step = max(1, CHUNK_ELEMENTS // max(n_per_row, 1))
        if src is not None:
            for r0 in range(0, src.n_rows, step):
                r1 = min(src.n_rows, r0 + step)
                buf = self._buffer()
                rows = self._reader.read(src, r0, r1, buf)
                self._put(self._ready, Chunk(t, rows, weights=weights, checked=True, buf=buf,
                                             last=r1 == src.n_rows))
            if src.n_rows == 0:
                self._put(self._ready, Chunk(t, np.empty((0, n_per_row), np.float32), last=True))
            return
        self._acquire_whole()
        data = plan.read(t)  # (..., n_per_row) float32
        rows = data.reshape(-1, n_per_row) if data.ndim else data.reshape(1, 1)
        starts = range(0, rows.shape[0], step) or range(1)
        for r0 in starts:
            self._put(self._ready, Chunk(t, rows[r0:r0 + step], weights=weights,
                                         last=r0 == starts[-1], whole=True))

    def _write(self) -> None:
        for t in self._plan.tensors:
            self._writer.write_tensor_chunks(t.name, self._tensor_chunks())

    def _tensor_chunks(self) -> Iterator[np.ndarray]:
        while (out := self._get(self._out)) is not None:
            yield out

    # -- plumbing ---------------------------------------------------------------------

    def _buffer(self) -> np.ndarray:
        """A free float32 chunk buffer; waits while _POOL_BUFFERS are in use."""
        if self._pool.empty() and self._n_buffers < _POOL_BUFFERS:
            self._n_buffers += 1
            return np.empty(CHUNK_ELEMENTS, np.float32)
        return self._get(self._pool)

    def _acquire_whole(self) -> None:
        while not self._whole.acquire(timeout=_POLL_S):
            if self._stop.is_set():
                raise _Stopped

    def _get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    if self._errors and threading.current_thread() is threading.main_thread():
                        raise self._errors[0]
                    raise _Stopped from None

    def _put(self, q: queue.Queue, item) -> None:
        while True:
            try:
                return q.put(item, timeout=_POLL_S)
            except queue.Full:
                if self._stop.is_set():
                    if self._errors and threading.current_thread() is threading.main_thread():
                        raise self._errors[0]
                    raise _Stopped from None
