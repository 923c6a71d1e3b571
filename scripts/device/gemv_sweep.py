"""Matrix-vector tile shapes on one layer of MODEL: python3 gemv_sweep.py MODEL.gguf"""
import sys
import torch, triton
from ggforge.runtime.gpu import ops, triton_kernels as K
from ggforge.runtime.model import Model
m = Model(sys.argv[1]); m.offload(m.config.n_layer + 1)
L = m.gpu.layers[0]
for name, w in [("qkv", L.qkv[0]), ("down", L.down), ("output", m.gpu.output)]:
    x = torch.randn((1, w.n_in), device="cuda"); out = torch.empty((1, w.n_out), device="cuda")
    tab = ops._table(x.device); res = []
    for bm in (1, 2, 4, 8):
        for bk in (256, 512, 1024):
            for nw in (2, 4, 8):
                f = lambda: K._gemv[(triton.cdiv(w.n_out, bm), 1)](w.data, x, out, tab, w.n_out, w.n_in, w.row_stride, TYPE=w.ggml_type, ACT=w.act, BM=bm, BK=bk, num_warps=nw)
                ms = triton.testing.do_bench(f, warmup=3, rep=15, return_mode="median")
                res.append((ms * 1e3, bm, bk, nw, w.nbytes / ms / 1e6))
    res.sort()
    print(name, w.n_out, w.n_in, [f"{r[0]:.1f}us bm{r[1]} bk{r[2]} w{r[3]} {r[4]:.0f}GB/s" for r in res[:4]], "worst", f"{res[-1][0]:.1f}us", flush=True)
