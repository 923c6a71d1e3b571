"""The package's worker threads: one thread count and one pool for every parallel loop.

    run on get_threads() threads:  executor(n).submit(fn, ...)

The quantizers (formats/quants/kquants.run_sliced) and the runtime's row-parallel kernels
(runtime/kernels/threads.run_rows) submit to this one pool; their numba kernels release the
GIL, so plain threads use the cores. ``set_threads`` (``ggforge run -t``, ``bench -t``,
``kernels.set_threads``) sizes both. (The runtime's decode products use pool.py's spinning
workers, which wait on an atomic instead of a queue because waking a blocked thread costs
as much as a small matrix-vector product; they take their count from here too.)
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_lock = threading.Lock()
_state: dict = {"n": _cores(), "pool": None}


def set_threads(n: int | None = None) -> None:
    """Use ``n`` threads (default: every core this process may run on)."""
    n = _cores() if n is None else int(n)
    if n < 1:
        raise ValueError(f"set_threads needs n >= 1, got {n}")
    with _lock:
        old = _state["pool"]
        _state.update(n=n, pool=None)
    if old is not None:
        old.shutdown(wait=False)


def get_threads() -> int:
    """The number of threads parallel work uses."""
    return _state["n"]


def executor(workers: int | None = None) -> ThreadPoolExecutor:
    """The shared pool, with at least ``workers`` threads (default: get_threads())."""
    workers = get_threads() if workers is None else workers
    with _lock:
        pool = _state["pool"]
        if pool is None or pool._max_workers < workers:
            old, pool = pool, ThreadPoolExecutor(workers, thread_name_prefix="ggforge")
            _state["pool"] = pool
            if old is not None:
                old.shutdown(wait=False)
    return pool
