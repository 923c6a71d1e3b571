"""Kernels of the 256-element super-block types (x Q8_K activations), eight packed
weight rows per step (_rows.py): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS.

Block layouts and element order follow ggml-quants.c ``dequantize_row_*``
(ggml-common.h):

    Q2_K    scales:u8[16] (lo 4 bits scale, hi 4 bits min) | qs[64] | d | dmin     84
    Q3_K    hmask[32] | qs[64] | scales:12 bytes (16 x 6 bits, minus 32) | d       110
    Q4_K    d | dmin | scales:12 bytes (8 x 6-bit scale + 8 x 6-bit min) | qs[128] 144
    Q5_K    d | dmin | scales:12 bytes | qh[32] | qs[128]                          176
    Q6_K    ql[128] | qh[64] | scales:int8[16] | d                                 210
    IQ4_XS  d | scales_h:u16 | scales_l[4] | qs[128] (kvalues_iq4nl levels)        136

Per row and super-block, as ggml-cpu/quants.c ``ggml_vec_dot_<type>_q8_K``: an exact
int32 ``isum`` = sum over sub-blocks of scale x (quants . activation quants), then

    Q2_K, Q4_K, Q5_K    sumf += d * isum - dmin * summs   d = d_w * d_x, dmin = dmin_w * d_x
    Q3_K, Q6_K, IQ4_XS  sumf += (d_w * d_x) * isum

with ``summs`` = sum over sub-blocks of min x the activations' sum over the sub-block
(Q8_K's bsums). The integer parts run as x86 does them: unsigned quants times signed
activation quants summed in pairs (``vpmaddubsw``), then times the sub-block scales
(``vpmaddwd``); the offsets of Q3_K (4) and Q6_K (32) come off as offset x sum of scale
x bsum; IQ4_XS's signed levels (a table lookup) are multiplied in int16.
"""

from __future__ import annotations

from llvmlite import ir

from ggforge.runtime.kernels._jit import KVALUES_IQ4NL, kernel
from ggforge.runtime.kernels._rows import (I8, I16, I32, I64, ROWS, ROWS_SIG, TB, const,
                                           rows_intrinsic, vec)


_K1, _K2, _K3 = 0x3F3F3F3F, 0x0F0F0F0F, 0x03030303  # ggml's kmask1..3


def _c(v, ty=I64):
    return ir.Constant(ty, v)


def _scales_k4(g, i, o):
    """Row i's 8 six-bit scales (<8 x i16>) and mins (<8 x i32>) of the Q4_K / Q5_K
    super-block at byte o (12 bytes at o + 4), unpacked as ggml's ``utmp`` code does."""
    b = g.b
    u0, u1, u2 = (g.load(g.row[i][1], b.add(o, _c(4 + 4 * j)), I32) for j in range(3))

    def mask(v, m):
        return b.and_(v, _c(m, I32))

    def shr(v, s):
        return b.lshr(v, _c(s, I32))

    def shl(v, s):
        return b.shl(v, _c(s, I32))

    t3 = b.or_(mask(shr(u2, 4), _K2), shl(mask(shr(u1, 6), _K3), 4))
    t1 = b.or_(mask(u2, _K2), shl(mask(shr(u0, 6), _K3), 4))
    t0, t2 = mask(u0, _K1), mask(u1, _K1)
    v = ir.Constant(vec(I32, 4), ir.Undefined)
    for j, t in enumerate((t0, t1, t2, t3)):
        v = b.insert_element(v, t, _c(j, I32))
    v = b.bitcast(v, vec(I8, 16))                          # scales 0..7 | mins 0..7
    return g.zext(g.pick(v, range(8)), I16), g.zext(g.pick(v, range(8, 16)), I32)


def _scaled(g, u8, x8, sc16, lanes):
    """<8 x i32>: (u8 . x8 in adjacent pairs) x the scales sc16[lanes] (16 lanes)."""
    return g.madd(g.maddubs(u8, x8), g.pick(sc16, lanes))


def _xs(g, k):
    """The token's eight <32 x i8> sub-blocks of activation quants of super-block k."""
    xo = g.b.mul(k, _c(256))
    return [g.x8(g.b.add(xo, _c(32 * j))) for j in range(8)]


