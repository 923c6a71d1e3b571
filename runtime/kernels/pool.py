"""Matrix products on every core, without ever waiting long for a late thread.

A decode step makes about a hundred matrix-vector products of 0.1 to 2 MB and one of
~180 MB (the output). Splitting each over the cores needs a start much cheaper than
the product, and this machine's cores are shared (prefill products, of several tokens,
go the same way: a chunk is then CHUNK rows for all the tokens):

* Python threads (threads.run_rows) wake through the OS and the GIL: ~50 us a product.
* numba's OpenMP pool starts in ~3 us, but every parallel region ends in a barrier: when
  another process holds the second core, each product waits for the OS to schedule the
  second thread (milliseconds), and a step takes ten times longer than on one thread.

So here worker threads spin (in compiled code, without the GIL) waiting for a job, and
the calling thread never waits for one that has not shown up:

* The caller publishes a job (a descriptor under a seqlock, then a job word
  ``id << 32 | next chunk``) and claims chunks of CHUNK rows itself with atomic adds.
  Workers claim chunks with compare-and-swap on the same word (which fails once the word
  belongs to another job) and write their rows to a scratch buffer, then set the chunk's
  flag to the job id.
* When no chunk is left, the caller copies the flagged chunks from the scratch buffer.
  A chunk a worker claimed but has not finished within about 100 us (its thread was
  descheduled) the caller computes itself: the worker's late result lands in scratch
  and is ignored. So a busy core costs at most one such wait per product, and a worker
  that never starts costs nothing.
* A worker holding a chunk announces the job in its BUSY slot *before* it claims; the
  caller keeps the arrays of a job it stole from alive until no worker is busy with it.
* A worker that finds nothing to do for a few milliseconds goes to sleep on an Event;
  the next job wakes it (it then joins late, which costs nothing).
* Whether the workers help at all depends on the machine: on a shared one whose other
  cores are busy, a worker only takes time from the caller. So :class:`Chooser` times
  rounds of products with and without the workers and keeps the faster way, trying the
  other one again now and then.

Every chunk is computed by the type's row-group kernel (rows_legacy.py, rows_kquants.py),
called through a table of the compiled kernels' addresses (``call_kernel``), so that a
model compiles only the kernels of its types; results are identical whoever computes them.
"""

from __future__ import annotations

import atexit
import threading
import time

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.callconv import excinfo_t
from numba.extending import intrinsic

from ggforge.runtime.kernels._atomics import (cas, cpu_yield, fence_acquire, fence_full, fetch_add,
                                              load, pause, store, voidptr)
from ggforge.runtime.kernels._rows import ROWS, ROWS_SIG, TB

CHUNK = 32            # rows claimed at a time
MIN_BYTES = 1 << 15   # smaller products run on the caller alone
MAX_OUT = 1 << 24     # larger outputs (floats; the scratch buffer is as large) too
STEAL_AFTER_S = 1e-4  # how long the caller waits for a worker's chunk (per token, up to
                      # 16) before computing it itself
SLEEP_AFTER_S = 3e-3  # how long a worker waits without a job before it sleeps
SPIN_PAUSES = 512     # an idle worker pauses this many times, then yields its core between looks
SLOTS = 16            # kernels the pool can hold (one per weight type in use)

# ctrl (int64) slots; the job word and each worker's slot on their own cache line
WORD, SEQ, JOB = 0, 8, 9
DESC = 10  # 15 slots: kernel slot, n_rows, n_tok, packed, packed.shape[1], xq, n_in, xd, nb,
           # auxf, auxf.shape[1], auxi, auxi.shape[1], scratch, flags
EXIT = 32
BUSY = 40  # + 8 * worker: id of the job whose chunk the worker is on, 0 when none
_LOW = 0xFFFFFFFF

_nj = numba.njit(cache=True, nogil=True, error_model="numpy")


