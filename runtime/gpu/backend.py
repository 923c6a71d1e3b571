"""The last layers of a model (and its output head) on a torch device.

``GpuLayers`` takes the hidden state where the CPU layers leave it, runs its layers with
the weights uploaded still quantized (ops.py) and a KV cache on the device, and returns
the hidden state or, when it holds the output head, the logits. Only the hidden state
crosses between host and device.

The arithmetic follows the CPU backend (runtime/layers.py): float32 throughout, RMS sums
in float64, the rope table of runtime.layers.rope_cache, ggml's fp16-table GELU, softmax
sums in float64; matrix products round activations as llama.cpp's CPU backend does.

Sliding-window layers keep a ring of ``window + UBATCH`` cells, not the whole context:
cell ``p % size`` holds position ``p``, and attention masks by the position each cell
holds. Prompts are evaluated ``UBATCH`` tokens at a time.

On CUDA one decode step (one token through every device layer) is captured as a CUDA
graph per attention-length bucket and replayed: small models are not bound by launches.
The glue between products (norms, residuals, rope and the cache write, the activation)
is one Triton kernel per step (fused_kernels.py); decode through Q8_0 layers rounds the
activations in those kernels.
"""
from __future__ import annotations

import numpy as np
import torch

from ggforge.runtime.gpu import fused_kernels as FK
from ggforge.runtime.gpu import ops
from ggforge.runtime.gpu.attn_kernels import decode_attention
from ggforge.runtime.layers import ATTEND_MAX_TOKENS, gelu_table, rope_cache

UBATCH = 512          # prompt tokens per pass (bounds attention scratch and the SWA ring)
ATTN_BUCKET = 256     # decode graphs per multiple of this many cells of attention


def _rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    mean = ((x * x).double().sum(-1, keepdim=True) / x.shape[-1]).float()  # as ggml: squares in float
    y = x * (1.0 / torch.sqrt(mean + eps))
    return y if w is None else y * w


def _attention(q, keys, values, kv_pos, q_pos, scale: float, window: int) -> torch.Tensor:
    """Prompt attention, as the CPU backend (runtime.layers.attention): up to
    ATTEND_MAX_TOKENS queries in float64 (rounded once), more in float32. From an F16 cache
    the queries rounded to F16 before K.q, the softmax weights before the product with V."""
    if keys.dtype == torch.float16:
        q, keys = q.half().float(), keys.float()
    v_f16 = values.dtype == torch.float16
    values = values.float()
    n, n_head, _ = q.shape
    n_kv, n_head_kv, dv = values.shape
    g = n_head // n_head_kv
    masked = (kv_pos[None, :] > q_pos[:, None]) | (kv_pos[None, :] < 0)
    if window:
        masked |= (q_pos[:, None] - kv_pos[None, :]) >= window
    qh = q.reshape(n, n_head_kv, g, -1).permute(1, 2, 0, 3)          # (kv_h, g, n, d)
    kh = keys.permute(1, 2, 0)[:, None]                               # (kv_h, 1, d, n_kv)
    if not v_f16 and n <= ATTEND_MAX_TOKENS:   # the CPU's attention of a few tokens: float64
        s = torch.matmul(qh.double(), kh.double()) * float(np.float32(scale))
        s = s.masked_fill(masked, float("-inf"))
        e = torch.exp(s - s.amax(-1, keepdim=True))
        out = torch.matmul(e, values.double().permute(1, 0, 2)[:, None]) / e.sum(-1, keepdim=True)
        return out.float().permute(2, 0, 1, 3).reshape(n, n_head * dv)
    scores = torch.matmul(qh, kh) * scale
    scores = scores.masked_fill(masked, float("-inf"))
    scores = scores - scores.amax(-1, keepdim=True)
    p = torch.exp(scores)
    p = p / p.sum(-1, keepdim=True, dtype=torch.float64).float()
    if v_f16:
        p = p.half().float()
    out = torch.matmul(p, values.permute(1, 0, 2)[:, None])           # (kv_h, g, n, dv)
    return out.permute(2, 0, 1, 3).reshape(n, n_head * dv)


