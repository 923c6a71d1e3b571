"""Q4_K, Q5_K and Q6_K decode in integers, reading the blocks in 32-bit words.

The byte-wise kernel (triton_kernels._gemv) loads a Q4_K weight one byte per element and
multiplies in float; it streamed 430-860 GB/s on an H100 (docs/gpu.md). Here, as ggml's
``vec_dot_q4_K_q8_K`` does:

* the activations are rounded once to Q8_K (``_quant_q8k``: int8 quants, a float scale
  per 256, and the sum of each 16 quants), by triton_kernels._round_q8_k;
* each 144-byte super-block (d, dmin: fp16; 12 bytes of 6-bit scales and mins; 128 bytes
  of nibbles) is read as 36 int32 words, 16-byte aligned (144 = 9 x 16). Word w of the
  nibbles of group g (64 elements) holds elements 64g + 4w.. in its low nibbles and
  64g + 32 + 4w.. in its high ones, so ``dp4a`` of the masked word with one word of
  activation quants sums four products exactly;
* per super-block: S = sum_j scale_j * isum_j and M = sum_j min_j * bsum_j in int32, then
  d * dx * S - dmin * dx * M in float32.

Q5_K adds each element's fifth bit from its qh word; Q6_K (``_gemv_q6k``) assembles 6-bit
values from two words and takes 32 x the activation sums off. No regrouping at upload
(Q6_K's 210-byte blocks are only padded to 212, for word alignment): prefill still reads
the same bytes with triton_kernels._gemm.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ggforge.runtime.gpu import pdl
from ggforge.runtime.gpu.q8_kernels import M4, _dp4a
from ggforge.runtime.gpu.triton_kernels import _round_q8_k


@triton.jit
def _quant_q8k(x, xq, xd, xs, n_in):
    """Program (token, super-block): 256 activations -> int8 quants, the scale, and the
    sums of each 16 quants (quantize_row_q8_K_ref's bsums)."""
    pdl.start()
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    i = tl.arange(0, 256)[None, :]
    q, d = _round_q8_k(tl.load(x + t * n_in + b * 256 + i), 1, 256)               # (1, 1, 256), (1, 1, 1)
    q = tl.reshape(q, (1, 256))
    d = tl.reshape(d, (1, 1))
    tl.store(xq + t * n_in + b * 256 + i, q.to(tl.int8))
    tl.store(xd + t * (n_in // 256) + b + tl.zeros((1, 1), tl.int32), d)
    s = tl.sum(tl.reshape(q.to(tl.int32), (16, 16)), axis=1)
    tl.store(xs + t * (n_in // 16) + b * 16 + tl.arange(0, 16), s)


@triton.jit
def _byte(w0, w1, w2, b):
    """Byte b (0..11, a tensor) of the 12 scale bytes held in words w0, w1, w2."""
    word = tl.where(b < 4, w0, tl.where(b < 8, w1, w2))
    return (word >> (8 * (b % 4))) & 255


@triton.jit
def _gemv_q4k(w, xw, xd, xs, y, n_out, n_in: tl.constexpr, BM: tl.constexpr, NS: tl.constexpr,
              Q5: tl.constexpr):
    """y[t, rows] = x[t] . W[rows]: program (row block, token); NS super-blocks a step.
    w: the Q4_K rows as int32 words (n_in / 256 x 36 a row), or with Q5 the Q5_K rows
    (176-byte blocks, 44 words: qh, 32 bytes, after the scales, then the nibbles; element
    64g + 32h + l has its fifth bit at bit 2g + h of qh[l]); xw the activation quants as
    int32 words, xd their scales, xs their sums per 16."""
    pdl.start()
    pid = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM)
    nsb: tl.constexpr = n_in // 256
    BW: tl.constexpr = 44 if Q5 else 36                                                 # words a block
    QS: tl.constexpr = 12 if Q5 else 4                                                  # first nibble word
    row_w = (tl.minimum(rows, n_out - 1).to(tl.int64) * (nsb * BW))[:, None, None]    # (BM, 1, 1)
    sb = tl.arange(0, NS)[None, :, None]                                                # (1, NS, 1)
    kw = tl.arange(0, 32)[None, None, :]                                                # nibble words
    j = tl.arange(0, 8)[None, None, :]                                                  # sub-blocks
    acc = tl.zeros((BM, NS), tl.float64)
    for s0 in range(0, nsb, NS):
        blk = s0 + sb                                                                   # (1, NS, 1)
        ok = blk < nsb
        base = row_w + blk * BW
        q = tl.load(w + base + QS + kw, mask=ok, other=0)                               # (BM, NS, 32)
        g = kw // 8
        xoff = t * (n_in // 4) + blk * 64 + g * 16 + kw % 8
        xa = tl.broadcast_to(tl.load(xw + xoff, mask=ok, other=0), (BM, NS, 32))
        xb = tl.broadcast_to(tl.load(xw + xoff + 8, mask=ok, other=0), (BM, NS, 32))
        q_lo = q & M4
        q_hi = (q >> 4) & M4
        if Q5:
            qh = tl.load(w + base + 4 + kw % 8, mask=ok, other=0)
            q_lo |= ((qh >> (2 * g)) & 0x01010101) << 4
            q_hi |= ((qh >> (2 * g + 1)) & 0x01010101) << 4
        lo = _dp4a(q_lo, xa)
        hi = _dp4a(q_hi, xb)
        lo4 = tl.sum(tl.reshape(lo, (BM, NS, 4, 8)), axis=3)                            # (BM, NS, 4)
        hi4 = tl.sum(tl.reshape(hi, (BM, NS, 4, 8)), axis=3)
        # 6-bit scales and mins of the 8 sub-blocks (get_scale_min_k4)
        w0 = tl.load(w + base + 1, mask=ok, other=0)                                    # (BM, NS, 1)
        w1 = tl.load(w + base + 2, mask=ok, other=0)
        w2 = tl.load(w + base + 3, mask=ok, other=0)
        sj = _byte(w0, w1, w2, j)                                                       # (BM, NS, 8)
        sj4 = _byte(w0, w1, w2, j + 4)
        sjm4 = _byte(w0, w1, w2, tl.maximum(j - 4, 0))
        lo_j = j < 4
        sc = tl.where(lo_j, sj & 63, (sj4 & 0xF) | ((sjm4 >> 6) << 4))
        mn = tl.where(lo_j, sj4 & 63, (sj4 >> 4) | ((sj >> 6) << 4))
        sc_r = tl.reshape(sc, (BM, NS, 4, 2))
        isum = tl.sum(tl.reshape(tl.join(lo4, hi4), (BM, NS, 4, 2)) * sc_r, axis=3)     # (BM, NS, 4)
        S = tl.sum(isum, axis=2)                                                        # (BM, NS)
        bsp = xs + t * (n_in // 16) + blk * 16 + 2 * j
        bs = tl.load(bsp, mask=ok, other=0) + tl.load(bsp + 1, mask=ok, other=0)       # (1, NS, 8)
        Mi = tl.sum(mn * bs, axis=2)
        dw = tl.load(w + base, mask=ok, other=0)                                        # d | dmin << 16
        d = (dw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = ((dw >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        dx = tl.load(xd + t * nsb + blk, mask=ok, other=0.0)
        acc += (tl.reshape(d * dx, (BM, NS)) * S.to(tl.float32)
                - tl.reshape(dmin * dx, (BM, NS)) * Mi.to(tl.float32)).to(tl.float64)
    tl.store(y + t * n_out + rows, tl.sum(acc, axis=1).to(tl.float32), mask=rows < n_out)


@triton.jit
def _gemv_q6k(w, xw, xd, xs, y, n_out, n_in: tl.constexpr, BM: tl.constexpr, NS: tl.constexpr):
    """Q6_K rows padded to 212-byte blocks (53 words: ql 0..31, qh 32..47, scales 48..51,
    d in the low half of 52): element 128h + 32c + l has its low 4 bits in the low (c < 2)
    or high nibble of ql[64h + 32(c & 1) + l], its high 2 bits at bit 2c of qh[32h + l],
    its scale in sc[8h + 2c + l / 16], and is q - 32: dp4a of the 6-bit values, then
    32 x the 16-sum of the activation quants taken off (ggml's q8 bsums)."""
    pdl.start()
    pid = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM)
    nsb: tl.constexpr = n_in // 256
    row_w = (tl.minimum(rows, n_out - 1).to(tl.int64) * (nsb * 53))[:, None, None]
    sb = tl.arange(0, NS)[None, :, None]
    kw = tl.arange(0, 32)[None, None, :]            # ql words: h = kw / 16, c_lo = kw / 8 % 2
    h = kw // 16
    c_lo = (kw // 8) % 2
    l4 = kw % 8
    gi = tl.arange(0, 8)[None, None, :]            # groups of 4 ql words: sub-blocks
    s_lo = gi + 4 * (gi // 4)                      # 8h + 2 c_lo + l / 16, with gi = 4h + 2c_lo + l4 / 4
    s_hi = s_lo + 4
    acc = tl.zeros((BM, NS), tl.float64)
    for s0 in range(0, nsb, NS):
        blk = s0 + sb
        ok = blk < nsb
        base = row_w + blk * 53
        ql = tl.load(w + base + kw, mask=ok, other=0)                                   # (BM, NS, 32)
        qh = tl.load(w + base + 32 + 8 * h + l4, mask=ok, other=0)
        q_lo = (ql & M4) | (((qh >> (2 * c_lo)) & 0x03030303) << 4)
        q_hi = ((ql >> 4) & M4) | (((qh >> (2 * c_lo + 4)) & 0x03030303) << 4)
        xoff = t * (n_in // 4) + blk * 64 + 32 * h + 8 * c_lo + l4
        x_lo = tl.broadcast_to(tl.load(xw + xoff, mask=ok, other=0), (BM, NS, 32))
        x_hi = tl.broadcast_to(tl.load(xw + xoff + 16, mask=ok, other=0), (BM, NS, 32))
        p_lo = tl.sum(tl.reshape(_dp4a(q_lo, x_lo), (BM, NS, 8, 4)), axis=3)            # (BM, NS, 8)
        p_hi = tl.sum(tl.reshape(_dp4a(q_hi, x_hi), (BM, NS, 8, 4)), axis=3)
        bsp = xs + t * (n_in // 16) + blk * 16
        b_lo = tl.load(bsp + s_lo, mask=ok, other=0)                                    # (1, NS, 8)
        b_hi = tl.load(bsp + s_hi, mask=ok, other=0)
        w0 = tl.load(w + base + 48, mask=ok, other=0)
        w1 = tl.load(w + base + 49, mask=ok, other=0)
        w2 = tl.load(w + base + 50, mask=ok, other=0)
        w3 = tl.load(w + base + 51, mask=ok, other=0)
        sc_lo = _sbyte(w0, w1, w2, w3, s_lo)
        sc_hi = _sbyte(w0, w1, w2, w3, s_hi)
        S = tl.sum(sc_lo * (p_lo - 32 * b_lo) + sc_hi * (p_hi - 32 * b_hi), axis=2)      # (BM, NS)
        dw = tl.load(w + base + 52, mask=ok, other=0)
        d = (dw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        dx = tl.load(xd + t * nsb + blk, mask=ok, other=0.0)
        acc += (tl.reshape(d * dx, (BM, NS)) * S.to(tl.float32)).to(tl.float64)
    tl.store(y + t * n_out + rows, tl.sum(acc, axis=1).to(tl.float32), mask=rows < n_out)


@triton.jit
def _sbyte(w0, w1, w2, w3, b):
    """Signed byte b (0..15, a tensor) of the 16 bytes in words w0..w3."""
    word = tl.where(b < 4, w0, tl.where(b < 8, w1, tl.where(b < 12, w2, w3)))
    v = (word >> (8 * (b % 4))) & 255
    return (v ^ 128) - 128


def matmul_k(x: torch.Tensor, data: torch.Tensor, kind: str, n_out: int, n_in: int,
             out: torch.Tensor, BM: int = 8, NS: int = 2, num_warps: int = 4) -> torch.Tensor:
    """``x @ W.T`` for a few tokens x (n_tok, n_in) and rows ``data`` (uint8) of ``kind``
    "q4_K", "q5_K" or "q6_K" (blocks padded to type_facts.FACTS); n_in a multiple
    of 256."""
    n_tok = x.shape[0]
    dev = x.device
    xq = torch.empty((n_tok, n_in), dtype=torch.int8, device=dev)
    xd = torch.empty((n_tok, n_in // 256), dtype=torch.float32, device=dev)
    xs = torch.empty((n_tok, n_in // 16), dtype=torch.int32, device=dev)
    _quant_q8k[(n_tok, n_in // 256)](x, xq, xd, xs, n_in, num_warps=4, enable_fp_fusion=False,
                                      **pdl.launch())
    args = (data.view(torch.int32), xq.view(torch.int32), xd, xs, out, n_out, n_in)
    grid = (triton.cdiv(n_out, BM), n_tok)
    if kind == "q6_K":
        _gemv_q6k[grid](*args, BM=BM, NS=NS, num_warps=num_warps, enable_fp_fusion=False, **pdl.launch())
    else:
        _gemv_q4k[grid](*args, BM=BM, NS=NS, Q5=kind == "q5_K", num_warps=num_warps,
                        enable_fp_fusion=False, **pdl.launch())
    return out
