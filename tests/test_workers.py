"""formats/workers.py: one thread count and one pool for the quantizers and the runtime's
row-parallel kernels."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from ggforge.formats import workers
from ggforge.formats.quants.kquants import run_sliced
from ggforge.runtime import kernels
from ggforge.runtime.kernels.threads import run_rows


@pytest.fixture()
def three_threads():
    before = workers.get_threads()
    kernels.set_threads(3)
    yield
    kernels.set_threads(before)


def test_quantizers_and_kernels_share_the_count_and_the_pool(three_threads):
    assert workers.get_threads() == kernels.get_threads() == 3
    seen: dict[str, set] = {"quant": set(), "rows": set()}

    def quant(a):
        seen["quant"].add(threading.current_thread())

    def rows(r0, r1):
        seen["rows"].add(threading.current_thread())

    run_sliced(quant, 3000, np.zeros(3000), min_items=1)
    run_rows(rows, (), 3000, 1 << 30)
    pool_threads = set(workers.executor()._threads)
    assert len(seen["quant"]) <= 3 and len(seen["rows"]) <= 3
    assert seen["quant"] <= pool_threads     # every slice on the one pool
    assert seen["rows"] - {threading.current_thread()} <= pool_threads   # the caller takes the last range
    assert all(t.name.startswith("ggforge") for t in pool_threads)


def test_bad_thread_count():
    with pytest.raises(ValueError, match="n >= 1"):
        workers.set_threads(0)