class GpuCache:
    """Keys, values and the position held by each cell, for the device layers."""

    def __init__(self, sizes: list[int], n_head_kv: int, head_dim: int, head_dim_v: int,
                 windows: list[int], device: torch.device, k_dtype=torch.float32, v_dtype=torch.float32):
        self.sizes, self.windows = sizes, windows
        self.k = [torch.zeros((n, n_head_kv, head_dim), dtype=k_dtype, device=device) for n in sizes]
        self.v = [torch.zeros((n, n_head_kv, head_dim_v), dtype=v_dtype, device=device) for n in sizes]
        self.pos = [torch.full((n,), -1, dtype=torch.int64, device=device) for n in sizes]
        self.hi = 0           # one past the highest position written
        self.graphs: dict[int, tuple] = {}   # decode graphs by attention length (CUDA)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def read_bytes(self, p: int) -> int:
        """Bytes of cache a decode step at position p reads: the attention bucket of each
        full-context layer, the whole ring of a sliding-window layer (keys, values and
        the position of each cell)."""
        total = 0
        for k, v, size, window in zip(self.k, self.v, self.sizes, self.windows):
            cells = size if window else min(size, (p // ATTN_BUCKET + 1) * ATTN_BUCKET)
            total += cells * (k[0].numel() * k.element_size() + v[0].numel() * v.element_size() + 8)
        return total

    def reusable(self, n: int) -> int:
        """How many leading positions (<= n) can be kept: a sliding-window ring may no
        longer hold the window before position n."""
        for size, window in zip(self.sizes, self.windows):
            if window and n > 0 and max(0, n - window + 1) < self.hi - size:
                return 0
        return n

    def truncate(self, n: int) -> None:
        for p in self.pos:
            p.masked_fill_(p >= n, -1)
        self.hi = min(self.hi, n)


class GpuLayers:
    """Layers ``first..n_layer-1`` of ``model`` (and the output head if ``head``)."""

    def __init__(self, model, first: int, head: bool, device: torch.device | str):
        self.device = torch.device(device)
        self.model, self.first, self.head = model, first, head
        c = self.config = model.config
        dev = self.device

        def vec(a):
            return None if a is None else torch.from_numpy(np.array(a, np.float32)).to(dev)

        self.layers = []
        for il in range(first, c.n_layer):
            L = model.layers[il]
            self.layers.append({
                "qkv": ops.GWeight.upload_group([L.wq, L.wk, L.wv], dev),
                "wo": ops.GWeight.upload(L.wo, dev),
                "gate_up": ops.GWeight.upload_group([L.gate, L.up], dev),
                "down": ops.GWeight.upload(L.down, dev),
                **{k: vec(getattr(L, k)) for k in (
                    "attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")},
                "bqkv": None if L.bq is None else vec(np.concatenate([L.bq, L.bk, L.bv])),
            })
        for L in self.layers:  # decode fuses glue and Q8_0 rounding (fused_kernels.py)
            L["fused"] = (all(len(g) == 1 and g[0].planes is not None for g in (L["qkv"], L["gate_up"]))
                          and L["wo"].planes is not None and L["down"].planes is not None
                          and c.head_dim_v % 32 == 0)
        if head:
            self.output = ops.GWeight.upload(model.output, dev)
            self.output_norm = vec(model.output_norm)
        self._ropes: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._gelu_table = torch.from_numpy(gelu_table()).to(dev)
        self.use_graphs = self.device.type == "cuda"

    @property
    def nbytes(self) -> int:
        total = sum(w.nbytes for L in self.layers for v in L.values()
                    for w in (v if isinstance(v, list) else [v]) if isinstance(w, ops.GWeight))
        return total + (self.output.nbytes if self.head else 0)

    def host_matmul(self, x: np.ndarray, w) -> np.ndarray:
        """x @ W.T for a weight of a CPU layer (a large batch): the weight is copied to the
        device for this product only, as llama.cpp does; the result comes back."""
        gw = ops.GWeight.upload(w, self.device)
        xt = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)
        return ops.matmul(xt, gw).cpu().numpy()

    # -- cache and rope tables --------------------------------------------------------
    def new_cache(self, n_ctx: int, k_dtype=np.float32, v_dtype=np.float32) -> GpuCache:
        """The device layers' cache; keys and values float32 or float16 (--cache-type-k/v)."""
        c = self.config
        sizes, windows = [], []
        for il in range(self.first, c.n_layer):
            swa = c.is_swa(il)
            sizes.append(min(n_ctx, c.sliding_window + UBATCH) if swa else n_ctx)
            windows.append(c.sliding_window if swa else 0)
        self._rope_tables(n_ctx)
        tt = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}
        return GpuCache(sizes, c.n_head_kv, c.head_dim, c.head_dim_v, windows, self.device,
                        tt[np.dtype(k_dtype)], tt[np.dtype(v_dtype)])

    def _rope_tables(self, n_ctx: int) -> None:
        """cos/sin for positions 0..n_ctx-1 per rope kind, computed as the CPU does."""
        c = self.config
        pos = np.arange(n_ctx)
        for swa in {c.is_swa(il) for il in range(self.first, c.n_layer)}:
            have = self._ropes.get(swa)
            if have is not None and have[0].shape[0] >= n_ctx:
                continue
            base, scale = (c.rope_base_swa, 1.0) if swa else (c.rope_base, c.rope_scale)
            cos, sin = rope_cache(pos, c.n_rot, base, scale, self.model.rope_freqs)
            self._ropes[swa] = (torch.from_numpy(cos).to(self.device),
                                torch.from_numpy(sin).to(self.device))

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: np.ndarray, p0: int, cache: GpuCache, all_logits: bool) -> np.ndarray:
        """Hidden states x (n, n_embd) at positions p0.. -> hidden states, or logits when
        this holds the head ((n, n_vocab) with all_logits, else (1, n_vocab))."""
        n = x.shape[0]
        outs = []
        for s in range(0, n, UBATCH):
            xs = x[s:s + UBATCH]
            last = s + UBATCH >= n
            if xs.shape[0] == 1 and self.use_graphs:
                y = self._decode_graph(xs, p0 + s, cache)
            else:
                pos = torch.arange(p0 + s, p0 + s + xs.shape[0], device=self.device)
                xt = torch.from_numpy(np.ascontiguousarray(xs, np.float32)).to(self.device)
                y = self._run(xt, pos, cache, p0 + s + xs.shape[0], all_logits or not last)
            outs.append(y)
            cache.hi = max(cache.hi, p0 + s + xs.shape[0])
        y = torch.cat(outs) if len(outs) > 1 else outs[0]
        if self.head and not all_logits:
            y = y[-1:]
        return y.cpu().numpy()

    def _run(self, x: torch.Tensor, pos: torch.Tensor, cache: GpuCache, n_attn: int,
             all_rows: bool) -> torch.Tensor:
        """The device layers for x at positions pos; attention reads the first n_attn
        cells of the full-context layers (> the last position)."""
        c = self.config
        pend = None   # the last layer's FFN output and post-FFN norm, not yet added to x
        for i, L in enumerate(self.layers):
            x, pend = self._layer(self.first + i, L, x, pend, pos, cache, i, n_attn)
        if not self.head:
            f, w = pend
            return x + (f if w is None else _rms_norm(f, w, c.eps))
        if not all_rows:
            x, pend = x[-1:], (pend[0][-1:], pend[1])
        # the last residual add and the output norm in one kernel, rounded for Q8_0 planes
        q8 = self.output.planes is not None
        _, *h = FK.norm(x.contiguous(), self.output_norm, c.eps, pend[0].contiguous(), pend[1], quant=q8)
        logits = ops.matmul_q8(*h, self.output) if q8 else ops.matmul(h[0], self.output)
        if c.final_softcap:
            logits = torch.tanh(logits * (1.0 / c.final_softcap)) * c.final_softcap
        return logits

    def _layer(self, il: int, L: dict, x: torch.Tensor, pend: tuple | None, pos: torch.Tensor,
               cache: GpuCache, i: int, n_attn: int) -> tuple[torch.Tensor, tuple]:
        """One layer; returns (x, (f, w)): the FFN output f and the post-FFN norm w are left
        for the next layer's norm kernel to add. ``pend`` is the previous layer's pair."""
        c = self.config
        kc, vc, pc = cache.k[i], cache.v[i], cache.pos[i]
        # the decode attention kernel: not from an F16 value cache, whose softmax weights the
        # CPU rounds after normalizing (torch's attention below does the same)
        kernel = x.shape[0] == 1 and vc.dtype == torch.float32
        q8 = L["fused"] and kernel   # decode through Q8_0 planes: rounded activations
        x, *h = FK.norm(x, L["attn_norm"], c.eps, *(pend or (None, None)), quant=q8)
        qkv = ops.matmul_q8(*h, L["qkv"][0]) if q8 else ops.matmul_group(h[0], L["qkv"])
        size, window = cache.sizes[i], cache.windows[i]
        cos_t, sin_t = self._ropes[c.is_swa(il)]
        q = FK.prep(qkv, pos, cos_t, sin_t, kc, vc, pc, L["bqkv"], L["q_norm"], L["k_norm"],
                    c.n_head, c.n_head_kv, c.head_dim, c.head_dim_v, c.eps, c.traits.rope,
                    c.attn_scale if c.traits.q_scale_on_q else None, size)
        m = size if window else min(size, n_attn)
        scale = 1.0 if c.traits.q_scale_on_q else c.attn_scale
        if kernel:   # decode: two Triton launches reading the cache in place
            a = decode_attention(q, kc, vc, pc, pos, scale, window, m, quant=q8)
        else:
            a = _attention(q, kc[:m], vc[:m], pc[:m], pos, scale, window)
        o = ops.matmul_q8(*a, L["wo"]) if q8 else ops.matmul(a, L["wo"])
        x, *h = FK.mid(x, o, L["post_attn_norm"], L["ffn_norm"], c.eps, quant=q8)
        gu = ops.matmul_q8(*h, L["gate_up"][0]) if q8 else ops.matmul_group(h[0], L["gate_up"])
        g = FK.act(gu, c.n_ff, c.traits.act, self._gelu_table, quant=q8)
        f = ops.matmul_q8(*g, L["down"]) if q8 else ops.matmul(g, L["down"])
        return x, (f, L["post_ffn_norm"])

    # -- CUDA graphs for decode ---------------------------------------------------------
    def _decode_graph(self, x: np.ndarray, p: int, cache: GpuCache) -> torch.Tensor:
        """One token through the device layers by replaying a CUDA graph, captured once per
        cache and attention length: full-context layers read the first n_attn cells, the
        position rounded up to ATTN_BUCKET (later cells are empty)."""
        n_attn = min(max(cache.sizes), (p // ATTN_BUCKET + 1) * ATTN_BUCKET)
        entry = cache.graphs.get(n_attn) or self._capture(x, p, cache, n_attn)
        graph, x_in, pos_in, out = entry
        x_in.copy_(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        pos_in.fill_(p)
        graph.replay()
        return out

    def _capture(self, x: np.ndarray, p: int, cache: GpuCache, n_attn: int) -> tuple:
        """Warm up (compiles kernels) on a side stream, then capture one decode step."""
        x_in = torch.zeros((1, self.config.n_embd), dtype=torch.float32, device=self.device)
        pos_in = torch.zeros((1,), dtype=torch.int64, device=self.device)
        x_in.copy_(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        pos_in.fill_(p)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compile kernels outside the capture
            self._run(x_in, pos_in, cache, n_attn, True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._run(x_in, pos_in, cache, n_attn, True)
        cache.graphs[n_attn] = (graph, x_in, pos_in, out)
        return cache.graphs[n_attn]
