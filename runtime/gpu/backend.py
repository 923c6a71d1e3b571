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

from dataclasses import dataclass

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


def _attention(q, keys, values, kv_pos, q_pos, scale: float, window: int,
               softcap: float = 0.0) -> torch.Tensor:
    """Prompt attention, as the CPU backend (runtime.layers.attention): up to
    ATTEND_MAX_TOKENS queries in float64 (rounded once), more in float32. From an F16 cache
    the queries rounded to F16 before K.q, the softmax weights before the product with V.
    ``softcap`` (Gemma 2): K.q -> softcap * tanh(K.q / softcap) before the scale."""
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
        s = torch.matmul(qh.double(), kh.double())
        if softcap:
            cap = float(np.float32(softcap))
            s = torch.tanh(s / cap) * cap
        s = s * float(np.float32(scale))
        s = s.masked_fill(masked, float("-inf"))
        e = torch.exp(s - s.amax(-1, keepdim=True))
        out = torch.matmul(e, values.double().permute(1, 0, 2)[:, None]) / e.sum(-1, keepdim=True)
        return out.float().permute(2, 0, 1, 3).reshape(n, n_head * dv)
    scores = torch.matmul(qh, kh)
    if softcap:
        scores = torch.tanh(scores * float(np.float32(1.0) / np.float32(softcap))) * float(np.float32(softcap))
    scores = scores * scale
    scores = scores.masked_fill(masked, float("-inf"))
    scores = scores - scores.amax(-1, keepdim=True)
    p = torch.exp(scores)
    p = p / p.sum(-1, keepdim=True, dtype=torch.float64).float()
    if v_f16:
        p = p.half().float()
    out = torch.matmul(p, values.permute(1, 0, 2)[:, None])           # (kv_h, g, n, dv)
    return out.permute(2, 0, 1, 3).reshape(n, n_head * dv)


@dataclass
class DeviceLayer:
    """One layer's weights on the device: q|k|v and gate|up grouped (one launch each)."""

    qkv: list            # [GWeight] (one planar Q8_0 weight) or the three
    wo: ops.GWeight
    gate_up: list
    down: ops.GWeight
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    bqkv: torch.Tensor | None = None      # q|k|v's biases concatenated
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None
    fused: bool = False  # decode rounds activations to Q8_0 in the glue kernels


@dataclass
class DeviceStep:
    """One pass's state: positions, the cache, how many cells attention reads."""

    pos: torch.Tensor
    cache: "GpuCache"
    n_attn: int
    i: int = 0            # the layer's index among the device layers (its cache slot)
    kernel: bool = False  # decode attention in the Triton kernel


