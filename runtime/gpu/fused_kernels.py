"""Decode glue fused with the rounding of activations to Q8_0 (layers whose weights are all
Q8_0 planes): each kernel ends by writing int8 quants and scales, which the planar
matrix-vector kernel reads (q8_kernels._gemv with PRE), so no separate rounding launch.

* ``_norm_q8``: h = rms_norm(x) * w, rounded (the attention input).
* ``_mid_q8``: x += [rms_norm(o) * w_post], h = rms_norm(x) * w_ffn, rounded (FFN input).
* ``_act_q8``: act(gate) * up (SiLU, or ggml's fp16 GELU table), rounded (ffn_down input).

The arithmetic is the CPU backend's: squares in float32 summed in float64, the mean and
scale in float32 with correctly rounded sqrt and division; the GELU is the table lookup.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ggforge.runtime.gpu.q8_kernels import _round_q8_0, act_buffers


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
def _store_q8(v, xq, xd, t, n, BN: tl.constexpr):
    """Round v (1, BN) (zero past n) to Q8_0 blocks and store row t."""
    q, d = _round_q8_0(v, 1, BN)
    k = tl.arange(0, BN)
    tl.store(xq + t * n + k, tl.reshape(q, (BN,)).to(tl.int8), mask=k < n)
    b = tl.arange(0, BN // 32)
    tl.store(xd + t * (n // 32) + b, tl.reshape(d, (BN // 32,)), mask=b < n // 32)


@triton.jit
def _norm_q8(x, w, xq, xd, n, eps, BN: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BN)[None, :]
    xv = tl.load(x + t * n + k, mask=k < n, other=0.0)
    wv = tl.load(w + k, mask=k < n, other=0.0)
    _store_q8(_rms(xv, wv, n, eps, True), xq, xd, t, n, BN)


@triton.jit
def _mid_q8(x, o, w_post, w_ffn, x_out, xq, xd, n, eps, HAS_POST: tl.constexpr, BN: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BN)[None, :]
    m = k < n
    ov = tl.load(o + t * n + k, mask=m, other=0.0)
    if HAS_POST:
        ov = _rms(ov, tl.load(w_post + k, mask=m, other=0.0), n, eps, True)
    xv = tl.load(x + t * n + k, mask=m, other=0.0) + ov
    tl.store(x_out + t * n + k, xv, mask=m)
    _store_q8(_rms(xv, tl.load(w_ffn + k, mask=m, other=0.0), n, eps, True), xq, xd, t, n, BN)


@triton.jit
def _act_q8(gu, table, xq, xd, n_ff, GELU: tl.constexpr, BK: tl.constexpr):
    """Program (token, 128-column chunk): quant blocks never straddle chunks."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    k = c * BK + tl.arange(0, BK)[None, :]
    g = tl.load(gu + t * 2 * n_ff + k)
    u = tl.load(gu + t * 2 * n_ff + n_ff + k)
    if GELU:
        bits = g.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        y = tl.load(table + bits)
        y = tl.where(g <= -10.0, 0.0, y)
        a = tl.where(g >= 10.0, g, y)
    else:
        a = g / (1.0 + tl.exp(-g))
    q, d = _round_q8_0(a * u, 1, BK)
    tl.store(xq + t * n_ff + k, tl.reshape(q, (1, BK)).to(tl.int8))
    tl.store(xd + t * (n_ff // 32) + c * (BK // 32) + tl.arange(0, BK // 32), tl.reshape(d, (BK // 32,)))


def norm_q8(x: torch.Tensor, w: torch.Tensor, eps: float):
    n_tok, n = x.shape
    xq, xd = act_buffers(n_tok, n, x.device)
    _norm_q8[(n_tok,)](x, w, xq, xd, n, float(eps), BN=triton.next_power_of_2(n), num_warps=4)
    return xq, xd


def mid_q8(x: torch.Tensor, o: torch.Tensor, w_post: torch.Tensor | None, w_ffn: torch.Tensor,
           eps: float):
    n_tok, n = x.shape
    x_out = torch.empty_like(x)
    xq, xd = act_buffers(n_tok, n, x.device)
    _mid_q8[(n_tok,)](x, o, w_ffn if w_post is None else w_post, w_ffn, x_out, xq, xd, n,
                      float(eps), HAS_POST=w_post is not None, BN=triton.next_power_of_2(n),
                      num_warps=4)
    return x_out, xq, xd


def act_q8(gu: torch.Tensor, n_ff: int, act: str, gelu_table: torch.Tensor):
    n_tok = gu.shape[0]
    xq, xd = act_buffers(n_tok, n_ff, gu.device)
    _act_q8[(n_tok, n_ff // 128)](gu, gelu_table, xq, xd, n_ff, GELU=act == "gelu", BK=128,
                                  num_warps=4)
    return xq, xd
