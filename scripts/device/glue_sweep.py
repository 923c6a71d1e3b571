"""The glue kernels of a decode step (fused_kernels: norm, mid, act, prep) timed in CUDA
graphs for their warp counts, at the 1.1B (2048 wide, 5632 FFN, 32 x 4 heads of 64) and
7B (4096, 11008, 32 x 8 heads of 128) shapes.

    python3 scripts/device/glue_sweep.py
"""
import torch
import triton

from ggforge.runtime.gpu import fused_kernels as F

SHAPES = {"1.1B": (2048, 5632, 32, 4, 64), "7B": (4096, 11008, 32, 8, 128)}


def bench(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3   # us


for name, (n, n_ff, n_head, n_kv, d) in SHAPES.items():
    dev = "cuda"
    x, r, w = (torch.randn((1, n), device=dev) for _ in range(3))
    gu = torch.randn((1, 2 * n_ff), device=dev)
    table = torch.randn(1 << 16, device=dev)
    qkv = torch.randn((1, (n_head + 2 * n_kv) * d), device=dev)
    cells = 1024
    kc, vc = torch.zeros((cells, n_kv, d), device=dev), torch.zeros((cells, n_kv, d), device=dev)
    pc = torch.full((cells,), -1, dtype=torch.int64, device=dev)
    pos = torch.tensor([700], dtype=torch.int64, device=dev)
    cos_t, sin_t = torch.randn((4096, d // 2), device=dev), torch.randn((4096, d // 2), device=dev)
    cases = {
        "norm": lambda: F.norm(x, w, 1e-5, r=r),
        "act": lambda: F.act(gu, n_ff, "silu", table),
        "prep": lambda: F.prep(qkv, pos, cos_t, sin_t, kc, vc, pc, None, None, None, n_head, n_kv,
                               d, d, 1e-5, "norm", None, cells),
    }
    for kernel, fn in cases.items():
        rows = []
        for warps in (1, 2, 4, 8, 16):
            F.WARPS[kernel] = warps
            try:
                rows.append((bench(fn), warps))
            except Exception as e:  # noqa: BLE001 (a setting that does not compile)
                print(f"  {kernel} warps {warps}: {type(e).__name__}")
        rows.sort()
        print(f"{name} {kernel}: " + ", ".join(f"{w} warps {us:.2f} us" for us, w in rows), flush=True)
