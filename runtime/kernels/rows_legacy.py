"""Kernels of the 32-element block types, eight packed weight rows per step (_rows.py):
Q8_0, Q4_0, Q5_0, IQ4_NL (x Q8_0) and Q4_1, Q5_1 (x Q8_1).

Block layouts (ggml-common.h, little-endian; ``qs[j]`` holds elements j and j + 16):

    Q8_0    d:f16 | qs:int8[32]                          34 bytes
    Q4_0    d:f16 | qs:u8[16]       q - 8                18 bytes
    Q4_1    d:f16 m:f16 | qs:u8[16] d*q + m              20 bytes
    Q5_0    d:f16 | qh:u32 | qs:u8[16]   (q | h<<4) - 16 22 bytes
    Q5_1    d:f16 m:f16 | qh:u32 | qs:u8[16]             24 bytes
    IQ4_NL  d:f16 | qs:u8[16]       kvalues_iq4nl[q]     18 bytes

Each kernel computes, per row and block, the exact int32 dot product of the weight quants
with the Q8_0 / Q8_1 activation quants and then ggml-cpu/quants.c
``ggml_vec_dot_<type>_q8_0/_q8_1``'s float step, in these orders:

    Q8_0    sumf += sumi * (d_w * d_x)
    Q4_0    sumf += (sumi * d_w) * d_x
    Q5_0    sumf += (d_w * d_x) * sumi                      (IQ4_NL likewise)
    Q4_1    sumf += (d_w * d_x) * sumi + m_w * s_x          (Q5_1 likewise)

each step in float32, summed over blocks in float64 and rounded once (_rows.py).
"""

from __future__ import annotations

from llvmlite import ir

from ggforge.runtime.kernels._jit import KVALUES_IQ4NL, kernel
from ggforge.runtime.kernels._rows import I8, I16, I64, ROWS, ROWS_SIG, TB, const, rows_intrinsic

_BIT = const(I8, [1 << (j % 8) for j in range(32)])  # bit j % 8 of byte j // 8


def _c(v):
    return ir.Constant(I64, v)


def _nibbles(g, i, off):
    """<32 x i8>: the 16 bytes of row i at ``off``, low nibbles then high nibbles."""
    q = g.w(i, off, 16)
    return g.concat(g.bits(q, 0, 15), g.bits(q, 4, 15))


