"""llama.cpp's CPU flash attention over an F16 KV cache, with its arithmetic.

llama.cpp's default (``-fa auto``, F16 cache) computes attention with
``ggml_compute_forward_flash_attn_ext_f16`` (ggml-cpu/ops.cpp), which takes one of three
paths by the shape of the step:

- **one chunk** (a batch of fewer than 64 queries, or one query over fewer than 512 cache
  cells): per query and head, an online softmax over the visible cells. The query is
  rounded to F16; each score is ``ggml_vec_dot_f16`` of the F16 key and query (float32
  fused multiply-adds in SIMD lanes, then a fixed tree of adds) times the scale; the
  weighted values accumulate **in F16**: on a new maximum the accumulator is scaled by
  ``expf(Mold - M)`` and rounded to F16, then ``acc = f16(fma(v, expf(s - M), acc))``;
  the weight sum is ``S = fma(S, ms, vs)`` in float32; the output is ``f32(acc) * (1/S)``.
- **split cells** (one query over 512 or more cells): the cells are cut into one chunk per
  thread, each chunk done as above (its accumulator converted to float32), and the chunks
  combined in order: ``M = max``, both sides scaled by ``expf`` of their distance to it.
  The result depends on the thread count, as llama.cpp's does.
- **tiles** (a batch of 64 or more queries): float32 queries, keys and values, the cells in
  tiles of 64: scores as a float32 fused multiply-add chain over the head dimension, the
  tile's maximum folded into the running one, the weights by ggml's vectorized
  ``ggml_v_expf`` (its polynomial, per the build's vector width) summed a vector at a time
  into a float64, values accumulated in float32 as fma chains.

``lanes`` is the width of ggml's float32 SIMD vectors in the llama.cpp build being matched:
16 with AVX-512, 8 with AVX2 (:func:`simd_lanes` reads the CPU's flags, as a native build
of llama.cpp does).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import types

from ggforge.formats.jit import bits_f32, f32_bits, fma32, half, half_bits
from ggforge.runtime.kernels._jit import F, F4M, helper, i64, kernel

U = np.uint64
F1 = types.Array(types.float32, 1, "C")
F3 = types.Array(types.float32, 3, "C")
H3 = types.Array(types.uint16, 3, "C", readonly=True)   # the F16 cache's bits, as stored
P1 = types.Array(types.int64, 1, "C")
f32 = types.float32

TILE_Q = 64        # GGML_FA_TILE_Q: batches of this many queries take the tiled path
TILE_KV = 64       # GGML_FA_TILE_KV
SPLIT_MIN_CELLS = 512   # one query over this many cells takes the split path


@functools.cache
def simd_lanes() -> int:
    """ggml's float32 vector width on this CPU: 16 (AVX-512F), else 8 (AVX2)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return 8
    return 16 if "avx512f" in flags else 8


# ggml_v_expf's constants (ggml-cpu/vec.h)
_SHIFT = F(float.fromhex("0x1.8p23"))
_LOG2E = F(float.fromhex("0x1.715476p+0"))
_LN2_HI = F(float.fromhex("0x1.62e4p-1"))
_LN2_LO = F(float.fromhex("0x1.7f7d1cp-20"))
_C1, _C2, _C3 = F(float.fromhex("0x1.ffffecp-1")), F(float.fromhex("0x1.fffdb6p-2")), F(float.fromhex("0x1.555e66p-3"))
_C4, _C5 = F(float.fromhex("0x1.573e2ep-5")), F(float.fromhex("0x1.0e4020p-7"))


@helper
def _v_expf(x, lanes):
    """One lane of ggml_v_expf(x): the AVX-512 version (lanes 16) or the AVX2 one (8)."""
    z = fma32(x, _LOG2E, _SHIFT)
    n = z - _SHIFT
    b = fma32(-n, _LN2_LO, fma32(-n, _LN2_HI, x))
    u = b * b
    if lanes == 16:
        j = fma32(fma32(fma32(_C5, b, _C4), u, fma32(_C3, b, _C2)), u, fma32(_C1, b, F(1)))
        if abs(n) > F(192):
            return F(0) if n <= F(0) else F(np.inf)
        return F(np.float64(j) * np.float64(2.0) ** np.float64(n))      # _mm512_scalef_ps
    j = fma32(fma32(fma32(_C5, b, _C4), u, fma32(_C3, b, _C2)), u, _C1 * b)
    e = (np.int64(f32_bits(z)) << 23) & 0xFFFFFFFF
    k = bits_f32((e + 0x3F800000) & 0xFFFFFFFF)
    if not abs(n) > F(126):
        return fma32(j, k, k)
    g = 0x82000000 if n <= F(0) else 0
    s1 = bits_f32((g + 0x7F000000) & 0xFFFFFFFF)
    s2 = bits_f32((e - g) & 0xFFFFFFFF)
    if abs(n) > F(192):
        return s1 * s1
    return fma32(s2, j, s2) * s1


