"""Prompt processing (pp) and token generation (tg) speed, ggforge beside llama.cpp.

Both run the same file with the same number of threads in the same process, one after the
other; each figure is the median of `repeat` runs after a warm-up. pp: one prefill of
n_prompt tokens from an empty cache; tg: n_gen single-token decode steps after that.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ggforge.runtime import kernels
from ggforge.runtime.model import Model


@dataclass
class Speed:
    engine: str
    pp_tps: float   # prompt tokens per second
    tg_tps: float   # generated tokens per second


def _median_rate(fn: Callable[[], float], n_tokens: int, repeat: int) -> float:
    fn()  # warm-up (compilation, page cache)
    return statistics.median(n_tokens / fn() for _ in range(repeat))


def bench_ggforge(path: Path, n_prompt: int, n_gen: int, repeat: int, threads: int) -> Speed:
    kernels.set_threads(threads)
    model = Model(path)
    try:
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, model.config.n_vocab, n_prompt)

        def pp() -> float:
            cache = model.new_cache(n_prompt + n_gen)
            t0 = time.perf_counter()
            model.forward(prompt, cache)
            return time.perf_counter() - t0

        def tg() -> float:
            cache = model.new_cache(n_prompt + n_gen)
            model.forward(prompt[:1], cache)
            t0 = time.perf_counter()
            for i in range(n_gen):
                model.forward(prompt[i % n_prompt: i % n_prompt + 1], cache)
            return time.perf_counter() - t0

        return Speed("ggforge", _median_rate(pp, n_prompt, repeat), _median_rate(tg, n_gen, repeat))
    finally:
        model.close()


def bench_llama_cpp(path: Path, n_prompt: int, n_gen: int, repeat: int, threads: int) -> Speed | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt,
                          n_ubatch=n_prompt, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        rng = np.random.default_rng(0)
        prompt = [int(t) for t in rng.integers(0, llm.n_vocab(), n_prompt)]

        def pp() -> float:
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            return time.perf_counter() - t0

        def tg() -> float:
            llm.reset()
            llm.eval(prompt[:1])
            t0 = time.perf_counter()
            for i in range(n_gen):
                llm.eval([prompt[i % n_prompt]])
            return time.perf_counter() - t0

        return Speed("llama.cpp", _median_rate(pp, n_prompt, repeat), _median_rate(tg, n_gen, repeat))
    finally:
        llm.close()