@intrinsic
def call_kernel(typingctx, addr, packed, xq, xd, auxf, auxi, out, r0, r1):
    """Call the row-group kernel compiled at ``addr`` (Kernel.native_address of a kernel
    of signature _rows.ROWS_SIG) on these arguments (arrays of ROWS_SIG's layouts)."""
    sig = types.void(addr, packed, xq, xd, auxf, auxi, out, r0, r1)

    def codegen(context, builder, signature, args):
        cc = context.call_conv
        fnty = cc.get_function_type(types.none, ROWS_SIG.args)
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        ret = cgutils.alloca_once(builder, cc.get_return_type(types.none).pointee)
        builder.store(cgutils.get_null_value(ret.type.pointee), ret)
        exc = cgutils.alloca_once(builder, ir.PointerType(excinfo_t))
        kargs = cc._get_arg_packer(ROWS_SIG.args).as_arguments(builder, args[1:])
        builder.call(fn, [ret, exc] + list(kargs))   # the kernels raise nothing
        return context.get_dummy_value()

    return sig, codegen


@_nj
def _spin(n, yields):
    for _ in range(n):
        if yields:
            cpu_yield()
        else:
            pause()


@_nj
def _worker(ctrl, me, idle_spins, kernels):
    """A worker's loop: claim and compute chunks of whatever job is published (its kernel
    at the address ``kernels[slot]``); returns 0 after ``idle_spins`` looks without work,
    1 when told to exit."""
    busy = BUSY + 8 * me
    idle = 0
    while load(ctrl, EXIT) == 0:
        w = load(ctrl, WORD)
        job = w >> 32
        c = w & _LOW
        d = ctrl[DESC:DESC + 15]
        if load(ctrl, SEQ) != job or c >= (d[1] + CHUNK - 1) // CHUNK:
            idle += 1
            if idle > idle_spins:
                return 0
            if idle < SPIN_PAUSES:
                pause()
            else:
                cpu_yield()
            continue
        d = d.copy()
        fence_acquire()
        if load(ctrl, SEQ) != job or c >= (d[1] + CHUNK - 1) // CHUNK:
            continue                      # the descriptor changed while we read it
        store(ctrl, busy, job)
        if not cas(ctrl, WORD, w, w + 1):
            store(ctrl, busy, 0)
            continue
        n_rows, n_tok = d[1], d[2]
        packed = numba.carray(voidptr(d[3]), ((n_rows + ROWS - 1) // ROWS, d[4]), np.uint8)
        xq = numba.carray(voidptr(d[5]), (n_tok, d[6]), np.int8)
        xd = numba.carray(voidptr(d[7]), (n_tok, d[8]), np.float32)
        auxf = numba.carray(voidptr(d[9]), (n_tok, d[10]), np.float32)
        auxi = numba.carray(voidptr(d[11]), (n_tok, d[12]), np.int32)
        scratch = numba.carray(voidptr(d[13]), (n_tok, n_rows), np.float32)
        flags = numba.carray(voidptr(d[14]), ((n_rows + CHUNK - 1) // CHUNK,), np.int64)
        call_kernel(kernels[d[0]], packed, xq, xd, auxf, auxi, scratch, c * CHUNK,
                    min(n_rows, (c + 1) * CHUNK))
        store(flags, c, job)
        store(ctrl, busy, 0)
        idle = 0
    return 1


@_nj
def _run(ctrl, kernels, slot, packed, xq, xd, auxf, auxi, out, scratch, flags, wait_spins):
    """Publish a job, compute chunks alongside the workers, collect theirs; returns
    (job id, number of worker chunks computed here because they came late)."""
    n_rows, n_tok = out.shape[1], xq.shape[0]
    n_chunks = (n_rows + CHUNK - 1) // CHUNK
    fn = kernels[slot]
    job = ctrl[JOB] % 0x7FFFFFFF + 1
    ctrl[JOB] = job
    store(ctrl, SEQ, -1)
    fence_full()          # no descriptor store may show before the -1
    d = ctrl[DESC:DESC + 15]
    d[0], d[1], d[2] = slot, n_rows, n_tok
    d[3], d[4] = packed.ctypes.data, packed.shape[1]
    d[5], d[6] = xq.ctypes.data, xq.shape[1]
    d[7], d[8] = xd.ctypes.data, xd.shape[1]
    d[9], d[10] = auxf.ctypes.data, auxf.shape[1]
    d[11], d[12] = auxi.ctypes.data, auxi.shape[1]
    d[13], d[14] = scratch.ctypes.data, flags.ctypes.data
    store(ctrl, SEQ, job)
    store(ctrl, WORD, job << 32)
    mine = np.zeros(n_chunks, np.uint8)
    while True:
        c = fetch_add(ctrl, WORD, 1) & _LOW
        if c >= n_chunks:
            break
        mine[c] = 1
        call_kernel(fn, packed, xq, xd, auxf, auxi, out, c * CHUNK, min(n_rows, (c + 1) * CHUNK))
    late = 0
    for c in range(n_chunks):
        if mine[c]:
            continue
        c0, c1 = c * CHUNK, min(n_rows, (c + 1) * CHUNK)
        spins = 0
        while load(flags, c) != job and spins < wait_spins:
            pause()
            spins += 1
        if load(flags, c) == job:
            for t in range(n_tok):
                for r in range(c0, c1):
                    out[t, r] = scratch[t * n_rows + r]
        else:
            call_kernel(fn, packed, xq, xd, auxf, auxi, out, c0, c1)
            late += 1
    return job, late


# ---------------------------------------------------------------- the pool

class Chooser:
    """With or without the workers: after a warm-up round of ``round_jobs`` products, an
    exploration round of twice as many alternates the two ways product by product (so
    both see the same mix of sizes and types) and keeps the one that moved more weight
    bytes per second; the next exploration comes after 2 rounds of the chosen way, then
    4, 8 .. 64 while the choice holds (back to 2 when it flips)."""

    MARGIN = 0.95   # the workers must be this much faster (they cost a core)
    MAX_INTERVAL = 64

    def __init__(self, round_jobs: int = 256):
        self.round_jobs = round_jobs
        self.use_pool = self.preferred = True
        self.rate = {True: None, False: None}   # seconds per byte in the last exploration
        self.interval = 2
        self._phase = "warm-up"                 # then "explore", "run", "explore", ...
        self._since = self._n = 0
        self._acc = {True: [0, 0.0], False: [0, 0.0]}

    def record(self, nbytes: int, seconds: float) -> None:
        acc = self._acc[self.use_pool]
        acc[0] += nbytes
        acc[1] += seconds
        self._n += 1
        if self._phase == "explore":
            if self._n < 2 * self.round_jobs:
                self.use_pool = not self.use_pool
                return
            self.rate = {m: a[1] / max(a[0], 1) for m, a in self._acc.items()}
            better = self.rate[True] < self.MARGIN * self.rate[False]
            self.interval = min(2 * self.interval, self.MAX_INTERVAL) if better == self.preferred else 2
            self.preferred, self._phase, self._since = better, "run", 0
        elif self._n < self.round_jobs:
            return
        elif self._phase == "warm-up":
            self._phase = "explore"
        else:
            self._since += 1
            if self._since >= self.interval:
                self._phase = "explore"
        self._n = 0
        self._acc = {True: [0, 0.0], False: [0, 0.0]}
        self.use_pool = self.preferred


class Pool:
    """``n_workers`` spinning threads beside the caller; one caller at a time."""

    def __init__(self, n_workers: int):
        self.choosers = {False: Chooser(256), True: Chooser(16)}   # decode, prefill
        self.ctrl = np.zeros(BUSY + 8 * n_workers, np.int64)
        self._lock = threading.Lock()
        self._kernels: list = []                         # the Kernel in each used slot
        self._addresses = np.zeros(SLOTS, np.int64)      # and its compiled code
        self._wake = [threading.Event() for _ in range(n_workers)]
        self._asleep = [False] * n_workers
        self._buffers = []   # every scratch / flags pair made: a late worker may still write
        self._scratch = np.zeros(0, np.float32)
        self._flags = np.zeros(0, np.int64)
        self._held = []      # (job, arrays) of jobs a late worker may still read
        _spin(1, False)  # compiled (or loaded) before it is timed
        per_pause, per_yield = (_timed(_spin, 20000, y) for y in (False, True))
        self._wait_spins = max(100, int(STEAL_AFTER_S / per_pause))
        self._idle_spins = SPIN_PAUSES + max(100, int(SLEEP_AFTER_S / per_yield))
        self._threads = [threading.Thread(target=self._serve, args=(i,), daemon=True,
                                          name=f"ggforge-decode-{i}") for i in range(n_workers)]
        for th in self._threads:
            th.start()

    @property
    def n_workers(self) -> int:
        return len(self._threads)

    def _serve(self, me: int) -> None:
        while _worker(self.ctrl, me, self._idle_spins, self._addresses) == 0:
            self._asleep[me] = True
            self._wake[me].wait()
            self._wake[me].clear()
            self._asleep[me] = False

    def close(self) -> None:
        self.ctrl[EXIT] = 1
        for e in self._wake:
            e.set()

    def _slot(self, kernel) -> int | None:
        """The table slot of ``kernel``, given one on first use; None when the table is full."""
        if kernel in self._kernels:
            return self._kernels.index(kernel)
        if len(self._kernels) == SLOTS:
            return None
        self._addresses[len(self._kernels)] = kernel.native_address()
        self._kernels.append(kernel)
        return len(self._kernels) - 1

    def product(self, kernel, args: tuple) -> None:
        """kernel(*args, 0, n_rows) (a row-group kernel, args (packed, xq, xd, auxf, auxi,
        out)) on the workers too, or on the caller alone, as the chooser of decode (one
        token at a time) or prefill (TB or more) products says."""
        packed, xq, out = args[0], args[1], args[5]
        chooser = self.choosers[xq.shape[0] >= TB]
        t0 = time.perf_counter()
        if not (chooser.use_pool and self.run(kernel, args)):
            kernel(*args, 0, out.shape[1])
        chooser.record(packed.nbytes * xq.shape[0], time.perf_counter() - t0)

    def run(self, kernel, args: tuple) -> bool:
        """kernel(*args, 0, n_rows) on the caller and the workers; False if the pool is busy
        with another caller or full (then nothing was done)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            slot = self._slot(kernel)
            if slot is None:
                return False
            n_tok, n_rows = args[5].shape
            if self._scratch.size < n_tok * n_rows:
                self._scratch = np.zeros(max(n_tok * n_rows, 2 * self._scratch.size), np.float32)
                self._flags = np.zeros(-(-self._scratch.size // CHUNK), np.int64)
                self._buffers.append((self._scratch, self._flags))
            for i, asleep in enumerate(self._asleep):
                if asleep:
                    self._wake[i].set()
            job, late = _run(self.ctrl, self._addresses, slot, *args, self._scratch, self._flags,
                             self._wait_spins * min(n_tok, 16))
            if self._held:
                busy = set(self.ctrl[BUSY::8].tolist())
                self._held = [h for h in self._held if h[0] in busy]
            if late:
                self._held.append((job, args))
            return True
        finally:
            self._lock.release()


def _timed(fn, n, *args) -> float:
    """Seconds per iteration of fn(n, *args)."""
    t0 = time.perf_counter()
    fn(n, *args)
    return max((time.perf_counter() - t0) / n, 1e-9)


_pool: dict = {"pool": None}


def get_pool(n_threads: int) -> Pool | None:
    """The pool for ``n_threads`` threads in all (the caller and n_threads - 1 workers)."""
    p = _pool["pool"]
    if n_threads <= 1:
        return None
    if p is None or p.n_workers != n_threads - 1:
        if p is not None:
            p.close()
        p = _pool["pool"] = Pool(n_threads - 1)
    return p


def _shutdown() -> None:
    if _pool["pool"] is not None:
        _pool["pool"].close()


atexit.register(_shutdown)