@helper
def _vector_sum(y, at, lanes):
    """The float32 sum of y[at:at + lanes] as ggml_vec_soft_max_f32 reduces a vector:
    _mm512_reduce_add_ps (GCC's tree) or the AVX2 extract/movehl/movehdup adds."""
    if lanes == 16:
        t = np.empty(8, np.float32)
        for i in range(8):
            t[i] = y[at + i + 8] + y[at + i]
        for i in range(4):
            t[i] = t[i + 4] + t[i]
        return (t[0] + t[2]) + (t[1] + t[3])
    t0, t1 = y[at + 4] + y[at], y[at + 5] + y[at + 1]
    t2, t3 = y[at + 6] + y[at + 2], y[at + 7] + y[at + 3]
    return (t0 + t2) + (t1 + t3)


@helper
def _f16(x):
    return half(half_bits(x))


@helper
def _dot_f16(x, y, n, lanes, acc):
    """ggml_vec_dot_f16 of x (n F16 bits) and the F16-valued float32 row y: four vectors of ``lanes``
    float32 accumulators fed by fma, reduced (0+=2, 1+=3, 0+=1, then the lanes as
    _mm512_reduce_add_ps or the AVX2 hadd sequence), the leftovers added in float64."""
    step = 4 * lanes
    n_main = n - n % step
    for j in range(4 * lanes):
        acc[j] = F(0)
    for i in range(0, n_main, step):
        for at in range(step):           # vector j = at // lanes, lane at % lanes
            acc[at] = fma32(half(x[U(i + at)]), y[U(i + at)], acc[at])   # U: no wraparound select
    for lane in range(lanes):
        acc[lane] = acc[lane] + acc[2 * lanes + lane]
        acc[lanes + lane] = acc[lanes + lane] + acc[3 * lanes + lane]
    for lane in range(lanes):
        acc[lane] = acc[lane] + acc[lanes + lane]
    if lanes == 16:
        for i in range(8):
            acc[i] = acc[i + 8] + acc[i]
        for i in range(4):
            acc[i] = acc[i + 4] + acc[i]
        r = (acc[0] + acc[2]) + (acc[1] + acc[3])
    else:
        for i in range(4):
            acc[i] = acc[i + 4] + acc[i]
        r = (acc[0] + acc[1]) + (acc[2] + acc[3])
    s = np.float64(r)
    for i in range(n_main, n):
        s += np.float64(half(x[i]) * y[i])
    return F(s)


@kernel(types.void(F3, H3, H3, P1, f32, i64, i64, i64, i64, f32, F4M, i64, i64))
def attend_chunks(q, k, v, q_pos, scale, window, n_view, n_threads, lanes, softcap, out, h0, h1):
    """The one-chunk and split-cell paths, for query heads h0..h1-1. q (n_tok, n_head, d)
    F16-valued float32; k, v (n_kv, n_head_kv, d) the cache's F16 bits; cells j < n_view
    visible where j <= q_pos and (window == 0 or q_pos - j < window); out (n_tok, n_head * dv).
    ``softcap`` != 0: s = softcap * tanhf(s * scale), the scale already divided by softcap
    (ggml's order)."""
    n_tok, n_head, d = q.shape
    n_head_kv, dv = v.shape[1], v.shape[2]
    group = n_head // n_head_kv
    split = n_tok == 1 and n_view >= SPLIT_MIN_CELLS
    n_chunks = n_threads if split else 1
    size = (n_view + n_chunks - 1) // n_chunks
    acc = np.empty(dv, np.float32)
    fin = np.empty(dv, np.float32)
    lanes_acc = np.empty(64, np.float32)
    for t in range(n_tok):
        p = q_pos[t]
        for h in range(h0, h1):
            hk = h // group
            m_fin, s_fin = F(-np.inf), F(0)
            for i in range(dv):
                fin[i] = F(0)
            for c in range(n_chunks):
                c0 = c * size
                c1 = min(c0 + size, n_view)
                m, s_sum = F(-np.inf), F(0)
                for i in range(dv):
                    acc[i] = F(0)
                for j in range(c0, c1):
                    if j > p or (window > 0 and p - j >= window):
                        continue
                    s = _dot_f16(k[j, hk], q[t, h], d, lanes, lanes_acc) * scale
                    if softcap != F(0):
                        s = softcap * np.tanh(s)
                    ms, vs = F(1), F(1)
                    if s > m:
                        m_old, m = m, s
                        ms = np.exp(m_old - m)
                        for i in range(dv):
                            acc[i] = _f16(acc[i] * ms)
                    else:
                        vs = np.exp(s - m)
                    for i in range(dv):
                        acc[i] = _f16(fma32(half(v[j, hk, i]), vs, acc[i]))
                    s_sum = fma32(s_sum, ms, vs)
                if not split:
                    inv = F(0) if s_sum == 0 else F(1) / s_sum
                    for i in range(dv):
                        out[t, h * dv + i] = acc[i] * inv
                    continue
                if s_sum == 0:
                    continue
                m_new = max(m_fin, m)
                old, new = np.exp(m_fin - m_new), np.exp(m - m_new)
                for i in range(dv):
                    fin[i] = fma32(fin[i], old, acc[i] * new)
                s_fin = fma32(s_fin, old, s_sum * new)
                m_fin = m_new
            if split:
                inv = F(0) if s_fin == 0 else F(1) / s_fin
                for i in range(dv):
                    out[t, h * dv + i] = fin[i] * inv


