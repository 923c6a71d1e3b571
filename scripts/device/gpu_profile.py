"""Where a decode step's GPU time goes (4 graph-replayed decode steps, CUDA time per kernel).

    python3 scripts/device/gpu_profile.py MODEL.gguf
"""
import sys

import numpy as np
import torch
import time

from ggforge.runtime.model import Model

path = sys.argv[1]
model = Model(path)
model.offload(model.config.n_layer + 1)
cache = model.new_cache(256)
ids = np.arange(1, 9)
model.forward(ids[:1], cache)
for t in ids[1:4]:
    model.forward(np.asarray([t]), cache)
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for t in ids[4:8]:
        model.forward(np.asarray([t]), cache)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=50))
torch.cuda.synchronize()
t0 = time.perf_counter()
for t in range(64):
    model.forward(np.asarray([1 + t % 7]), cache)
torch.cuda.synchronize()
print(f"wall per decode step: {(time.perf_counter() - t0) / 64 * 1e3:.3f} ms")

