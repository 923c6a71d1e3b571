"""GPU offload speed: pp and tg tokens/s at several --gpu-layers, the share of the device's
measured memory bandwidth that decode reaches, and llama.cpp's llama-bench on the same file.

Decode reads every offloaded weight once per token, so bytes per token = the device
weights + the KV cells attention reads (averaged over the tg positions); tg x bytes per
token / measured bandwidth is the fraction reached. The bandwidth is measured in the same run: a device-to-device copy of
2 GiB, bytes read plus bytes written, median of 20.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggforge.runtime.model import Model


@dataclass
class GpuSpeed:
    gpu_layers: int
    pp_tps: float
    tg_tps: float
    device_bytes_per_token: int      # weights + KV read per decode step on the device


def measure_bandwidth(n_bytes: int = 2 << 30, repeat: int = 20) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    import torch

    a = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    times = []
    for _ in range(repeat + 3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n_bytes / statistics.median(times[3:])


def bench_offload(path: Path, n_prompt: int, n_gen: int, repeat: int, gpu_layers: int) -> GpuSpeed:
    import torch

    model = Model(path)
    try:
        model.offload(gpu_layers)
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, model.config.n_vocab, n_prompt)
        cache = model.new_cache(n_prompt + n_gen + 1)

        def pp() -> float:
            cache.truncate(0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.forward(prompt, cache)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        def tg() -> float:
            cache.truncate(0)
            model.forward(prompt[:1], cache)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(n_gen):
                model.forward(prompt[i % n_prompt: i % n_prompt + 1], cache)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        pp(), tg()  # warm-up: compilation, graph capture
        pp_tps = statistics.median(n_prompt / pp() for _ in range(repeat))
        tg_tps = statistics.median(n_gen / tg() for _ in range(repeat))
        g = model.gpu
        per_token = 0 if g is None else g.nbytes + round(statistics.mean(
            cache.gpu.read_bytes(p) for p in range(1, n_gen + 1)))
        return GpuSpeed(gpu_layers, pp_tps, tg_tps, per_token)
    finally:
        model.close()


def llama_bench(binary: str, path: Path, n_prompt: int, n_gen: int, repeat: int,
                gpu_layers: int) -> tuple[float, float] | None:
    """(pp t/s, tg t/s) from llama.cpp's llama-bench (-o json), or None if it fails."""
    cmd = [binary, "-m", str(path), "-p", str(n_prompt), "-n", str(n_gen), "-r", str(repeat),
           "-ngl", str(gpu_layers), "-o", "json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        rows = json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return None
    pp = next((r["avg_ts"] for r in rows if r.get("n_prompt") and not r.get("n_gen")), float("nan"))
    tg = next((r["avg_ts"] for r in rows if r.get("n_gen") and not r.get("n_prompt")), float("nan"))
    return pp, tg
