"""Run a kernel over row ranges on a few threads.

The kernels release the GIL, so plain Python threads run them in parallel. The calling
thread takes the last range itself; a small product runs on the caller alone, because
waking a thread costs tens of microseconds, as much as a 576 x 576 matrix-vector product.
(The decode products of most quantized types take pool.py's spinning workers instead.)
The thread count and the pool are the package's one (formats/workers.py).
"""

from __future__ import annotations

from ggforge.formats.workers import executor, get_threads, set_threads

__all__ = ["get_threads", "set_threads", "split_rows", "run_rows"]

# Below this many weight bytes per thread a product runs on the calling thread only.
MIN_BYTES_PER_THREAD = 1 << 19


def split_rows(n_rows: int, n_parts: int, align: int) -> list[tuple[int, int]]:
    """[0, n_rows) cut into ``n_parts`` ranges whose inner bounds are multiples of ``align``."""
    bounds = [0]
    for p in range(1, n_parts):
        bounds.append(min(n_rows, (n_rows * p // n_parts) // align * align))
    bounds.append(n_rows)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def run_rows(fn, args: tuple, n_rows: int, nbytes: int, align: int = 1) -> None:
    """Call ``fn(*args, r0, r1)`` over row ranges covering [0, n_rows), in parallel."""
    n = min(get_threads(), max(1, nbytes // MIN_BYTES_PER_THREAD), max(1, n_rows // align))
    if n <= 1:
        fn(*args, 0, n_rows)
        return
    ranges = split_rows(n_rows, n, align)
    futures = [executor(len(ranges) - 1).submit(fn, *args, r0, r1) for r0, r1 in ranges[:-1]]
    fn(*args, *ranges[-1])
    for f in futures:
        f.result()
