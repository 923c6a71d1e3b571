"""Prompt processing (pp) and token generation (tg) speed, ggforge beside llama.cpp.

Both run the same file with the same number of threads in the same process, each with
llama.cpp's defaults (an F16 KV cache, flash attention on the CPU). pp: one
prefill of n_prompt tokens from an empty cache; tg: n_gen single-token decode steps after
that. Each figure is the median of ``repeat`` runs after a warm-up.

On a machine shared with other work the speed of both drifts from minute to minute, so
the two engines take turns: one pp and one tg run of ggforge, then of llama.cpp, and so
on (:func:`bench_both`). :func:`bench_ggforge` does that when llama-cpp-python is
installed and keeps llama.cpp's figures for :func:`bench_llama_cpp` with the same
arguments, which then measures nothing itself.
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


Timer = Callable[[], float]   # one run; returns its seconds


# both engines with llama.cpp's defaults (llama-bench's too): an F16 cache, flash attention
DEFAULT_CACHE = ("f16", "f16", True)


def _ggforge_timers(model: Model, n_prompt: int, n_gen: int) -> tuple[Timer, Timer]:
    prompt = np.random.default_rng(0).integers(0, model.config.n_vocab, n_prompt)

    def pp() -> float:
        cache = model.new_cache(n_prompt + n_gen, *DEFAULT_CACHE)
        t0 = time.perf_counter()
        model.forward(prompt, cache)
        return time.perf_counter() - t0

    def tg() -> float:
        cache = model.new_cache(n_prompt + n_gen, *DEFAULT_CACHE)
        model.forward(prompt[:1], cache)
        t0 = time.perf_counter()
        for i in range(n_gen):
            model.forward(prompt[i % n_prompt: i % n_prompt + 1], cache)
        return time.perf_counter() - t0

    return pp, tg


def _llama_timers(llm, n_prompt: int, n_gen: int) -> tuple[Timer, Timer]:
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, llm.n_vocab(), n_prompt)]

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

    return pp, tg


def _open_llama(path: Path, n_prompt: int, n_gen: int, threads: int):
    """A llama_cpp.Llama on ``path``, or None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt,
                           n_ubatch=n_prompt, n_threads=threads, n_threads_batch=threads,
                           flash_attn=True, verbose=False)     # its default F16 cache


def _measure(engines: dict[str, tuple[Timer, Timer]], n_prompt: int, n_gen: int,
             repeat: int) -> dict[str, Speed]:
    """Each engine's median rates, the engines taking turns run by run after a warm-up."""
    times = {name: ([], []) for name in engines}
    for name, (pp, tg) in engines.items():  # warm-up: compilation, page cache, packing
        pp(), tg()
    for _ in range(repeat):
        for name, (pp, tg) in engines.items():
            times[name][0].append(pp())
            times[name][1].append(tg())
    return {name: Speed(name, n_prompt / statistics.median(p), n_gen / statistics.median(t))
            for name, (p, t) in times.items()}


def bench_both(path: Path, n_prompt: int, n_gen: int, repeat: int,
               threads: int) -> tuple[Speed, Speed | None]:
    """ggforge's and llama.cpp's speeds (None for llama.cpp without llama-cpp-python),
    measured in turns."""
    kernels.set_threads(threads)
    model = Model(path)
    llm = None
    try:
        engines = {"ggforge": _ggforge_timers(model, n_prompt, n_gen)}
        llm = _open_llama(path, n_prompt, n_gen, threads)
        if llm is not None:
            engines["llama.cpp"] = _llama_timers(llm, n_prompt, n_gen)
        speeds = _measure(engines, n_prompt, n_gen, repeat)
        return speeds["ggforge"], speeds.get("llama.cpp")
    finally:
        model.close()
        if llm is not None:
            llm.close()


_theirs: dict = {}   # (path, n_prompt, n_gen, repeat, threads) -> llama.cpp's Speed


def bench_ggforge(path: Path, n_prompt: int, n_gen: int, repeat: int, threads: int) -> Speed:
    """ggforge's speed (measured in turns with llama.cpp's, whose figures
    bench_llama_cpp then returns for the same arguments)."""
    ours, theirs = bench_both(path, n_prompt, n_gen, repeat, threads)
    if theirs is not None:
        _theirs[(str(path), n_prompt, n_gen, repeat, threads)] = theirs
    return ours


def bench_llama_cpp(path: Path, n_prompt: int, n_gen: int, repeat: int, threads: int) -> Speed | None:
    """llama.cpp's speed (None without llama-cpp-python): the figures taken beside
    ggforge's by bench_ggforge with the same arguments, else measured now."""
    kept = _theirs.pop((str(path), n_prompt, n_gen, repeat, threads), None)
    if kept is not None:
        return kept
    llm = _open_llama(path, n_prompt, n_gen, threads)
    if llm is None:
        return None
    try:
        return _measure({"llama.cpp": _llama_timers(llm, n_prompt, n_gen)}, n_prompt, n_gen,
                        repeat)["llama.cpp"]
    finally:
        llm.close()