@kernel(types.void(F3, H3, H3, P1, f32, i64, i64, i64, f32, F4M, i64, i64))
def attend_tiles(q, k, v, q_pos, scale, window, n_view, lanes, softcap, out, h0, h1):
    """The tiled path, for query heads h0..h1-1: q float32 (n_tok, n_head, d); k, v the
    cache's F16 bits. As ggml, a tile's keys are widened and transposed once for all the
    queries, so that each score's fma chain over the head dimension runs for the tile's
    cells side by side; the values' fma chains over the cells run for the head dimension
    side by side: each element keeps ggml's order of operations. ``softcap`` as in
    attend_chunks: tanhf of the scaled scores, then times softcap."""
    n_tok, n_head, d = q.shape
    n_head_kv, dv = v.shape[1], v.shape[2]
    group = n_head // n_head_kv
    sc = np.empty(TILE_KV, np.float32)
    kt = np.empty((d, TILE_KV), np.float32)         # the tile's keys, transposed
    vt = np.empty((TILE_KV, dv), np.float32)
    acc = np.empty((n_tok, dv), np.float32)
    m = np.empty(n_tok, np.float32)
    s_sum = np.empty(n_tok, np.float32)
    for h in range(h0, h1):
        hk = h // group
        for t in range(n_tok):
            m[t], s_sum[t] = F(-np.inf), F(0)
            for i in range(dv):
                acc[t, i] = F(0)
        for c0 in range(0, n_view, TILE_KV):
            c1 = min(c0 + TILE_KV, n_view)
            n = c1 - c0
            if c0 > q_pos[n_tok - 1] or (window > 0 and c1 - 1 <= q_pos[0] - window):
                continue                                   # no query sees this tile
            for jj in range(n):
                for i in range(d):
                    kt[i, jj] = half(k[c0 + jj, hk, i])
                for i in range(dv):
                    vt[jj, i] = half(v[c0 + jj, hk, i])
            for t in range(n_tok):
                p = q_pos[t]
                for jj in range(n):
                    sc[jj] = F(0)
                for i in range(d):
                    qi = q[t, h, i]
                    for jj in range(n):
                        sc[jj] = fma32(qi, kt[i, jj], sc[jj])
                top = F(-np.inf)
                for jj in range(TILE_KV):
                    j = c0 + jj
                    if jj >= n or j > p or (window > 0 and p - j >= window):
                        sc[jj] = F(-np.inf)
                    else:
                        sc[jj] = sc[jj] * scale
                        if softcap != F(0):
                            sc[jj] = np.tanh(sc[jj]) * softcap
                        top = max(top, sc[jj])
                if top == -np.inf:
                    continue
                m_new = max(m[t], top)
                if m_new > m[t]:
                    ms = np.exp(m[t] - m_new)
                    for i in range(dv):
                        acc[t, i] = acc[t, i] * ms
                    s_sum[t] = s_sum[t] * ms
                m[t] = m_new
                for jj in range(TILE_KV):
                    sc[jj] = _v_expf(sc[jj] - m_new, lanes)
                tile_sum = 0.0
                for at in range(0, TILE_KV, lanes):
                    tile_sum += np.float64(_vector_sum(sc, at, lanes))
                s_sum[t] = F(np.float64(s_sum[t]) + tile_sum)
                for jj in range(n):
                    pj = sc[jj]
                    for i in range(dv):
                        acc[t, i] = fma32(pj, vt[jj, i], acc[t, i])
        for t in range(n_tok):
            inv = F(0) if s_sum[t] == 0 else F(1) / s_sum[t]
            for i in range(dv):
                out[t, h * dv + i] = acc[t, i] * inv