def _k4(name, block_bytes, nibble_off, high_bits, n_tok):
    """Q4_K (no high bits) or Q5_K (a 32-byte qh at o + 16) as an intrinsic."""

    def unpack(g, k, o):
        b = g.b
        rows = []
        for i in range(ROWS):
            sc, mn = _scales_k4(g, i, o)
            hb = g.w(i, b.add(o, _c(16)), 32) if high_bits else None
            parts = []
            for c in range(4):  # 64-element chunks: sub-blocks 2c (low), 2c + 1 (high)
                q = g.w(i, b.add(o, _c(nibble_off + 32 * c)), 32)
                for h in range(2):
                    part = g.bits(q, 4 * h, 15)
                    if high_bits:
                        part = b.or_(part, b.shl(g.bits(hb, 2 * c + h, 1), const(I8, [4] * 32)))
                    parts.append(part)
            rows.append((sc, mn, parts))
        return rows, g.halves(o), g.halves(b.add(o, _c(2)))

    def dot(g, k, o, st, acc):
        b = g.b
        xs = _xs(g, k)
        bs = g.aux(b.mul(k, _c(16)), 16)                           # <16 x i32> bsums
        bs8 = b.add(g.pick(bs, range(0, 16, 2)), g.pick(bs, range(1, 16, 2)))
        isums, summs = [], []
        for sc, mn, parts in st[0]:
            tot = _scaled(g, parts[0], xs[0], sc, [0] * 16)
            for j in range(1, 8):
                tot = b.add(tot, _scaled(g, parts[j], xs[j], sc, [j] * 16))
            isums.append(tot)
            summs.append(b.mul(mn, bs8))
        dx = g.fsplat(g.xd(k))
        d, dmin = b.fmul(st[1], dx), b.fmul(st[2], dx)
        step = b.fsub(b.fmul(d, g.float(g.reduce(isums))), b.fmul(dmin, g.float(g.reduce(summs))))
        return g.accumulate(acc, step)

    return rows_intrinsic(name, block_bytes, unpack, dot, n_tok)


def _q6_unpack(g, k, o):
    b = g.b
    rows = []
    for i in range(ROWS):
        sc = g.sext(g.w(i, b.add(o, _c(192)), 16), I16)              # int8 scales
        quants = []
        for n in range(2):  # 128-element chunks: 64 bytes of ql, 32 of qh
            ql0 = g.w(i, b.add(o, _c(64 * n)), 32)
            ql1 = g.w(i, b.add(o, _c(64 * n + 32)), 32)
            qh = g.w(i, b.add(o, _c(128 + 32 * n)), 32)
            low = (g.bits(ql0, 0, 15), g.bits(ql1, 0, 15), g.bits(ql0, 4, 15), g.bits(ql1, 4, 15))
            for j in range(4):  # groups 8n + 2j (first 16 quants) and 8n + 2j + 1
                quants.append(b.or_(low[j], b.shl(g.bits(qh, 2 * j, 3), const(I8, [4] * 32))))
        rows.append((sc, quants))
    return rows, g.halves(b.add(o, _c(208)))


def _q2_unpack(g, k, o):
    b = g.b
    rows = []
    for i in range(ROWS):
        sc = g.w(i, o, 16)                      # low 4 bits scale, high 4 bits min
        quants = []
        for n in range(2):  # 128-element chunks of 32 bytes, 2 bits per quarter
            q = g.w(i, b.add(o, _c(16 + 32 * n)), 32)
            quants += [g.bits(q, 2 * j, 3) for j in range(4)]
        rows.append((g.zext(g.bits(sc, 0, 15), I16), g.zext(g.bits(sc, 4, 15), I16), quants))
    return rows, g.halves(b.add(o, _c(80))), g.halves(b.add(o, _c(82)))


def _q2_dot(g, k, o, st, acc):
    b = g.b
    xs = _xs(g, k)
    bs16 = b.trunc(g.aux(b.mul(k, _c(16)), 16), vec(I16, 16))        # |bsum| <= 2032
    isums, summs = [], []
    for sc, mn, quants in st[0]:
        tot = None
        for j, q in enumerate(quants):  # groups 2j, 2j + 1 of 16
            v = _scaled(g, q, xs[j], sc, [2 * j] * 8 + [2 * j + 1] * 8)
            tot = v if tot is None else b.add(tot, v)
        isums.append(tot)
        summs.append(g.madd(mn, bs16))
    dx = g.fsplat(g.xd(k))
    d, dmin = b.fmul(st[1], dx), b.fmul(st[2], dx)
    step = b.fsub(b.fmul(d, g.float(g.reduce(isums))), b.fmul(dmin, g.float(g.reduce(summs))))
    return g.accumulate(acc, step)


