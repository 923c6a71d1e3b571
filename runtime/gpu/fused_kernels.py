"""The glue between matrix products, one Triton kernel each (a program per token):

* ``_norm``: [x += r, or rms_norm(r) * r_w: the previous layer's FFN output after its
  post-FFN norm, or the attention output after its post-attention norm],
  h = rms_norm(x) * w (the attention or the FFN input, or the output head's).
* ``_act``: act(gate) * up (SiLU, or ggml's fp16 GELU table) (the ffn_down input).
* ``_prep``: q|k|v -> [bias], [q/k norms], rope, the cache write, the queries (a program
  per token and q|k head).

With ``QUANT`` (decode through layers whose weights are all Q8_0 planes) a kernel ends by
rounding h to Q8_0, int8 quants and scales that the planar matrix-vector kernel reads
(q8_kernels._gemv), so no separate rounding launch; else h is float32 and the product
rounds it as the weight's type needs.

The arithmetic is the CPU backend's: squares in float32 summed in float64, the mean and
scale in float32 with correctly rounded sqrt and division; the GELU is the table lookup.
Compiled without fused multiply-adds (enable_fp_fusion=False): each product is rounded
before a sum, as in the CPU's numba kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ggforge.runtime.gpu import pdl

from ggforge.runtime.gpu.q8_kernels import _round_q8_0, act_buffers

# warps a program of each glue kernel (swept on an H200, 2026-12: 4 warps within 10% of the best at 2,048-4,096 wide rows)
WARPS = {"norm": 4, "act": 4, "prep": 4}


@triton.jit
def _rms(x, w, n, eps, HAS_W: tl.constexpr):
    """x (1, BN) zero past n -> x * (1 / sqrt(mean(x^2) + eps)) [* w]."""
    s = tl.sum((x * x).to(tl.float64), axis=1, keep_dims=True)
    mean = (s / n).to(tl.float32)
    y = x * tl.math.div_rn(1.0 + 0 * mean, tl.math.sqrt_rn(mean + eps))
    if HAS_W:
        y = y * w
    return y


@triton.jit
def _store(v, xq, xd, t, n, QUANT: tl.constexpr, BN: tl.constexpr):
    """Row t of the result v (1, BN) (zero past n): rounded to Q8_0 blocks (int8 quants in
    xq, float32 scales in xd), or as float32 in xq."""
    k = tl.arange(0, BN)
    if QUANT:
        q, d = _round_q8_0(v, 1, BN)
        tl.store(xq + t * n + k, tl.reshape(q, (BN,)).to(tl.int8), mask=k < n)
        b = tl.arange(0, BN // 32)
        tl.store(xd + t * (n // 32) + b, tl.reshape(d, (BN // 32,)), mask=b < n // 32)
    else:
        tl.store(xq + t * n + k, tl.reshape(v, (BN,)), mask=k < n)


@triton.jit
def _norm(x, r, r_w, w, x_out, xq, xd, n, eps, HAS_R: tl.constexpr, R_NORM: tl.constexpr,
          QUANT: tl.constexpr, BN: tl.constexpr):
    pdl.start()
    t = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BN)[None, :]
    m = k < n
    xv = tl.load(x + t * n + k, mask=m, other=0.0)
    if HAS_R:   # the previous layer's residual add [after its post-FFN norm]
        rv = tl.load(r + t * n + k, mask=m, other=0.0)
        if R_NORM:
            rv = _rms(rv, tl.load(r_w + k, mask=m, other=0.0), n, eps, True)
        xv += rv
        tl.store(x_out + t * n + k, xv, mask=m)
    _store(_rms(xv, tl.load(w + k, mask=m, other=0.0), n, eps, True), xq, xd, t, n, QUANT, BN)


@triton.jit
def _act(gu, table, xq, xd, n_ff, GELU: tl.constexpr, QUANT: tl.constexpr, BK: tl.constexpr):
    """Program (token, BK-column chunk); quant blocks never straddle chunks."""
    pdl.start()
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    k = c * BK + tl.arange(0, BK)[None, :]
    m = k < n_ff
    g = tl.load(gu + t * 2 * n_ff + k, mask=m, other=0.0)
    u = tl.load(gu + t * 2 * n_ff + n_ff + k, mask=m, other=0.0)
    if GELU:
        bits = g.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        y = tl.load(table + bits)
        y = tl.where(g <= -10.0, 0.0, y)
        a = tl.where(g >= 10.0, g, y)
    else:
        g64 = g.to(tl.float64)   # as the CPU (layers.silu): float64, rounded once
        a = (g64 / (1.0 + tl.exp(-g64))).to(tl.float32)
    v = a * u
    if QUANT:
        q, d = _round_q8_0(v, 1, BK)
        tl.store(xq + t * n_ff + k, tl.reshape(q, (1, BK)).to(tl.int8))
        tl.store(xd + t * (n_ff // 32) + c * (BK // 32) + tl.arange(0, BK // 32), tl.reshape(d, (BK // 32,)))
    else:
        tl.store(xq + t * n_ff + k, v, mask=m)


def _out(n_tok: int, n: int, quant: bool, device) -> tuple:
    if quant:
        return act_buffers(n_tok, n, device)
    h = torch.empty((n_tok, n), dtype=torch.float32, device=device)
    return h, h


def norm(x: torch.Tensor, w: torch.Tensor, eps: float, r: torch.Tensor | None = None,
         r_w: torch.Tensor | None = None, quant: bool = True):
    """rms_norm(x') * w with x' = x [+ (rms_norm(r) * r_w if r_w else r)]: (x', quants,
    scales) when ``quant``, else (x', h)."""
    n_tok, n = x.shape
    xq, xd = _out(n_tok, n, quant, x.device)
    x_out = x if r is None else torch.empty_like(x)
    _norm[(n_tok,)](x, x if r is None else r, w if r_w is None else r_w, w, x_out, xq, xd, n,
                    float(eps), HAS_R=r is not None, R_NORM=r_w is not None, QUANT=quant,
                    BN=triton.next_power_of_2(n), num_warps=WARPS["norm"], enable_fp_fusion=False,
                    **pdl.launch())
    return (x_out, xq, xd) if quant else (x_out, xq)


def act(gu: torch.Tensor, n_ff: int, kind: str, gelu_table: torch.Tensor, quant: bool = True):
    """act(gate) * up from the fused gate|up product (n_tok, 2 n_ff): (quants, scales) when
    ``quant`` (n_ff a multiple of 32), else the float32 (n_tok, n_ff)."""
    n_tok = gu.shape[0]
    xq, xd = _out(n_tok, n_ff, quant, gu.device)
    bk = 128 if n_ff % 128 == 0 or not quant else 32
    _act[(n_tok, triton.cdiv(n_ff, bk))](gu, gelu_table, xq, xd, n_ff, GELU=kind == "gelu",
                                          QUANT=quant, BK=bk, num_warps=WARPS["act"], enable_fp_fusion=False,
                                          **pdl.launch())
    return (xq, xd) if quant else xq


@triton.jit
def _prep(qkv, pos_p, cos_t, sin_t, kc, vc, pc, bias, qn, kn, q_out, n_head, n_head_kv, size,
          eps, q_scale, D: tl.constexpr, DV: tl.constexpr, HALF: tl.constexpr,
          DP: tl.constexpr, DVP: tl.constexpr, NEOX: tl.constexpr,
          HAS_B: tl.constexpr, HAS_NORM: tl.constexpr, QSCALE: tl.constexpr):
    """Program (t, h) (a token, a head row): from its q|k|v row to the cache and the queries.
    Row h < n_head is query head h, the next n_head_kv rows key heads: [+ bias], [per-head
    RMS norm], rope (each element and its pair partner, loaded separately, go through the
    same arithmetic), [x attn scale for q]; programs h < n_head_kv also copy value head h,
    program h == 0 the position; keys, values and the position go to cell pos % size. The
    CPU backend's order of operations, no fused multiply-adds."""
    pdl.start()
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(pos_p + t)
    row = qkv + t * ((n_head + n_head_kv) * D + n_head_kv * DV)
    j = tl.arange(0, DP)[None, :]
    ok = j < D
    if NEOX:
        jp = tl.where(j < HALF, j + HALF, tl.where(j < 2 * HALF, j - HALF, j))
        pair = tl.where(j < HALF, j, j - HALF)
    else:
        jp = tl.where(j < 2 * HALF, j ^ 1, j)
        pair = j // 2
    first = (j == jp) | (j < jp)
    isq = h < n_head
    x = tl.load(row + h * D + j, mask=ok, other=0.0)
    xp = tl.load(row + h * D + jp, mask=ok, other=0.0)
    if HAS_B:
        x += tl.load(bias + h * D + j, mask=ok, other=0.0)
        xp += tl.load(bias + h * D + jp, mask=ok, other=0.0)
    if HAS_NORM:
        s = tl.sum((x * x).to(tl.float64), axis=1, keep_dims=True)
        r = tl.math.div_rn(1.0 + 0 * s.to(tl.float32), tl.math.sqrt_rn((s / D).to(tl.float32) + eps))
        w = tl.where(isq, tl.load(qn + j, mask=ok & isq, other=0.0),
                     tl.load(kn + j, mask=ok & (h >= n_head), other=0.0))
        wp = tl.where(isq, tl.load(qn + jp, mask=ok & isq, other=0.0),
                      tl.load(kn + jp, mask=ok & (h >= n_head), other=0.0))
        x = x * r * w
        xp = xp * r * wp
    rot = j < 2 * HALF
    c = tl.load(cos_t + pos * HALF + pair, mask=rot, other=1.0)
    sn = tl.load(sin_t + pos * HALF + pair, mask=rot, other=0.0)
    y = tl.where(rot, tl.where(first, x * c - xp * sn, xp * sn + x * c), x)
    slot = pos % size
    isk = (h >= n_head) & ok
    kh = tl.where(h >= n_head, h - n_head, 0)
    tl.store(kc + (slot * n_head_kv + kh) * D + j, y, mask=isk)
    if QSCALE:
        y = y * q_scale
    tl.store(q_out + (t * n_head + h) * D + j, y, mask=ok & isq)
    if h < n_head_kv:
        e = tl.arange(0, DVP)[None, :]
        okv = e < DV
        voff = (n_head + n_head_kv) * D
        v = tl.load(row + voff + h * DV + e, mask=okv, other=0.0)
        if HAS_B:
            v += tl.load(bias + voff + h * DV + e, mask=okv, other=0.0)
        tl.store(vc + (slot * n_head_kv + h) * DV + e, v, mask=okv)
    if h == 0:
        tl.store(pc + slot, pos)


def prep(qkv, pos, cos_t, sin_t, kc, vc, pc, bias, q_norm, k_norm, n_head: int, n_head_kv: int,
         d: int, dv: int, eps: float, rope: str, q_scale: float | None, size: int):
    """backend._attn_prep in one launch: queries (n, n_head, d); keys, values and positions
    written to the cache. ``bias`` is q|k|v's bias concatenated (or None), ``q_scale`` the
    attention scale when it multiplies the queries. A program per (token, q|k head row)."""
    n = qkv.shape[0]
    n_rot_half = cos_t.shape[1]
    q = torch.empty((n, n_head, d), dtype=torch.float32, device=qkv.device)
    _prep[(n, n_head + n_head_kv)](
        qkv, pos, cos_t, sin_t, kc, vc, pc, qkv if bias is None else bias,
        qkv if q_norm is None else q_norm, qkv if k_norm is None else k_norm, q,
        n_head, n_head_kv, size, float(eps), float(q_scale or 1.0), D=d, DV=dv,
        HALF=n_rot_half, DP=triton.next_power_of_2(d), DVP=triton.next_power_of_2(dv),
        NEOX=rope != "norm", HAS_B=bias is not None, HAS_NORM=q_norm is not None,
        QSCALE=q_scale is not None, num_warps=WARPS["prep"], enable_fp_fusion=False,
        **pdl.launch())
    return q