def _high_bits(g, i, off):
    """<32 x i8>: 16 where bit j of the u32 at ``off`` of row i is set, else 0."""
    b = g.b
    qh = g.pick(g.w(i, off, 4), [j // 8 for j in range(32)])
    on = b.icmp_unsigned("!=", b.and_(qh, _BIT), const(I8, [0] * 32))
    return b.select(on, const(I8, [16] * 32), const(I8, [0] * 32))


def _signed_sums(g, k, quants):
    """<8 x i32> block sums of the eight rows with the token's activations; quants[i] is
    row i's <32 x i8> signed quants."""
    x = g.x16(g.b.mul(k, _c(32)), 32)
    return g.reduce([g.fold(g.madd(g.sext(q, I16), x)) for q in quants])


def _unsigned_sums(g, k, quants, offset):
    """The same for unsigned quants (0..31) standing for quant - offset: the sums of the
    unsigned quants less offset x the block's sum of activation quants."""
    x = g.x8(g.b.mul(k, _c(32)))
    s = g.reduce([g.pairs(g.maddubs(q, x)) for q in quants])
    if offset:
        sx = g.hsum(g.pairs(g.maddubs(const(I8, [1] * 32), x)))
        s = g.b.sub(s, g.splat(g.b.mul(sx, ir.Constant(sx.type, offset)), ROWS))
    return s


def _legacy(name, block_bytes, quants, step, offset=None, n_tok=1):
    """An intrinsic over 32-element blocks of ``block_bytes``: ``quants(g, i, o)`` gives
    row i's <32 x i8> quants of the block at byte o (signed if ``offset`` is None, else
    unsigned standing for quant - offset), ``step(g, k, st, acc, s)`` the float update
    from the <8 x float> block sums ``s`` (st: the quants, d_w and m_w of the rows)."""

    def unpack(g, k, o):
        m = g.halves(_at(g, o, 2)) if step is _step_q8_1 else None
        return [quants(g, i, o) for i in range(ROWS)], g.halves(o), m

    def dot(g, k, o, st, acc):
        s = _signed_sums(g, k, st[0]) if offset is None else _unsigned_sums(g, k, st[0], offset)
        return step(g, k, st, acc, g.float(s))

    return rows_intrinsic(name, block_bytes, unpack, dot, n_tok)


def _at(g, o, delta):
    return g.b.add(o, _c(delta))


def _d_times_dx(g, k, st):
    return g.b.fmul(st[1], g.fsplat(g.xd(k)))


def _step_q8_0(g, k, st, acc, s):
    return g.accumulate(acc, g.b.fmul(s, _d_times_dx(g, k, st)))


def _step_q4_0(g, k, st, acc, s):
    b = g.b
    return g.accumulate(acc, b.fmul(b.fmul(s, st[1]), g.fsplat(g.xd(k))))


def _step_q5_0(g, k, st, acc, s):
    return g.accumulate(acc, g.b.fmul(_d_times_dx(g, k, st), s))


def _step_q8_1(g, k, st, acc, s):
    b = g.b
    m = b.fmul(st[2], g.fsplat(g.aux(k)))
    return g.accumulate(acc, b.fadd(b.fmul(_d_times_dx(g, k, st), s), m))


def _q5(g, i, o, head):
    """Q5_0 / Q5_1 quants (0..31): qh at o + head, the nibbles after it."""
    return g.b.or_(_nibbles(g, i, _at(g, o, head + 4)), _high_bits(g, i, _at(g, o, head)))


TYPES = {  # name: (block bytes, quants, float step, offset of unsigned quants)
    "q8_0": (34, lambda g, i, o: g.w(i, _at(g, o, 2), 32), _step_q8_0, None),
    "q4_0": (18, lambda g, i, o: _nibbles(g, i, _at(g, o, 2)), _step_q4_0, 8),
    "q4_1": (20, lambda g, i, o: _nibbles(g, i, _at(g, o, 4)), _step_q8_1, 0),
    "q5_0": (22, lambda g, i, o: _q5(g, i, o, 2), _step_q5_0, 16),
    "q5_1": (24, lambda g, i, o: _q5(g, i, o, 4), _step_q8_1, 0),
    "iq4_nl": (18, lambda g, i, o: g.lookup16(_nibbles(g, i, _at(g, o, 2)), KVALUES_IQ4NL),
               _step_q5_0, None),
}
_NAMES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
_q8_0, _q4_0, _q4_1, _q5_0, _q5_1, _iq4_nl = (_legacy(f"rows_{t}", *TYPES[t]) for t in _NAMES)
_q8_0_tb, _q4_0_tb, _q4_1_tb, _q5_0_tb, _q5_1_tb, _iq4_nl_tb = (
    _legacy(f"rows_{t}_tb", *TYPES[t], n_tok=TB) for t in _NAMES)


# The kernels: ``(packed, xq, xd, auxf, auxi, out, r0, r1)`` (_rows.ROWS_SIG) -> out[:,
# r0:r1] for packed weights (_rows.pack_rows), r0 a multiple of 8; TB tokens per pass over
# the blocks while there are as many (prefill), the rest one at a time: the same numbers.
# ``auxf``: Q8_1's sums, ``auxi``: Q8_K's bsums (any array where the type has none).


@kernel(ROWS_SIG)
def q8_0(packed, xq, xd, auxf, auxi, out, r0, r1):
    """Q8_0 x Q8_0 (ggml_vec_dot_q8_0_q8_0)."""
    full = xq.shape[0] - xq.shape[0] % TB
    for r in range(r0, r1, ROWS):
        for t in range(0, full, TB):
            _q8_0_tb(packed, r, r1 - 1, xq, xd, xd, out, t, t + TB - 1)
        for t in range(full, xq.shape[0]):
            _q8_0(packed, r, r1 - 1, xq, xd, xd, out, t, t)


@kernel(ROWS_SIG)
def q4_0(packed, xq, xd, auxf, auxi, out, r0, r1):
    """Q4_0 x Q8_0 (ggml_vec_dot_q4_0_q8_0)."""
    full = xq.shape[0] - xq.shape[0] % TB
    for r in range(r0, r1, ROWS):
        for t in range(0, full, TB):
            _q4_0_tb(packed, r, r1 - 1, xq, xd, xd, out, t, t + TB - 1)
        for t in range(full, xq.shape[0]):
            _q4_0(packed, r, r1 - 1, xq, xd, xd, out, t, t)


@kernel(ROWS_SIG)
def q5_0(packed, xq, xd, auxf, auxi, out, r0, r1):
    """Q5_0 x Q8_0 (ggml_vec_dot_q5_0_q8_0)."""
    full = xq.shape[0] - xq.shape[0] % TB
    for r in range(r0, r1, ROWS):
        for t in range(0, full, TB):
            _q5_0_tb(packed, r, r1 - 1, xq, xd, xd, out, t, t + TB - 1)
        for t in range(full, xq.shape[0]):
            _q5_0(packed, r, r1 - 1, xq, xd, xd, out, t, t)


@kernel(ROWS_SIG)
def iq4_nl(packed, xq, xd, auxf, auxi, out, r0, r1):
    """IQ4_NL x Q8_0 (ggml_vec_dot_iq4_nl_q8_0)."""
    full = xq.shape[0] - xq.shape[0] % TB
    for r in range(r0, r1, ROWS):
        for t in range(0, full, TB):
            _iq4_nl_tb(packed, r, r1 - 1, xq, xd, xd, out, t, t + TB - 1)
        for t in range(full, xq.shape[0]):
            _iq4_nl(packed, r, r1 - 1, xq, xd, xd, out, t, t)


@kernel(ROWS_SIG)
def q4_1(packed, xq, xd, auxf, auxi, out, r0, r1):
    """Q4_1 x Q8_1 (ggml_vec_dot_q4_1_q8_1)."""
    full = xq.shape[0] - xq.shape[0] % TB
    for r in range(r0, r1, ROWS):
        for t in range(0, full, TB):
            _q4_1_tb(packed, r, r1 - 1, xq, xd, auxf, out, t, t + TB - 1)
        for t in range(full, xq.shape[0]):
            _q4_1(packed, r, r1 - 1, xq, xd, auxf, out, t, t)


@kernel(ROWS_SIG)
def q5_1(packed, xq, xd, auxf, auxi, out, r0, r1):
    """Q5_1 x Q8_1 (ggml_vec_dot_q5_1_q8_1)."""
    full = xq.shape[0] - xq.shape[0] % TB
    for r in range(r0, r1, ROWS):
        for t in range(0, full, TB):
            _q5_1_tb(packed, r, r1 - 1, xq, xd, auxf, out, t, t + TB - 1)
        for t in range(full, xq.shape[0]):
            _q5_1(packed, r, r1 - 1, xq, xd, auxf, out, t, t)
