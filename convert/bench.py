"""Quantization speed, ggforge beside llama.cpp, in one run on the same cores.

ggforge converts the safetensors checkpoint in one step; llama.cpp's quantizer
(`llama_model_quantize` from llama-cpp-python, the library behind llama-quantize) starts
from our F32 GGUF of the same checkpoint, as llama.cpp users do after its converter.
Each measurement is repeated and the median kept; parameters per second count every
tensor of the model.

The two tools take turns (ggforge, llama.cpp, ggforge, ...), so that a change in the
load of a shared machine falls on both, and every run starts with its output file
deleted (llama.cpp would truncate a previous one, ggforge would keep it until the new
one is complete, which needs the memory of both).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ggforge.convert.mixes import parse_file_type
from ggforge.convert.pipeline import convert


@dataclass
class QuantizeTiming:
    file_type: str
    n_params: int
    ggforge_s: float
    llama_cpp_s: float | None

    @property
    def ggforge_rate(self) -> float:
        return self.n_params / self.ggforge_s

    @property
    def llama_cpp_rate(self) -> float | None:
        return None if self.llama_cpp_s is None else self.n_params / self.llama_cpp_s

    @property
    def ratio(self) -> float | None:
        """ggforge's speed over llama.cpp's (> 1: ggforge is faster)."""
        return None if self.llama_cpp_s is None else self.llama_cpp_s / self.ggforge_s


def _timed(fn: Callable[[], None], output: Path) -> float:
    """Seconds `fn` takes to write `output`, which is deleted first."""
    output.unlink(missing_ok=True)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_QUIET = None  # the no-op log callback (kept alive while llama.cpp may call it)


def _llama_cpp_quantizer(threads: int):
    global _QUIET
    try:
        import llama_cpp
    except ImportError:
        return None
    if _QUIET is None:  # llama-quantize prints a line per tensor; the table is what matters
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_QUIET, None)

    def run(src: Path, dst: Path, ftype: int) -> None:
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread = ftype, threads
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p) != 0:
            raise RuntimeError(f"llama.cpp failed to quantize {src}")
    return run


def bench_quantize(source: str | Path, types: Sequence[str], *, threads: int, repeat: int = 3,
                   workdir: str | Path | None = None,
                   on_result: Callable[[QuantizeTiming], None] | None = None) -> list[QuantizeTiming]:
    """Time ggforge and llama.cpp quantizing `source` to each of `types`."""
    llama = _llama_cpp_quantizer(threads)
    results = []
    with tempfile.TemporaryDirectory(dir=workdir, prefix="ggforge-bench-") as tmp:
        tmp = Path(tmp)
        f32 = convert(source, "f32", tmp / "f32.gguf").output if llama else None
        for name in types:
            ft = parse_file_type(name)
            out = tmp / f"ggforge-{ft.name}.gguf"
            n_params = 0

            def ours() -> None:
                nonlocal n_params
                n_params = convert(source, ft, out, force=True).n_params

            theirs = tmp / f"llama-{ft.name}.gguf"
            ours_s, theirs_s = [], []
            for _ in range(repeat):  # in turns
                ours_s.append(_timed(ours, out))
                if llama is not None:
                    theirs_s.append(_timed(lambda: llama(f32, theirs, int(ft.ftype)), theirs))
            out.unlink()
            theirs.unlink(missing_ok=True)
            r = QuantizeTiming(ft.name, n_params, statistics.median(ours_s),
                               statistics.median(theirs_s) if theirs_s else None)
            results.append(r)
            if on_result is not None:
                on_result(r)
    return results
