"""Q8_0 planar kernels on random planes of a 1.1B (and an 8B) llama's shapes: decode
variants and tiles, then prefill tiles, each timed inside a CUDA graph (median), with
GB/s over the weight bytes and the error against a float64 product.

    python3 scripts/device/q8_sweep.py [quick] [decode | NAME-PREFIX]
"""
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench_cudagraph

from ggforge.runtime.gpu import q8_kernels as Q8

QUICK = "quick" in sys.argv
torch.manual_seed(0)
SHAPES = {"qkv": (2560, 2048), "gate_up": (11264, 2048), "down": (2048, 5632),
          "head": (32000, 2048), "8B.gate_up": (28672, 4096), "8B.down": (4096, 14336),
          "7B.qkv": (6144, 4096), "7B.o": (4096, 4096), "7B.gate_up": (22016, 4096),
          "7B.down": (4096, 11008), "7B.head": (32000, 4096)}
ONLY = next((a for a in sys.argv[1:] if a != "quick"), None)   # a name prefix (7B.) or decode


def planes(n_out, n_in):
    q = torch.randint(-127, 128, (n_out, n_in), dtype=torch.int8, device="cuda")
    d = (torch.rand((n_out, n_in // 32), device="cuda") * 1e-2).half()
    return q, d


def reference(q, d, xq, xd):
    w = (q.double().reshape(q.shape[0], -1, 32) * d.double()[:, :, None]).reshape(q.shape)
    x = (xq.double().reshape(xq.shape[0], -1, 32) * xd.double()[:, :, None]).reshape(xq.shape)
    return x @ w.T


def bench(fn):
    return do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3  # us


TILES = {}   # the fastest decode tiles by shape, for ggforge bench --q8-tiles (settings.q8_tiles)


def decode(name, n_out, n_in):
    q, d = planes(n_out, n_in)
    x = torch.randn((1, n_in), device="cuda")
    xq = torch.empty((1, n_in), dtype=torch.int8, device="cuda")
    xd = torch.empty((1, n_in // 32), dtype=torch.float32, device="cuda")
    Q8._quant_act[(1, n_in // 128)](x, xq, xd, n_in, BK=128)
    ref = reference(q, d, xq, xd)
    y = torch.empty((1, n_out), device="cuda")
    nbytes = n_out * n_in * 34 / 32
    res = []

    def run(label, fn, cfg=None):
        fn()
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        us = bench(fn)
        res.append((us, label, nbytes / us / 1e3, err, cfg))
    q32, x32 = q.view(torch.int32), xq.view(torch.int32)
    bms = (4, 8) if QUICK else (4, 8, 16)
    for bk in (512, 1024, 2048):
        for bm in bms:
            for nw in (4, 8):
                if bm * bk // 4 < 32 * nw:   # fewer words than threads
                    continue
                g = (triton.cdiv(n_out, bm), 1)
                run(f"bm{bm} bk{bk} w{nw}", lambda: Q8._gemv[g](q32, d, x32, xd, y, n_out, n_in, BM=bm, BK=bk, num_warps=nw),
                    dict(BM=bm, BK=bk, num_warps=nw))
    qa = bench(lambda: Q8._quant_act[(1, n_in // 128)](x, xq, xd, n_in, BK=128))
    res.sort()
    print(f"decode {name} {n_out}x{n_in} ({nbytes / 2**20:.1f} MiB), quant_act {qa:.1f} us", flush=True)
    for us, label, gbs, err, _ in res[:6] + res[-1:]:
        print(f"  {label:24s} {us:7.1f} us {gbs:7.0f} GB/s err {err:.1e}", flush=True)
    TILES[f"{n_out}x{n_in}"] = res[0][4]


def prefill(name, n_out, n_in, n_tok=512):
    q, d = planes(n_out, n_in)
    x = torch.randn((n_tok, n_in), device="cuda")
    xq = torch.empty((n_tok, n_in), dtype=torch.int8, device="cuda")
    xd = torch.empty((n_tok, n_in // 32), dtype=torch.float32, device="cuda")
    Q8._quant_act[(n_tok, n_in // 128)](x, xq, xd, n_in, BK=128)
    ref = reference(q, d, xq, xd)
    y = torch.empty((n_tok, n_out), device="cuda")
    res = []
    for bt in (64, 128):
        for bm in (64, 128):
            for bk in (64, 128, 256):
                for nw in (4, 8):
                    g = (triton.cdiv(n_out, bm), triton.cdiv(n_tok, bt))
                    f = lambda: Q8._gemm[g](q, d, xq, xd, y, n_tok, n_out, n_in, BT=bt, BM=bm, BK=bk, num_warps=nw)
                    try:
                        f()
                    except Exception as e:  # noqa: BLE001 (out of shared memory etc.)
                        print(f"  bt{bt} bm{bm} bk{bk} w{nw}: {type(e).__name__}")
                        continue
                    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                    us = bench(f)
                    res.append((us, f"bt{bt} bm{bm} bk{bk} w{nw}", 2 * n_tok * n_out * n_in / us / 1e6, err))
    wh = torch.randn((n_out, n_in), device="cuda", dtype=torch.half)
    xh = x.half()
    cub = bench(lambda: xh @ wh.T)
    res.sort()
    print(f"prefill {name} {n_tok} tok x {n_out}x{n_in}: cuBLAS fp16 {cub:.1f} us "
          f"({2 * n_tok * n_out * n_in / cub / 1e6:.0f} TFLOP/s)", flush=True)
    for us, label, tf, err in res[:4] + res[-1:]:
        print(f"  {label:20s} {us:8.1f} us {tf:6.1f} TFLOP/s err {err:.1e}", flush=True)


if __name__ == "__main__":
    for name, (n_out, n_in) in SHAPES.items():
        if (ONLY not in (None, "decode") and not name.startswith(ONLY)) or (QUICK and name[0].isdigit()):
            continue
        decode(name, n_out, n_in)
    out = os.path.join(os.environ.get("OUT", "/tmp"), "q8_tiles.json")
    with open(out, "w") as f:
        json.dump(TILES, f, indent=1)
    print("tiles:", out)
    for name in () if ONLY else ("gate_up", "down"):
        prefill(name, *SHAPES[name])
