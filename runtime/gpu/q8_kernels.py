"""Q8_0 weights in planes, multiplied in integers as ggml does.

At upload the file's 34-byte blocks are regrouped into a plane of quants (int8,
n_out x n_in) and a plane of scales (fp16, n_out x n_in/32): the same bytes, but rows of
quants are contiguous and aligned, so a warp reads them with 16-byte loads.

The activations are rounded to Q8_0 blocks (llama.cpp's vec_dot_type for Q8_0) and each
block's 32 products are summed exactly in int32, then scaled by d_w * d_x: ggml's
``vec_dot_q8_0_q8_0`` arithmetic. The decode kernels add the blocks' float32 steps in
float64 and round once, as the CPU's row kernels (kernels/_rows.py) do, so the results
are the CPU's bit for bit although the orders differ; the prefill kernel sums in float32.

The activations are rounded once per product (``_quant_act``, or the glue kernel before
it: fused_kernels.py) into int8 quants and float32 scales; rounding them inside every
program of the product cost 3 to 4 times the product (docs/gpu.md).

* ``_gemv``: decode. Each program owns ``BM`` rows; four int8 products and their sum are
  one ``dp4a`` instruction on 32-bit words of the planes.
* ``_gemm``: prefill. Int8 ``tl.dot`` tiles (tensor cores) give each block's integer sums.
* ``_gemv_q5_0``: decode of Q5_0 and Q4_0 rows against the same rounded activations, from
  their blocks as padded at upload (type_facts.FACTS: 24 and 20 bytes, so words are
  aligned); the nibbles (and fifth bits) unpacked into int8 words for ``dp4a``. Prefill
  of these types reads the padded blocks byte-wise (triton_kernels._gemm).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ggforge.runtime.gpu import pdl, settings

from ggforge.runtime.gpu.triton_kernels import _rne

_INTERPRET = tl.constexpr(settings.INTERPRET)


@triton.jit
def _round_q8_0(x, R: tl.constexpr, BK: tl.constexpr):
    """x (R, BK) float32 -> (quants as float32 (R, BK/32, 32), scales (R, BK/32, 1)), as
    quantize_row_q8_0 (AVX): d = fp16(amax / 127), q = rne(x * (127 / amax))."""
    xb = tl.reshape(x, (R, BK // 32, 32))
    amax = tl.max(tl.abs(xb), axis=2, keep_dims=True)
    d = tl.math.div_rn(amax, 127.0).to(tl.float16).to(tl.float32)
    iscale = tl.where(amax != 0, tl.math.div_rn(127.0 + 0 * amax, tl.where(amax != 0, amax, 1.0)), 0.0)
    return _rne(xb * iscale), d


@triton.jit
def _dp4a(a, b):
    """Sum of the four int8 products of two int32 words (PTX dp4a; emulated by shifts in
    Triton's interpreter, which has no PTX)."""
    if _INTERPRET:
        s = tl.zeros_like(a)
        for i in tl.static_range(4):
            s += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return s
    return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r",
                                     [a, b, tl.zeros_like(a)], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _gemv(q, d, xw, xd, y, n_out, n_in: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """y[t, rows] = x[t] . W[rows]: program (row block, token). q is the quant plane as
    int32 words (four int8 each), d the fp16 scale plane; xw, xd the rounded activations
    (int32 words of int8 quants, float32 scales)."""
    pdl.start()
    pid = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM)
    r = tl.minimum(rows, n_out - 1).to(tl.int64)[:, None]
    acc = tl.zeros((BM, BK // 32), tl.float64)
    for k0 in range(0, n_in, BK):
        k4 = k0 // 4 + tl.arange(0, BK // 4)[None, :]
        kb = k0 // 32 + tl.arange(0, BK // 32)
        if n_in % BK == 0:
            xv = tl.load(xw + t * (n_in // 4) + k4)
            xs = tl.load(xd + t * (n_in // 32) + kb)
            w4 = tl.load(q + r * (n_in // 4) + k4)
            dw = tl.load(d + r * (n_in // 32) + kb[None, :]).to(tl.float32)
        else:  # the last step runs past n_in (e.g. 11,008 columns in steps of 512): zeros there
            xv = tl.load(xw + t * (n_in // 4) + k4, mask=k4 < n_in // 4, other=0)
            xs = tl.load(xd + t * (n_in // 32) + kb, mask=kb < n_in // 32, other=0.0)
            w4 = tl.load(q + r * (n_in // 4) + k4, mask=k4 < n_in // 4, other=0)
            dw = tl.load(d + r * (n_in // 32) + kb[None, :], mask=kb[None, :] < n_in // 32, other=0.0).to(tl.float32)
        s = tl.sum(tl.reshape(_dp4a(w4, tl.broadcast_to(xv, (BM, BK // 4))), (BM, BK // 32, 8)), axis=2)
        acc += (s.to(tl.float32) * (dw * tl.reshape(xs, (1, BK // 32)))).to(tl.float64)
    tl.store(y + t * n_out + rows, tl.sum(acc, axis=1).to(tl.float32), mask=rows < n_out)


def act_buffers(n_tok: int, n: int, device) -> tuple:
    """Empty (quants int8 (n_tok, n), scales float32 (n_tok, n/32)) for rounded activations."""
    return (torch.empty((n_tok, n), dtype=torch.int8, device=device),
            torch.empty((n_tok, n // 32), dtype=torch.float32, device=device))


def quant_act(x: torch.Tensor) -> tuple:
    """x (n_tok, n) float32 rounded to Q8_0 blocks: (quants int8, scales float32)."""
    n_tok, n = x.shape
    xq, xd = act_buffers(n_tok, n, x.device)
    bk = 128 if n % 128 == 0 else 32
    _quant_act[(n_tok, n // bk)](x.contiguous(), xq, xd, n, BK=bk, enable_fp_fusion=False, **pdl.launch())
    return xq, xd


@triton.jit
def _quant_act(x, xq, xd, n_in, BK: tl.constexpr):
    """Round activation rows to Q8_0: xq int8 (n_tok, n_in), xd float32 (n_tok, n_in/32).
    Program (token, column block)."""
    pdl.start()
    t = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    k = cb * BK + tl.arange(0, BK)
    q, dv = _round_q8_0(tl.load(x + t * n_in + k)[None, :], 1, BK)
    tl.store(xq + t * n_in + k, tl.reshape(q, (BK,)).to(tl.int8))
    tl.store(xd + t * (n_in // 32) + cb * (BK // 32) + tl.arange(0, BK // 32), tl.reshape(dv, (BK // 32,)))


@triton.jit
def _gemm(q, d, xq, xd, y, n_tok, n_out, n_in: tl.constexpr, BT: tl.constexpr,
          BM: tl.constexpr, BK: tl.constexpr):
    """y[toks, rows] = x[toks] @ W[rows].T from rounded activations: program (row block,
    token block); each 32-column block is one int8 dot with int32 sums."""
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    toks = pid_t * BT + tl.arange(0, BT)
    r = tl.minimum(rows, n_out - 1).to(tl.int64)
    tk = tl.minimum(toks, n_tok - 1).to(tl.int64)
    c = tl.arange(0, 32)
    acc = tl.zeros((BT, BM), tl.float32)
    for k0 in range(0, n_in, BK):
        for j in tl.static_range(BK // 32):
            kc = k0 + j * 32
            xt = tl.load(xq + tk[:, None] * n_in + kc + c[None, :])              # (BT, 32)
            wt = tl.load(q + r[None, :] * n_in + kc + c[:, None])                # (32, BM)
            s = tl.dot(xt, wt, out_dtype=tl.int32)
            dx = tl.load(xd + tk * (n_in // 32) + kc // 32)
            dw = tl.load(d + r * (n_in // 32) + kc // 32).to(tl.float32)
            acc += s.to(tl.float32) * (dx[:, None] * dw[None, :])
    out = y + toks.to(tl.int64)[:, None] * n_out + rows[None, :]
    tl.store(out, acc, mask=(toks[:, None] < n_tok) & (rows[None, :] < n_out))


M4 = tl.constexpr(0x0F0F0F0F)      # the low nibble of each byte of a word
ONES = tl.constexpr(0x01010101)


@triton.jit
def _spread4(v):
    """Bits 0..3 of v (int32, 0..15) to bit 4 of bytes 0..3 (a Q5_0 quant's fifth bit)."""
    return ((v * 0x00204081) & ONES) << 4


@triton.jit
def _gemv_q5_0(w, xw, xd, y, n_out, n_in: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr,
               Q5: tl.constexpr):
    """Q5_0 rows (Q4_0 without Q5) as padded on the device, 24 (20) bytes a block: word 0
    holds d in its high half, [word 1 the fifth bits qh,] the last four words the nibbles,
    byte j's low nibble element j and its high nibble element j + 16. Per block, as ggml's
    vec_dot_q5_0_q8_0 / q4_0_q8_0: the exact sum of (q - 16) x_q (q - 8 for Q4_0) by dp4a,
    then Q5_0 (d_w * d_x) * sumi, Q4_0 (sumi * d_w) * d_x in float32. Program (row block,
    token); NB blocks a step."""
    pdl.start()
    pid = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM)
    WB: tl.constexpr = 6 if Q5 else 5
    nb: tl.constexpr = n_in // 32
    row_w = (tl.minimum(rows, n_out - 1).to(tl.int64) * (nb * WB))[:, None, None]
    bi = tl.arange(0, NB)[None, :, None]
    i4 = tl.arange(0, 4)[None, None, :]
    acc = tl.zeros((BM, NB), tl.float64)
    for b0 in range(0, nb, NB):
        blk = b0 + bi                                                        # (1, NB, 1)
        ok = blk < nb
        base = row_w + blk * WB                                              # (BM, NB, 1)
        qs = tl.load(w + base + (WB - 4) + i4, mask=ok, other=0)             # (BM, NB, 4)
        lo = qs & M4
        hi = (qs >> 4) & M4
        if Q5:
            qh = tl.load(w + base + 1, mask=ok, other=0)                     # (BM, NB, 1)
            lo = lo | _spread4((qh >> (4 * i4)) & 15)
            hi = hi | _spread4((qh >> (16 + 4 * i4)) & 15)
        xoff = t * (n_in // 4) + blk * 8 + i4                                # (1, NB, 4)
        x_lo = tl.load(xw + xoff, mask=ok, other=0)
        x_hi = tl.load(xw + xoff + 4, mask=ok, other=0)
        isum = tl.sum(_dp4a(lo, tl.broadcast_to(x_lo, (BM, NB, 4)))
                      + _dp4a(hi, tl.broadcast_to(x_hi, (BM, NB, 4))), axis=2)            # (BM, NB)
        ones = tl.full((1, NB, 4), 0x01010101, tl.int32)
        xsum = tl.sum(_dp4a(ones, x_lo) + _dp4a(ones, x_hi), axis=2)                      # (1, NB)
        isum = isum - (16 if Q5 else 8) * xsum
        dw = ((tl.load(w + base, mask=ok, other=0) >> 16) & 0xFFFF).to(tl.int16)
        dw = tl.reshape(dw.to(tl.float16, bitcast=True).to(tl.float32), (BM, NB))
        dx = tl.reshape(tl.load(xd + t * nb + blk, mask=ok, other=0.0), (1, NB))
        if Q5:
            acc += ((dw * dx) * isum.to(tl.float32)).to(tl.float64)
        else:
            acc += ((isum.to(tl.float32) * dw) * dx).to(tl.float64)
    tl.store(y + t * n_out + rows, tl.sum(acc, axis=1).to(tl.float32), mask=rows < n_out)


def matmul_q5_0(x: torch.Tensor, data: torch.Tensor, q5: bool, n_out: int, n_in: int,
                out: torch.Tensor, BM: int = 8, NB: int = 16, num_warps: int = 4) -> torch.Tensor:
    """``x @ W.T`` for a few tokens x (n_tok, n_in) and Q5_0 (``q5``) or Q4_0 rows ``data``
    (uint8, blocks padded as type_facts.FACTS says); n_in a multiple of 32."""
    n_tok = x.shape[0]
    xq, xd = quant_act(x)
    _gemv_q5_0[(triton.cdiv(n_out, BM), n_tok)](data.view(torch.int32), xq.view(torch.int32), xd, out,
                                                 n_out, n_in, BM=BM, NB=NB, Q5=q5, num_warps=num_warps,
                                                 enable_fp_fusion=False, **pdl.launch())
    return out
