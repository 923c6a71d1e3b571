"""Decode attention in two launches: one token's queries against the cache, read in place.

The torch version (backend._attention) expands keys and values for grouped-query heads,
then runs two cuBLAS products and a softmax: about seven kernels a layer, each a few
microseconds, which for a small model cost more than its weights take to stream. Here:

* ``_attn_split``: program (kv head, split of the cells). The ``g`` query heads that share
  a kv head are one tile, so each key and value is read once; masked cells (a position
  after the query's, an empty cell, outside the sliding window) score -inf. An online
  softmax leaves a running max, sum and weighted sum of values per split.
* ``_attn_combine``: program (query head): the splits rescaled to one max and summed.

Float64 from the float32 queries, keys and values (exact products, float64 exp), rounded
to float32 once, as the CPU backend's attention of a few tokens (kernels/elementwise.attend):
the summation orders differ, the float32 results do not (but for a float64 result within
2^-29 of a float32 rounding boundary). From an F16 key cache the queries are rounded to
F16 as the CPU does. (An F16 value cache goes through
torch's attention instead: the CPU rounds the normalized softmax weights to F16, which a
one-pass online softmax does not have.)
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ggforge.runtime.gpu import pdl

from ggforge.runtime.gpu.q8_kernels import _round_q8_0

_FLOOR = tl.constexpr(-1e30)  # a finite "no score yet": exp(_FLOOR - m) is 0, never NaN


@triton.jit
def _attn_split(q, kc, vc, pc, qpos_p, pm, pl, pacc, scale, cap, window, m, n_head_kv, g,
                CPS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, G: tl.constexpr,
                DP: tl.constexpr, DVP: tl.constexpr, BN: tl.constexpr, K_F16: tl.constexpr,
                DOT: tl.constexpr = False, SOFTCAP: tl.constexpr = False):
    pdl.start()
    h = tl.program_id(0)
    s = tl.program_id(1)
    n_split = tl.num_programs(1)
    qpos = tl.load(qpos_p)
    gi = tl.arange(0, G)
    di = tl.arange(0, DP)
    ei = tl.arange(0, DVP)
    qt = tl.load(q + (h * g + gi)[:, None] * D + di[None, :],
                 mask=(gi[:, None] < g) & (di[None, :] < D), other=0.0)          # (G, DP)
    if K_F16:   # an F16 key cache: the queries rounded to F16, as the CPU backend does
        qt = qt.to(tl.float16).to(tl.float32)
    qt = qt.to(tl.float64)
    m_i = tl.full((G,), _FLOOR, tl.float64)
    l_i = tl.zeros((G,), tl.float64)
    acc = tl.zeros((G, DVP), tl.float64)
    lo = s * CPS
    hi = tl.minimum(lo + CPS, m)
    for c0 in range(0, CPS, BN):
        cells = lo + c0 + tl.arange(0, BN)
        valid = cells < hi
        cl = cells.to(tl.int64)
        kt = tl.load(kc + (cl * n_head_kv + h)[:, None] * D + di[None, :],
                     mask=valid[:, None] & (di[None, :] < D), other=0.0).to(tl.float64)  # (BN, DP)
        cp = tl.load(pc + cl, mask=valid, other=-1)
        ok = valid & (cp >= 0) & (cp <= qpos) & ((window == 0) | (qpos - cp < window))
        if DOT:
            sc = tl.dot(qt, tl.trans(kt))                                       # (G, BN)
        else:
            sc = tl.sum(qt[:, None, :] * kt[None, :, :], axis=2)                # (G, BN)
        if SOFTCAP:   # Gemma 2: cap * tanh(s / cap), tanh from exp in float64 (as the CPU's)
            t = sc / cap
            e = tl.exp(-2.0 * tl.abs(t))
            sc = tl.where(t < 0, -1.0, 1.0) * ((1.0 - e) / (1.0 + e)) * cap
        sc = sc * scale
        sc = tl.where(ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        vt = tl.load(vc + (cl * n_head_kv + h)[:, None] * DV + ei[None, :],
                     mask=valid[:, None] & (ei[None, :] < DV), other=0.0).to(tl.float64)  # (BN, DVP)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT:
            acc = acc * alpha[:, None] + tl.dot(p, vt)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
        m_i = m_new
    base = h * n_split + s
    tl.store(pm + base * G + gi, m_i)
    tl.store(pl + base * G + gi, l_i)
    tl.store(pacc + (base * G + gi)[:, None] * DVP + ei[None, :], acc)


@triton.jit
def _attn_combine(pm, pl, pacc, out, xq, xd, n_split, g, DV: tl.constexpr, G: tl.constexpr,
                  DVP: tl.constexpr, SP: tl.constexpr, SC: tl.constexpr, QUANT: tl.constexpr):
    pdl.start()
    hq = tl.program_id(0)
    h = hq // g
    j = hq % g
    si = tl.arange(0, SC)
    ei = tl.arange(0, DVP)
    top = tl.full((SC,), _FLOOR, tl.float64)
    for s0 in range(0, SP, SC):       # the splits' maxima (SP >= n_split), SC at a time
        top = tl.maximum(top, tl.load(pm + (h * n_split + s0 + si) * G + j,
                                      mask=s0 + si < n_split, other=_FLOOR))
    top = tl.max(top, axis=0)
    acc = tl.zeros((DVP,), tl.float64)
    ls = tl.zeros((SC,), tl.float64)
    for s0 in range(0, SP, SC):       # each split rescaled to the common max and summed
        sm = s0 + si < n_split
        base = (h * n_split + s0 + si) * G + j
        w = tl.exp(tl.load(pm + base, mask=sm, other=_FLOOR) - top)
        ls += tl.load(pl + base, mask=sm, other=0.0) * w
        accs = tl.load(pacc + base[:, None] * DVP + ei[None, :], mask=sm[:, None], other=0.0)
        acc += tl.sum(accs * w[:, None], axis=0)
    o = (acc / tl.sum(ls, axis=0)).to(tl.float32)
    if QUANT:   # the output projection's input, rounded to Q8_0 (DV a multiple of 32)
        q, d = _round_q8_0(tl.reshape(o, (1, DVP)), 1, DVP)
        tl.store(xq + hq * DV + ei, tl.reshape(q, (DVP,)).to(tl.int8), mask=ei < DV)
        b = tl.arange(0, DVP // 32)
        tl.store(xd + hq * (DV // 32) + b, tl.reshape(d, (DVP // 32,)), mask=b < DV // 32)
    else:
        tl.store(out + hq * DV + ei, o, mask=ei < DV)


# Settings (swept on an H100/H200 in 2026-12, per call in CUDA graphs; docs/gpu.md). DOT: the two products of a split as
# float64 tensor-core products (tl.dot; the query heads padded to 16 rows, BN >= 16);
# else broadcast products of a (G, BN, D) tile of TILE float64 elements, which past about
# 2,048 no longer fits in registers (255 and spills at 8,192 for d 128 on sm_90).
DOT = True
TILE = 2048
SPLIT_PROGRAMS = 128  # split the cells until there are about this many programs
WARPS = 4
COMBINE_SPLITS = 16   # splits a combine program reads at a time (SC)


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pc: torch.Tensor,
                     qpos: torch.Tensor, scale: float, window: int, m: int, quant: bool = False,
                     softcap: float = 0.0):
    """Attention of one token: q (1, n_head, d) against the first m cells of the cache
    (kc (cells, n_head_kv, d), vc (cells, n_head_kv, dv), pc (cells,) positions, -1 empty);
    qpos (1,) the token's position. Returns (1, n_head * dv), or with ``quant`` that
    rounded to Q8_0: (quants int8, scales float32) (dv a multiple of 32). ``softcap``: the
    scores q.k become softcap * tanh(q.k / softcap) before the scale (Gemma 2)."""
    n_head, d = q.shape[1], q.shape[2]
    n_head_kv, dv = vc.shape[1], vc.shape[2]
    g = n_head // n_head_kv
    DP, DVP = triton.next_power_of_2(d), triton.next_power_of_2(dv)
    dot = DOT and min(DP, DVP) >= 16    # tl.dot's smallest tile
    if dot:
        G, bn = max(16, triton.next_power_of_2(g)), 16
    else:
        G = max(2, triton.next_power_of_2(g))
        bn = max(2, min(64, TILE // (G * max(DP, DVP))))
    n_split = max(1, min(triton.cdiv(m, bn), triton.cdiv(SPLIT_PROGRAMS, n_head_kv)))
    per = triton.cdiv(triton.cdiv(m, n_split), bn) * bn
    n_split = triton.cdiv(m, per)
    dev = q.device
    pm = torch.empty((n_head_kv, n_split, G), dtype=torch.float64, device=dev)
    pl = torch.empty_like(pm)
    pacc = torch.empty((n_head_kv, n_split, G, DVP), dtype=torch.float64, device=dev)
    # the scale as the CPU takes it, float32 (as backend._attention): the device rounds a
    # float argument so, Triton's interpreter would keep it in double
    _attn_split[(n_head_kv, n_split)](q.contiguous(), kc, vc, pc, qpos, pm, pl, pacc,
                                      float(np.float32(scale)), float(np.float32(softcap or 1.0)),
                                      int(window), m, n_head_kv, g, CPS=per, D=d, DV=dv, G=G,
                                      DP=DP, DVP=DVP, BN=bn, K_F16=kc.dtype == torch.float16, DOT=dot,
                                      SOFTCAP=bool(softcap),
                                      num_warps=WARPS, enable_fp_fusion=False, **pdl.launch())
    out = torch.empty((1, n_head * dv), dtype=torch.float32, device=dev)
    xq = torch.empty((1, n_head * dv), dtype=torch.int8, device=dev) if quant else out
    xd = torch.empty((1, n_head * dv // 32), dtype=torch.float32, device=dev) if quant else out
    sp = max(2, triton.next_power_of_2(n_split))
    _attn_combine[(n_head,)](pm, pl, pacc, out, xq, xd, n_split, g, DV=dv, G=G, DVP=DVP,
                             SP=sp, SC=min(sp, COMBINE_SPLITS), QUANT=quant, num_warps=4,
                             enable_fp_fusion=False, **pdl.launch())
    return (xq, xd) if quant else out
