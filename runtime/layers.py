"""The element-wise and attention pieces of the forward pass, computed as ggml's CPU
backend computes them (float32, its accumulation and rounding choices), so that our logits
follow llama.cpp's closely.

The arithmetic is written here as numpy expressions; the norms, the GELU gate, RoPE and the
attention of a few tokens run as compiled kernels (kernels/elementwise.py) that do the same
float32 operations in one pass, because at decode these vectors are small and numpy's
per-call overhead would cost more than the layer's matrix products.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ggforge.runtime.kernels import elementwise as ew
from ggforge.runtime.kernels import flash_attn as fa
from ggforge.runtime.kernels.threads import run_rows

F32 = np.float32
# Up to this many query tokens attention runs in the compiled kernel; beyond, numpy's
# batched matrix products are faster.
ATTEND_MAX_TOKENS = 16


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """ggml_rms_norm (squares summed in double, mean and scale in float) times `weight`:
    y = x * (1 / sqrt(float(sum(double(x * x)) / n) + eps)) * weight."""
    # x: (..., n)
    if weight is None:
        mean = (np.sum((x * x).astype(np.float64), axis=-1, keepdims=True) / x.shape[-1]).astype(F32)
        return x * (F32(1.0) / np.sqrt(mean + F32(eps))).astype(F32)
    rows = np.ascontiguousarray(x, F32).reshape(-1, x.shape[-1])   # (tokens [x heads], n)
    out = np.empty_like(rows)
    ew.rms_norm_rows(rows, np.ascontiguousarray(weight, F32), F32(eps), out)
    return out.reshape(x.shape)


def silu(x: np.ndarray) -> np.ndarray:
    """x / (1 + exp(-x)) in float64, rounded once (the GPU's exp then gives the same
    float32; float32 exp differs between libraries in the last bit)."""
    x64 = x.astype(np.float64)
    return (x64 / (1.0 + np.exp(-x64))).astype(F32)


def _gelu_fp16(xf: np.ndarray) -> np.ndarray:
    """The tanh approximation of GELU at fp16 values ``xf``, rounded to fp16."""
    c = F32(0.7978845608028654)  # sqrt(2/pi)
    g = F32(0.5) * xf * (F32(1.0) + np.tanh(c * xf * (F32(1.0) + F32(0.044715) * xf * xf)))
    return g.astype(np.float16).astype(F32)


def gelu_fp16_table(x: np.ndarray) -> np.ndarray:
    """ggml's CPU GELU: the tanh approximation looked up at fp16(x), stored as fp16."""
    if x.dtype == F32:
        flat = np.ascontiguousarray(x).reshape(-1)
        out = np.empty_like(flat)
        ew.gelu(flat, gelu_table(), out)
        return out.reshape(x.shape)
    y = _gelu_fp16(x.astype(np.float16).astype(F32))
    y = np.where(x <= F32(-10.0), F32(0.0), y)
    return np.where(x >= F32(10.0), x, y)


@lru_cache(maxsize=1)
def gelu_table() -> np.ndarray:
    """_gelu_fp16 at every fp16 bit pattern (65536,): ggml_table_gelu_f16."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _gelu_fp16(np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(F32))


ACTIVATIONS = {"silu": silu, "gelu": gelu_fp16_table}


def rope_cache(positions: np.ndarray, n_rot: int, base: float, scale: float,
               freq_factors: np.ndarray | None, mscale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (n_tokens, n_rot/2) as ggml_rope_cache_init builds them: theta starts at the
    position and is multiplied by base^(-2/n_rot) once per pair, in float32; cos and sin
    are multiplied by ``mscale`` (the file's rope.scaling.attn_factor: Phi-3 longrope).

    Every position's row depends on that position only: rows come from a table of the
    positions 0..2^k - 1, built once per setting (and again, twice as long, when a
    position is past its end)."""
    positions = np.asarray(positions)
    if mscale != 1.0:
        cos, sin = rope_cache(positions, n_rot, base, scale, freq_factors)
        return cos * F32(mscale), sin * F32(mscale)
    if positions.size == 0 or positions.min() < 0:
        return _rope_rows(positions, n_rot, base, scale, freq_factors)
    key = (n_rot, float(base), float(scale), None if freq_factors is None else freq_factors.tobytes())
    cos, sin = _ROPE_TABLES.get(key, (None, None))
    if cos is None or positions.max() >= cos.shape[0]:
        size = 1 << max(8, int(positions.max()).bit_length())
        cos, sin = _rope_rows(np.arange(size), n_rot, base, scale, freq_factors)
        if len(_ROPE_TABLES) >= 8:
            _ROPE_TABLES.clear()
        _ROPE_TABLES[key] = cos, sin
    return cos[positions], sin[positions]


_ROPE_TABLES: dict = {}


