"""Decode attention (attn_kernels.decode_attention) timed in CUDA graphs for its settings
(tensor-core or broadcast products, tile, splits, warps), at the 1.1B (4 kv heads x 8,
d 64), 7B-GQA (8 x 4, d 128) and Gemma-3-270M (1 x 4, d 256) shapes and several cache
lengths.

    python3 scripts/device/attn_sweep.py
"""
import itertools

import torch
import triton

from ggforge.runtime.gpu import attn_kernels as A

for (n_kv, g, d), m in itertools.product([(4, 8, 64), (8, 4, 128), (1, 4, 256)], [32, 640, 4096]):
    q = torch.randn((1, n_kv * g, d), device="cuda")
    kc, vc = torch.randn((m, n_kv, d), device="cuda"), torch.randn((m, n_kv, d), device="cuda")
    pc, qpos = torch.arange(m, device="cuda"), torch.tensor([m - 1], device="cuda")
    rows = []
    settings = [(True, 0, s, w) for s in (128, 512) for w in (4, 8)] + \
        [(False, t, s, w) for t in (1024, 2048) for s in (128, 512) for w in (4, 8)]
    for dot, tile, split, warps in settings:
        A.DOT, A.TILE, A.SPLIT_PROGRAMS, A.WARPS = dot, tile, split, warps
        try:
            us = triton.testing.do_bench_cudagraph(
                lambda q=q, kc=kc, vc=vc, pc=pc, qpos=qpos, m=m:
                A.decode_attention(q, kc, vc, pc, qpos, 0.1, 0, m, quant=True), rep=10) * 1e3
        except Exception:  # noqa: BLE001 (a setting that does not compile)
            us = float("nan")
        rows.append((us, dot, tile, split, warps))
    rows.sort()
    cur = next(r for r in rows if r[1:] == (True, 0, 512, 4))
    old = next(r for r in rows if r[1:] == (False, 2048, 512, 4))
    print(f"kv {n_kv} x {g}, d {d}, {m} cells: dot/512/4 {cur[0]:.1f} us, tile 2048/512/4 {old[0]:.1f} us; best " +
          ", ".join(f"{u:.1f} us (dot {o}, tile {t}, split {s}, warps {w})" for u, o, t, s, w in rows[:3]), flush=True)
