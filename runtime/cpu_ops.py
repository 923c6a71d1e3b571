"""The CPU backend's operations for the decoder (runtime/decoder.py): numpy and the
compiled kernels of runtime/kernels, computed as ggml's CPU backend computes them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ggforge.runtime import kernels
from ggforge.runtime.kv_cache import KVCache
from ggforge.runtime.layers import ACTIVATIONS, apply_rope, attention, flash_attention, rms_norm, rope_cache

F32 = np.float32


@dataclass
class Layer:
    """One layer's weights as the file holds them (matrices still quantized)."""

    attn_norm: np.ndarray
    wq: kernels.QWeight
    wk: kernels.QWeight
    wv: kernels.QWeight
    wo: kernels.QWeight
    ffn_norm: np.ndarray
    gate: kernels.QWeight
    up: kernels.QWeight
    down: kernels.QWeight
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None


@dataclass
class Step:
    """One forward's state: positions, the cache, each layer's rope table."""

    pos: np.ndarray                 # (n,) positions of the tokens
    cache: KVCache
    ropes: dict                     # rope key -> (cos, sin) (n, n_rot / 2)
    layer: int = 0                  # the layer being run (its cache slot)


class CpuOps:
    """``matmul_hook(x, w)``, if given, replaces the product of a large batch (the
    products of CPU layers that llama.cpp's CUDA backend runs on the device).

    ``collect(w, x)``, if given, sees the input x (n, n_in) float32 of every product
    x @ W.T before it is computed (the importance matrix: runtime/imatrix.py)."""

    def __init__(self, config, rope_freqs: np.ndarray | None, matmul_hook=None, hook_min_rows: int = 0,
                 collect=None):
        self.c = config
        self.rope_freqs = rope_freqs
        self.hook, self.hook_min_rows = matmul_hook, hook_min_rows
        self.collect = collect
        self.in_head = False

    def step(self, pos: np.ndarray, cache: KVCache, ropes) -> Step:
        tables = {key: rope_cache(pos, self.c.n_rot, key[0], key[1], self.rope_freqs, self.c.rope_mscale)
                  for key in ropes}
        return Step(pos, cache, tables)

    # -- the decoder's operations -------------------------------------------------------
    def get_rows(self, w: kernels.QWeight, tokens: np.ndarray) -> np.ndarray:
        return kernels.get_rows(w, tokens)                           # (n, n_embd)

    def begin_layer(self, L: Layer, step: Step) -> None:
        self.in_head = False

    def begin_head(self, output) -> None:
        self.in_head = True         # the head's product stays on the CPU

    def matmul(self, x: np.ndarray, w: kernels.QWeight) -> np.ndarray:
        """x @ W.T."""
        if self.collect is not None:
            self.collect(w, x)
        if self.hook is not None and not self.in_head and x.shape[0] >= self.hook_min_rows:
            return self.hook(x, w)
        return kernels.matmul(x, w)

    def add_norm(self, x: np.ndarray, pend, w: np.ndarray):
        """x += [rms_norm(r) * r_w | r] for pend = (r, r_w); h = rms_norm(x) * w."""
        if pend is not None:
            r, r_w = pend
            x = x + (r if r_w is None else rms_norm(r, r_w, self.c.eps))
        return x, rms_norm(x, w, self.c.eps)

    def finish(self, x: np.ndarray, pend) -> np.ndarray:
        """The hidden state with the pending residual added (a segment's output)."""
        r, r_w = pend
        return x + (r if r_w is None else rms_norm(r, r_w, self.c.eps))

    def last_row(self, x: np.ndarray, pend):
        return x[-1:], None if pend is None else (pend[0][-1:], pend[1])

    def qkv(self, h: np.ndarray, L: Layer):
        return self.matmul(h, L.wq), self.matmul(h, L.wk), self.matmul(h, L.wv)

    def prep(self, qkv, L: Layer, s, step: Step):
        c, (q, k, v) = self.c, qkv
        n = q.shape[0]
        if L.bq is not None:
            q, k, v = q + L.bq, k + L.bk, v + L.bv
        q = q.reshape(n, c.n_head, c.head_dim)                       # (n, n_head, d)
        k = k.reshape(n, c.n_head_kv, c.head_dim)
        v = v.reshape(n, c.n_head_kv, c.head_dim_v)
        if L.q_norm is not None:
            q, k = rms_norm(q, L.q_norm, c.eps), rms_norm(k, L.k_norm, c.eps)
        cos, sin = step.ropes[s.rope]
        q = apply_rope(q, cos, sin, s.rope_mode)
        k = apply_rope(k, cos, sin, s.rope_mode)
        if s.q_scale is not None:
            q = q * F32(s.q_scale)
        keys, values = step.cache.store(s.index, step.pos[0], k, v, as_stored=step.cache.flash_attn)
        return q, keys, values

    def attend(self, qkv, s, step: Step) -> np.ndarray:
        q, keys, values = qkv
        cache = step.cache
        if cache.flash_attn:
            return flash_attention(q, keys, values, step.pos, s.attn_scale, s.window, cache.n_ctx,
                                   kernels.get_threads(), s.softcap)       # (n, n_head * dv)
        return attention(q, keys, values, step.pos, s.attn_scale, s.window,
                         k_f16=cache.k_f16, v_f16=cache.v_f16, softcap=s.softcap)  # (n, n_head * dv)

    def ffn_in(self, h: np.ndarray, L: Layer, act: str) -> np.ndarray:
        return ACTIVATIONS[act](self.matmul(h, L.gate)) * self.matmul(h, L.up)

    def softcap(self, logits: np.ndarray, cap: float) -> np.ndarray:
        cap = F32(cap)
        return np.tanh(logits * (F32(1.0) / cap)) * cap