class GpuOps:
    """The decoder's operations on the device (runtime/decoder.py): fused glue kernels
    (fused_kernels.py), products from the quantized blocks (ops.py). An activation is a
    float32 tensor or, through Q8_0 planes at decode, a (quants, scales) pair that the
    glue kernel rounded for the next product."""

    def __init__(self, layers: "GpuLayers"):
        self.g = layers
        self.eps = layers.config.eps
        self.q8 = False     # the current layer's (or head's) glue kernels round to Q8_0

    def begin_layer(self, L: DeviceLayer, step: DeviceStep) -> None:
        # the decode attention kernel: not from an F16 value cache, whose softmax weights
        # the CPU rounds after normalizing (torch's attention does the same)
        step.kernel = step.pos.shape[0] == 1 and step.cache.v[step.i].dtype == torch.float32
        self.q8 = L.fused and step.kernel

    def begin_head(self, output: ops.GWeight) -> None:
        self.q8 = output.planes is not None

    def add_norm(self, x, pend, w):
        r, r_w = (None, None) if pend is None else pend
        x, *h = FK.norm(x.contiguous(), w, self.eps, None if r is None else r.contiguous(), r_w,
                        quant=self.q8)
        return x, tuple(h) if self.q8 else h[0]

    def finish(self, x, pend):
        f, w = pend
        return x + (f if w is None else _rms_norm(f, w, self.eps))

    def last_row(self, x, pend):
        return x[-1:], None if pend is None else (pend[0][-1:], pend[1])

    def matmul(self, h, w: ops.GWeight):
        return ops.matmul_q8(*h, w) if isinstance(h, tuple) else ops.matmul(h, w)

    def _group(self, h, group: list):
        return ops.matmul_q8(*h, group[0]) if isinstance(h, tuple) else ops.matmul_group(h, group)

    def qkv(self, h, L: DeviceLayer):
        return self._group(h, L.qkv)

    def prep(self, qkv, L: DeviceLayer, s, step: DeviceStep):
        c, cache, i = self.g.config, step.cache, step.i
        cos_t, sin_t = self.g.ropes[s.rope]
        return FK.prep(qkv, step.pos, cos_t, sin_t, cache.k[i], cache.v[i], cache.pos[i], L.bqkv,
                       L.q_norm, L.k_norm, c.n_head, c.n_head_kv, c.head_dim, c.head_dim_v, c.eps,
                       s.rope_mode, s.q_scale, cache.sizes[i])

    def attend(self, q, s, step: DeviceStep):
        cache, i = step.cache, step.i
        kc, vc, pc = cache.k[i], cache.v[i], cache.pos[i]
        window = cache.windows[i]
        m = cache.sizes[i] if window else min(cache.sizes[i], step.n_attn)
        if step.kernel:   # decode: two Triton launches reading the cache in place
            return decode_attention(q, kc, vc, pc, step.pos, s.attn_scale, window, m, quant=self.q8,
                                    softcap=s.softcap)
        return _attention(q, kc[:m], vc[:m], pc[:m], step.pos, s.attn_scale, window, s.softcap)

    def ffn_in(self, h, L: DeviceLayer, act: str):
        gu = self._group(h, L.gate_up)
        return FK.act(gu, self.g.config.n_ff, act, self.g.gelu_table, quant=self.q8)

    def softcap(self, logits, cap: float):
        return torch.tanh(logits * (1.0 / cap)) * cap


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

        self.decoder = model.decoder
        self.layers = []
        for il in range(first, c.n_layer):
            L = model.layers[il]
            qkv = ops.GWeight.upload_group([L.wq, L.wk, L.wv], dev)
            gate_up = ops.GWeight.upload_group([L.gate, L.up], dev)
            wo, down = ops.GWeight.upload(L.wo, dev), ops.GWeight.upload(L.down, dev)
            self.layers.append(DeviceLayer(
                qkv=qkv, wo=wo, gate_up=gate_up, down=down,
                **{k: vec(getattr(L, k)) for k in (
                    "attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")},
                bqkv=None if L.bq is None else vec(np.concatenate([L.bq, L.bk, L.bv])),
                # decode fuses glue and Q8_0 rounding (fused_kernels.py)
                fused=(all(len(g) == 1 and g[0].planes is not None for g in (qkv, gate_up))
                       and wo.planes is not None and down.planes is not None
                       and c.head_dim_v % 32 == 0)))
        if head:
            self.output = ops.GWeight.upload(model.output, dev)
            self.output_norm = vec(model.output_norm)
        self.ropes: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.gelu_table = torch.from_numpy(gelu_table()).to(dev)
        self.use_graphs = self.device.type == "cuda"

    @property
    def nbytes(self) -> int:
        total = sum(w.nbytes for L in self.layers for w in L.qkv + L.gate_up + [L.wo, L.down])
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
        windows = self.decoder.windows[self.first:]
        sizes = [min(n_ctx, w + UBATCH) if w else n_ctx for w in windows]
        self._rope_tables(n_ctx)
        tt = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}
        return GpuCache(sizes, c.n_head_kv, c.head_dim, c.head_dim_v, windows, self.device,
                        tt[np.dtype(k_dtype)], tt[np.dtype(v_dtype)])

    def _rope_tables(self, n_ctx: int) -> None:
        """cos/sin for positions 0..n_ctx-1 per rope table, computed as the CPU does."""
        c = self.config
        pos = np.arange(n_ctx)
        factors = self.model.rope_factors(n_ctx)
        if factors is not getattr(self, "_factors", None):   # Phi-3: long or short factors
            self.ropes.clear()
            self._factors = factors
        for key in self.decoder.ropes(self.first, c.n_layer):
            have = self.ropes.get(key)
            if have is not None and have[0].shape[0] >= n_ctx:
                continue
            cos, sin = rope_cache(pos, c.n_rot, key[0], key[1], factors, c.rope_mscale)
            self.ropes[key] = (torch.from_numpy(cos).to(self.device),
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
        dec, gops = self.decoder, GpuOps(self)
        step = DeviceStep(pos, cache, n_attn)
        pend = None   # the last layer's FFN output and post-FFN norm, not yet added to x
        for i, L in enumerate(self.layers):
            step.i = i
            x, pend = dec.layer(gops, self.first + i, L, x, pend, step)
        if not self.head:
            return gops.finish(x, pend)
        # the last residual add and the output norm in one kernel, rounded for Q8_0 planes
        return dec.head(gops, x, pend, self.output_norm, self.output, all_rows)

    def run_layer(self, i: int, x: torch.Tensor, pos: torch.Tensor, cache: GpuCache,
                  n_attn: int) -> torch.Tensor:
        """Device layer i alone (its hidden state out, residual added), for checks."""
        gops = GpuOps(self)
        step = DeviceStep(pos, cache, n_attn, i)
        x, pend = self.decoder.layer(gops, self.first + i, self.layers[i], x, None, step)
        return gops.finish(x, pend)

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
