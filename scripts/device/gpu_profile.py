"""Where a decode step's GPU time goes, and a sweep of matrix-vector tile shapes.

    python3 scripts/device/gpu_profile.py MODEL.gguf
"""
import sys

import numpy as np
import torch
import triton

from ggforge.runtime.gpu import ops
from ggforge.runtime.gpu import triton_kernels as K
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
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))

# matrix-vector sweep on the first layer's weights
L = model.gpu.layers[0]
bw_rows = []
for name, w in [("qkv", L["qkv"][0]), ("gate_up", L["gate_up"][0]), ("down", L["down"]),
                ("output", model.gpu.output)]:
    x = torch.randn((1, w.n_in), device="cuda")
    out = torch.empty((1, w.n_out), device="cuda")
    tab = ops._table(x.device)
    for bm in (1, 2, 4, 8, 16, 32):
        for bk in sorted({w.bk, 512, 1024} if w.n_in % 1024 == 0 else {w.bk}):
            for nw in (1, 2, 4, 8):
                if bm * bk // (32 * nw) < 1:
                    continue
                def run():
                    K._gemv[(triton.cdiv(w.n_out, bm), 1)](w.data, x, out, tab, w.n_out, w.n_in, w.row_stride,
                                                          TYPE=w.ggml_type, ACT=w.act, BM=bm, BK=bk, num_warps=nw)
                try:
                    ms = triton.testing.do_bench(run, warmup=5, rep=30, return_mode="median")
                except Exception:  # noqa: BLE001 (a tile that does not compile)
                    continue
                bw_rows.append((name, bm, bk, nw, ms * 1e3, w.nbytes / (ms * 1e-3) / 1e9))
best = {}
for r in bw_rows:
    if r[0] not in best or r[4] < best[r[0]][4]:
        best[r[0]] = r
print("weight    BM    BK  warps      us   GB/s   (current: bm=4/16, bk=w.bk, 4 warps)")
for name in dict.fromkeys(r[0] for r in bw_rows):
    for r in sorted((r for r in bw_rows if r[0] == name), key=lambda r: r[4])[:6]:
        print(f"{r[0]:8s} {r[1]:3d} {r[2]:5d} {r[3]:5d} {r[4]:8.1f} {r[5]:6.0f}")
    cur = [r for r in bw_rows if r[0] == name and r[3] == 4 and r[1] in (4, 16)]
    print("   current-ish:", [(r[1], r[2], round(r[4], 1), round(r[5])) for r in cur])
print("best:", best)
