"""The decoder's structure, written once for every family and every backend.

A layer is the same sequence of steps on the CPU and on a GPU:

    x += pending residual; h = rms_norm(x) * attn_norm
    q|k|v = h @ Wqkv; [+ bias]; [q/k RMS norms]; rope; [q * scale]; k, v -> the cache
    a = attention(q, cached keys and values); o = a @ Wo
    x += [rms_norm(o) * post_attn_norm | o]; h = rms_norm(x) * ffn_norm
    g = act(h @ Wgate) * (h @ Wup); f = g @ Wdown
    pending residual = [rms_norm(f) * post_ffn_norm | f]

A backend supplies the operations (``ops``: CPU in runtime/cpu_ops.py, CUDA in
runtime/gpu/backend.py) and fuses them as it likes: the FFN output stays "pending" (the
next norm adds it, one kernel on the GPU), and an op's result is opaque to the decoder
(the GPU returns activations already rounded for a Q8_0 product). Everything a family
changes in the graph is read here, from ModelConfig: the rope style and tables, where the
attention scale goes, the attention and final soft-caps, the activation, sliding windows
and the embedding scale. Which optional tensors a layer has (biases, q/k norms, post-norms) is data: the
weight is None when the file has none.

Partial offload is a list of segments, each a backend running a range of layers with its
part of the cache, the output head in the last one (runtime/model.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ggforge.runtime.config import ModelConfig

F32 = np.float32


@dataclass(frozen=True)
class LayerSpec:
    """What one layer's attention and FFN do, as the family and the file say."""

    index: int
    window: int                 # sliding window in tokens (0: the whole context)
    rope: tuple[float, float]   # (base, position scale): the key of the layer's rope table
    rope_mode: str              # "norm": pairs (2i, 2i+1); "neox": (i, i + n_rot/2)
    q_scale: float | None       # multiply the queries by this before attention (Gemma)
    attn_scale: float           # the scale inside the softmax (1.0 when q_scale is set)
    act: str                    # FFN gate activation: "silu" or "gelu"
    softcap: float = 0.0        # attention scores -> softcap * tanh(scores / softcap) (Gemma 2)


def layer_windows(c: ModelConfig) -> list[int]:
    """Each layer's sliding window (0 for full-context layers): what the KV cache of each
    layer must hold, for the backends' caches and the placement plan alike."""
    p = c.traits.swa_pattern
    swa = c.sliding_window > 0 and p > 0
    return [c.sliding_window if swa and il % p < p - 1 else 0 for il in range(c.n_layer)]


class Decoder:
    """The forward's structure for one model; backends call layer() and head()."""

    def __init__(self, config: ModelConfig):
        self.config = c = config
        t = c.traits
        self.windows = layer_windows(c)
        self.specs = [LayerSpec(
            index=il, window=w,
            rope=(c.rope_base_swa, 1.0) if w else (c.rope_base, c.rope_scale),
            rope_mode=t.rope,
            q_scale=c.attn_scale if t.q_scale_on_q else None,
            attn_scale=1.0 if t.q_scale_on_q else c.attn_scale,
            act=t.act,
            softcap=c.attn_softcap,
        ) for il, w in enumerate(self.windows)]
        self.embed_scale = F32(np.sqrt(F32(c.n_embd))) if t.embed_scale else None
        self.final_softcap = c.final_softcap

    def ropes(self, first: int, last: int) -> set[tuple[float, float]]:
        """The rope tables layers first..last-1 need."""
        return {s.rope for s in self.specs[first:last]}

    def embed(self, ops, tok_embd, tokens: np.ndarray):
        """The embedding rows of ``tokens`` (n, n_embd), scaled where the family does."""
        x = ops.get_rows(tok_embd, tokens)
        return x if self.embed_scale is None else x * self.embed_scale

    def layer(self, ops, il: int, L, x, pend, step):
        """Layer ``il`` on hidden states x; returns (x, pending FFN residual).

        ``L`` is the backend's weights of the layer, ``step`` its per-forward state
        (positions, cache), both opaque here."""
        s = self.specs[il]
        ops.begin_layer(L, step)
        x, h = ops.add_norm(x, pend, L.attn_norm)
        qkv = ops.qkv(h, L)
        q = ops.prep(qkv, L, s, step)      # bias, q/k norms, rope, q scale, K/V to the cache
        a = ops.attend(q, s, step)
        o = ops.matmul(a, L.wo)
        x, h = ops.add_norm(x, (o, L.post_attn_norm), L.ffn_norm)
        g = ops.ffn_in(h, L, s.act)
        f = ops.matmul(g, L.down)
        return x, (f, L.post_ffn_norm)

    def head(self, ops, x, pend, output_norm, output, all_rows: bool):
        """Logits from the last hidden states: (n, n_vocab), or (1, n_vocab) for the last
        row unless ``all_rows``."""
        if not all_rows:
            x, pend = ops.last_row(x, pend)
        ops.begin_head(output)
        _, h = ops.add_norm(x, pend, output_norm)
        logits = ops.matmul(h, output)
        if self.final_softcap:
            logits = ops.softcap(logits, self.final_softcap)
        return logits
