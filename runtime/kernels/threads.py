"""Run a kernel over row ranges on a few threads.

The kernels release the GIL, so plain Python threads run them in parallel. The calling
thread takes the last range itself; a small product runs on the caller alone, because
waking a thread costs tens of microseconds, as much as a 576 x 576 matrix-vector product.
(The decode products of most quantized types take pool.py's spinning workers instead.)
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

_state = {"n": max(1, len(os.sched_getaffinity(0))), "pool": None}

# Below this many weight bytes per thread a product runs on the calling thread only.
MIN_BYTES_PER_THREAD = 1 << 19


def set_threads(n: int | None = None) -> None:
    """Use ``n`` threads (default: every core this process may run on)."""
    n = len(os.sched_getaffinity(0)) if n is None else int(n)
    if n < 1:
        raise ValueError(f"set_threads needs n >= 1, got {n}")
    old = _state["pool"]
    _state.update(n=n, pool=None)
    if old is not None:
        old.shutdown(wait=False)


def get_threads() -> int:
    """The number of threads the kernels use."""
    return _state["n"]


def _pool(workers: int) -> ThreadPoolExecutor:
    pool = _state["pool"]
    if pool is None or pool._max_workers < workers:
        pool = _state["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="ggforge-kernel")
    return pool


def split_rows(n_rows: int, n_parts: int, align: int) -> list[tuple[int, int]]:
    """[0, n_rows) cut into ``n_parts`` ranges whose inner bounds are multiples of ``align``."""
    bounds = [0]
    for p in range(1, n_parts):
        bounds.append(min(n_rows, (n_rows * p // n_parts) // align * align))
    bounds.append(n_rows)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def run_rows(fn, args: tuple, n_rows: int, nbytes: int, align: int = 1) -> None:
    """Call ``fn(*args, r0, r1)`` over row ranges covering [0, n_rows), in parallel."""
    n = min(_state["n"], max(1, nbytes // MIN_BYTES_PER_THREAD), max(1, n_rows // align))
    if n <= 1:
        fn(*args, 0, n_rows)
        return
    ranges = split_rows(n_rows, n, align)
    futures = [_pool(len(ranges) - 1).submit(fn, *args, r0, r1) for r0, r1 in ranges[:-1]]
    fn(*args, *ranges[-1])
    for f in futures:
        f.result()