def _q3_scales(g, i, o):
    """Row i's 16 signed six-bit scales (<16 x i16>) from the 12 bytes at o + 96: low
    nibbles of bytes 0..7 then their high nibbles, 2 more bits from bytes 8..11."""
    b = g.b
    lo = g.w(i, b.add(o, _c(96)), 8)
    low = g.zext(g.concat(g.bits(lo, 0, 15), g.bits(lo, 4, 15)), I32)
    hi = g.zext(g.pick(g.w(i, b.add(o, _c(104)), 4), [s % 4 for s in range(16)]), I32)
    high = b.and_(b.lshr(hi, const(I32, [2 * (s // 4) for s in range(16)])), const(I32, [3] * 16))
    sc = b.sub(b.or_(low, b.shl(high, const(I32, [4] * 16))), const(I32, [32] * 16))
    return b.trunc(sc, vec(I16, 16))


def _q3_unpack(g, k, o):
    b = g.b
    rows = []
    for i in range(ROWS):
        hm = g.w(i, o, 32)
        quants = []
        for n in range(2):  # 128-element chunks: 2 low bits in qs, the third in hmask
            q = g.w(i, b.add(o, _c(32 + 32 * n)), 32)
            for j in range(4):
                high = b.shl(g.bits(hm, 4 * n + j, 1), const(I8, [2] * 32))
                quants.append(b.or_(g.bits(q, 2 * j, 3), high))      # quant + 4: 0..7
        rows.append((_q3_scales(g, i, o), quants))
    return rows, g.halves(b.add(o, _c(108)))


def _offset_dot(offset_shift):
    """Q3_K / Q6_K: unsigned quants standing for quant - 2^offset_shift, 16 groups of 16
    with signed scales; the offset comes off as 2^offset_shift x sum of scale x bsum."""

    def dot(g, k, o, st, acc):
        b = g.b
        xs = _xs(g, k)
        bs16 = b.trunc(g.aux(b.mul(k, _c(16)), 16), vec(I16, 16))    # |bsum| <= 2032
        isums = []
        for sc, quants in st[0]:
            tot = b.sub(const(I32, [0] * 8), b.shl(g.madd(sc, bs16), const(I32, [offset_shift] * 8)))
            for j, q in enumerate(quants):  # groups 2j, 2j + 1 of 16
                tot = b.add(tot, _scaled(g, q, xs[j], sc, [2 * j] * 8 + [2 * j + 1] * 8))
            isums.append(tot)
        d = b.fmul(st[1], g.fsplat(g.xd(k)))
        return g.accumulate(acc, b.fmul(d, g.float(g.reduce(isums))))

    return dot


def _iq4_xs_unpack(g, k, o):
    b = g.b
    rows = []
    for i in range(ROWS):
        low = g.splat(g.load(g.row[i][1], b.add(o, _c(4)), I32), 8)
        high = g.splat(b.zext(g.load(g.row[i][1], b.add(o, _c(2)), I16), I32), 8)
        ls = b.or_(b.and_(b.lshr(low, const(I32, [4 * j for j in range(8)])), const(I32, [15] * 8)),
                   b.shl(b.and_(b.lshr(high, const(I32, [2 * j for j in range(8)])),
                                const(I32, [3] * 8)), const(I32, [4] * 8)))
        levels = [g.sext(g.lookup16(_nibbles32(g, i, b.add(o, _c(8 + 16 * j))), KVALUES_IQ4NL), I16)
                  for j in range(8)]
        rows.append((b.sub(ls, const(I32, [32] * 8)), levels))
    return rows, g.halves(o)


def _iq4_xs_dot(g, k, o, st, acc):
    b = g.b
    xs = [g.sext(x, I16) for x in _xs(g, k)]
    isums = []
    for sc, levels in st[0]:
        tot = None
        for j, lv in enumerate(levels):  # sub-blocks of 32, scale (6 bits) - 32
            v = b.mul(g.fold(g.madd(lv, xs[j])), g.pick(sc, [j] * 8))
            tot = v if tot is None else b.add(tot, v)
        isums.append(tot)
    d = b.fmul(st[1], g.fsplat(g.xd(k)))
    return g.accumulate(acc, b.fmul(d, g.float(g.reduce(isums))))


def _nibbles32(g, i, off):
    """<32 x i8>: the 16 bytes of row i at ``off``, low nibbles then high nibbles."""
    q = g.w(i, off, 16)
    return g.concat(g.bits(q, 0, 15), g.bits(q, 4, 15))


_q2_K, _q2_K_tb = (rows_intrinsic("rows_q2_K", 84, _q2_unpack, _q2_dot, n) for n in (1, TB))
_q3_K, _q3_K_tb = (rows_intrinsic("rows_q3_K", 110, _q3_unpack, _offset_dot(2), n) for n in (1, TB))
_iq4_xs, _iq4_xs_tb = (rows_intrinsic("rows_iq4_xs", 136, _iq4_xs_unpack, _iq4_xs_dot, n)
                       for n in (1, TB))
_q4_K, _q4_K_tb = (_k4("rows_q4_K", 144, 16, False, n) for n in (1, TB))
_q5_K, _q5_K_tb = (_k4("rows_q5_K", 176, 48, True, n) for n in (1, TB))
_q6_K, _q6_K_tb = (rows_intrinsic("rows_q6_K", 210, _q6_unpack, _offset_dot(5), n) for n in (1, TB))


# The kernels: ``(packed, xq, xd, auxf, auxi, out, r0, r1)`` (_rows.ROWS_SIG) -> out[:,
# r0:r1] for packed weights (_rows.pack_rows), r0 a multiple of 8; TB tokens per pass over
# the blocks while there are as many (prefill), the rest one at a time: the same numbers.
# ``auxf``: Q8_1's sums, ``auxi``: Q8_K's bsums (any array where the type has none).


@kernel(ROWS_SIG)
def q2_K(packed, xq, xd, auxf, auxi, out, r0, r1):
    """Q2_K x Q8_K."""
    full = xq.shape[0] - xq.shape[0] % TB
    for r in range(r0, r1, ROWS):
        for t in range(0, full, TB):
            _q2_K_tb(packed, r, r1 - 1, xq, xd, auxi, out, t, t + TB - 1)
        for t in range(full, xq.shape[0]):
            _q2_K(packed, r, r1 - 1, xq, xd, auxi, out, t, t)


@kernel(ROWS_SIG)
def q3_K(packed, xq, xd, auxf, auxi, out, r0, r1):
    """Q3_K x Q8_K."""
    full = xq.shape[0] - xq.shape[0] % TB
    for r in range(r0, r1, ROWS):
        for t in range(0, full, TB):
            _q3_K_tb(packed, r, r1 - 1, xq, xd, auxi, out, t, t + TB - 1)
        for t in range(full, xq.shape[0]):
            _q3_K(packed, r, r1 - 1, xq, xd, auxi, out, t, t)


@kernel(ROWS_SIG)
def q4_K(packed, xq, xd, auxf, auxi, out, r0, r1):
    """Q4_K x Q8_K."""
    full = xq.shape[0] - xq.shape[0] % TB
    for r in range(r0, r1, ROWS):
        for t in range(0, full, TB):
            _q4_K_tb(packed, r, r1 - 1, xq, xd, auxi, out, t, t + TB - 1)
        for t in range(full, xq.shape[0]):
            _q4_K(packed, r, r1 - 1, xq, xd, auxi, out, t, t)


@kernel(ROWS_SIG)
def q5_K(packed, xq, xd, auxf, auxi, out, r0, r1):
    """Q5_K x Q8_K."""
    full = xq.shape[0] - xq.shape[0] % TB
    for r in range(r0, r1, ROWS):
        for t in range(0, full, TB):
            _q5_K_tb(packed, r, r1 - 1, xq, xd, auxi, out, t, t + TB - 1)
        for t in range(full, xq.shape[0]):
            _q5_K(packed, r, r1 - 1, xq, xd, auxi, out, t, t)


@kernel(ROWS_SIG)
def q6_K(packed, xq, xd, auxf, auxi, out, r0, r1):
    """Q6_K x Q8_K."""
    full = xq.shape[0] - xq.shape[0] % TB
    for r in range(r0, r1, ROWS):
        for t in range(0, full, TB):
            _q6_K_tb(packed, r, r1 - 1, xq, xd, auxi, out, t, t + TB - 1)
        for t in range(full, xq.shape[0]):
            _q6_K(packed, r, r1 - 1, xq, xd, auxi, out, t, t)


@kernel(ROWS_SIG)
def iq4_xs(packed, xq, xd, auxf, auxi, out, r0, r1):
    """IQ4_XS x Q8_K."""
    full = xq.shape[0] - xq.shape[0] % TB
    for r in range(r0, r1, ROWS):
        for t in range(0, full, TB):
            _iq4_xs_tb(packed, r, r1 - 1, xq, xd, auxi, out, t, t + TB - 1)
        for t in range(full, xq.shape[0]):
            _iq4_xs(packed, r, r1 - 1, xq, xd, auxi, out, t, t)
