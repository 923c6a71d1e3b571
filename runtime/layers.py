"""The element-wise and attention pieces of the forward pass, computed as ggml's CPU
backend computes them (float32, its accumulation and rounding choices), so that our logits
follow llama.cpp's closely.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """ggml_rms_norm (squares summed in double, mean and scale in float) times `weight`."""
    # x: (..., n)
    mean = (np.sum((x * x).astype(np.float64), axis=-1, keepdims=True) / x.shape[-1]).astype(F32)
    scale = (F32(1.0) / np.sqrt(mean + F32(eps))).astype(F32)
    y = x * scale
    return y if weight is None else y * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (F32(1.0) + np.exp(-x))


def gelu_fp16_table(x: np.ndarray) -> np.ndarray:
    """ggml's CPU GELU: the tanh approximation looked up at fp16(x), stored as fp16."""
    xf = x.astype(np.float16).astype(F32)
    c = F32(0.7978845608028654)  # sqrt(2/pi)
    g = F32(0.5) * xf * (F32(1.0) + np.tanh(c * xf * (F32(1.0) + F32(0.044715) * xf * xf)))
    y = g.astype(np.float16).astype(F32)
    y = np.where(x <= F32(-10.0), F32(0.0), y)
    return np.where(x >= F32(10.0), x, y)


ACTIVATIONS = {"silu": silu, "gelu": gelu_fp16_table}


def rope_cache(positions: np.ndarray, n_rot: int, base: float, scale: float,
               freq_factors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (n_tokens, n_rot/2) as ggml_rope_cache_init builds them: theta starts at the
    position and is multiplied by base^(-2/n_rot) once per pair, in float32."""
    theta_scale = F32(np.power(F32(base), F32(-2.0) / F32(n_rot)))
    theta = positions.astype(F32)                                # (n_tokens,)
    out = np.empty((positions.shape[0], n_rot // 2), dtype=F32)
    for i in range(n_rot // 2):
        t = theta if freq_factors is None else theta / freq_factors[i]
        out[:, i] = t * F32(scale)
        theta = (theta * theta_scale).astype(F32)
    return np.cos(out), np.sin(out)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, mode: str) -> np.ndarray:
    """Rotate the first n_rot dims of every head. x: (n_tokens, n_heads, head_dim)."""
    n_rot = cos.shape[1] * 2
    c, s = cos[:, None, :], sin[:, None, :]                      # (n_tokens, 1, n_rot/2)
    out = x.copy()
    if mode == "norm":      # pairs (2i, 2i+1)
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = x0 * c - x1 * s
        out[..., 1:n_rot:2] = x0 * s + x1 * c
    else:                   # neox: pairs (i, i + n_rot/2)
        h = n_rot // 2
        x0, x1 = x[..., :h], x[..., h:n_rot]
        out[..., :h] = x0 * c - x1 * s
        out[..., h:n_rot] = x0 * s + x1 * c
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, scale: float,
              window: int = 0) -> np.ndarray:
    """Causal grouped-query attention over the cache.

    q: (n_tokens, n_head, d); k: (n_kv_tokens, n_head_kv, d); v: (n_kv_tokens, n_head_kv, dv);
    q_pos: (n_tokens,) positions of the queries; cache slot j holds position j.
    Returns (n_tokens, n_head * dv).
    """
    n_tok, n_head, _ = q.shape
    n_kv, n_head_kv, dv = v.shape
    group = n_head // n_head_kv
    kv_pos = np.arange(n_kv)
    masked = kv_pos[None, :] > q_pos[:, None]                       # (n_tokens, n_kv)
    if window:
        masked |= (q_pos[:, None] - kv_pos[None, :]) >= window
    qh = q.reshape(n_tok, n_head_kv, group, -1).transpose(1, 2, 0, 3)   # (kv_h, g, n_tok, d)
    kh = k.transpose(1, 2, 0)[:, None]                                  # (kv_h, 1, d, n_kv)
    scores = (qh @ kh) * F32(scale)                                     # (kv_h, g, n_tok, n_kv)
    scores = np.where(masked, F32(-np.inf), scores)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True, dtype=np.float64).astype(F32)
    out = p @ v.transpose(1, 0, 2)[:, None]                             # (kv_h, g, n_tok, dv)
    return out.transpose(2, 0, 1, 3).reshape(n_tok, n_head * dv)