def _rope_rows(positions: np.ndarray, n_rot: int, base: float, scale: float,
               freq_factors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
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
    if x.ndim == 3 and x.dtype == F32 and cos.dtype == F32:
        x = np.ascontiguousarray(x)
        out = np.empty_like(x)
        ew.rope(x, np.ascontiguousarray(cos), np.ascontiguousarray(sin), int(mode != "norm"), out)
        return out
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


UBATCH = 512   # llama.cpp's default n_ubatch: a prompt's attention runs in steps of this many


def flash_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, scale: float,
                    window: int, n_ctx: int, n_threads: int, softcap: float = 0.0) -> np.ndarray:
    """llama.cpp's CPU flash attention over an F16 cache (kernels/flash_attn.py), the
    queries in its micro-batches of UBATCH: per step, the cells it views are the cache's
    first max(256, used rounded up to 256) (at most n_ctx), and the step's size picks the
    path (64 queries or more: tiles; one query over 512 cells or more: a chunk per thread,
    ``n_threads`` of them, as llama.cpp's threads split them). The query heads are shared
    out over the kernel threads.

    q (n_tokens, n_head, d) float32; k, v (n_kv, n_head_kv, d) float16 as the cache stores
    them (float32 holding F16 values is taken too). ``softcap`` (Gemma 2): the scores
    become softcap * tanh(score / softcap), as ggml folds it: the scale divided by softcap,
    then softcap * tanhf(s * scale)."""
    if softcap:
        scale = F32(scale) / F32(softcap)

    n_tok, n_head, _ = q.shape
    dv = v.shape[2]
    out = np.empty((n_tok, n_head * dv), F32)
    q16 = q.astype(np.float16).astype(F32)            # from_float of F16: nearest even
    k, v = (np.ascontiguousarray(a, np.float16).view(np.uint16) for a in (k, v))
    work = k.nbytes + v.nbytes
    for u0 in range(0, n_tok, UBATCH):
        u1 = min(n_tok, u0 + UBATCH)
        used = int(q_pos[u1 - 1]) + 1
        n_view = min(n_ctx, max(256, -(-used // 256) * 256))
        pos = np.ascontiguousarray(q_pos[u0:u1], np.int64)
        if u1 - u0 >= fa.TILE_Q:
            args = (np.ascontiguousarray(q[u0:u1]), k, v, pos, F32(scale), int(window), n_view,
                    fa.simd_lanes(), F32(softcap), out[u0:u1])
            run_rows(fa.attend_tiles, args, n_head, work * (u1 - u0))
        else:
            args = (np.ascontiguousarray(q16[u0:u1]), k, v, pos, F32(scale), int(window), n_view,
                    int(n_threads), fa.simd_lanes(), F32(softcap), out[u0:u1])
            run_rows(fa.attend_chunks, args, n_head, work * (u1 - u0))
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, scale: float,
              window: int = 0, *, k_f16: bool = False, v_f16: bool = False,
              softcap: float = 0.0) -> np.ndarray:
    """Causal grouped-query attention over the cache.

    q: (n_tokens, n_head, d); k: (n_kv_tokens, n_head_kv, d); v: (n_kv_tokens, n_head_kv, dv);
    q_pos: (n_tokens,) positions of the queries; cache slot j holds position j.
    Returns (n_tokens, n_head * dv).

    ``k_f16`` / ``v_f16``: the keys / values come from an F16 cache. llama.cpp (without
    flash attention) then multiplies in F16 as ggml_mul_mat does: the queries are rounded
    to F16 before K.q, the softmax weights to F16 before the product with V.

    ``softcap`` (Gemma 2): the scores K.q become softcap * tanh(K.q / softcap) before the
    softmax (llama.cpp's graph: scale by 1/softcap, tanh, scale by softcap; the softmax's
    own scale after that).
    """
    n_tok, n_head, _ = q.shape
    n_kv, n_head_kv, dv = v.shape
    if k_f16:
        q = q.astype(np.float16).astype(F32)
    if n_tok <= ATTEND_MAX_TOKENS and q.dtype == k.dtype == v.dtype == F32:
        out = np.empty((n_tok, n_head * dv), F32)
        ew.attend(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v),
                  np.ascontiguousarray(q_pos, np.int64), F32(scale), int(window), bool(v_f16),
                  F32(softcap), out)
        return out
    group = n_head // n_head_kv
    kv_pos = np.arange(n_kv)
    masked = kv_pos[None, :] > q_pos[:, None]                       # (n_tokens, n_kv)
    if window:
        masked |= (q_pos[:, None] - kv_pos[None, :]) >= window
    masked = np.broadcast_to(masked, (group, n_tok, n_kv)).reshape(group * n_tok, n_kv)
    out = np.empty((n_tok, n_head_kv, group, dv), F32)
    for h in range(n_head_kv):  # one BLAS product per kv head: its group of query heads
        qh = q[:, h * group:(h + 1) * group].transpose(1, 0, 2).reshape(group * n_tok, -1)
        scores = qh @ k[:, h].T                                     # (g * n_tok, n_kv)
        if softcap:
            scores = np.tanh(scores * (F32(1.0) / F32(softcap))) * F32(softcap)
        scores *= F32(scale)
        scores[masked] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True, dtype=np.float64).astype(F32)
        if v_f16:
            scores = scores.astype(np.float16).astype(F32)
        out[:, h] = (scores @ v[:, h]).reshape(group, n_tok, dv).transpose(1, 0, 2)
    return out.reshape(n_tok, n_head * dv)
