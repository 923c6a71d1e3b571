"""Decode attention (attn_kernels.decode_attention) timed in CUDA graphs for the tile,
split and warp settings, at the 1.1B (4 kv heads x 8, d 64) and 7B-GQA (8 x 4, d 128)
shapes and several cache lengths.

    python3 scripts/device/attn_sweep.py
"""
import itertools

import torch
import triton

from ggforge.runtime.gpu import attn_kernels as A

for (n_kv, g, d), m in itertools.product([(4, 8, 64), (8, 4, 128)], [256, 1024, 4096]):
    q = torch.randn((1, n_kv * g, d), device="cuda")
    kc, vc = torch.randn((m, n_kv, d), device="cuda"), torch.randn((m, n_kv, d), device="cuda")
    pc, qpos = torch.arange(m, device="cuda"), torch.tensor([m - 1], device="cuda")
    rows = []
    for tile, split, warps in itertools.product([4096, 8192, 16384], [128, 512], [2, 4, 8]):
        A.TILE, A.SPLIT_PROGRAMS, A.WARPS = tile, split, warps
        try:
            us = triton.testing.do_bench_cudagraph(
                lambda q=q, kc=kc, vc=vc, pc=pc, qpos=qpos, m=m:
                A.decode_attention(q, kc, vc, pc, qpos, 0.1, 0, m, quant=True), rep=10) * 1e3
        except Exception:  # noqa: BLE001 (a setting that does not compile)
            us = float("nan")
        rows.append((us, tile, split, warps))
    rows.sort()
    cur = next(r for r in rows if r[1:] == (16384, 128, 4))
    print(f"kv {n_kv} x {g}, d {d}, {m} cells: current {cur[0]:.1f} us; best " +
          ", ".join(f"{u:.1f} us (tile {t}, split {s}, warps {w})" for u, t, s, w in rows[:3]), flush=True)
