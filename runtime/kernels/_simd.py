"""Block dot products written as LLVM vector IR (numba intrinsics), for the decode kernels.

numba's loop vectorizer handles a 16- or 32-element block loop poorly (setup, remainder
and horizontal sum per block). These intrinsics load a block's bytes as one LLVM vector,
unpack the quants with vector shifts and masks, multiply with the activation quants in
int16 and sum to int32 (``llvm.vector.reduce.add``): plain target-independent IR that
LLVM lowers to ``vpmaddwd`` and friends on x86 and to NEON elsewhere.

Every intrinsic has the signature ``(w, wo1, wo2, x, xo, k)``: ``w`` the weight bytes
(uint8, any shape, C order), ``wo1``/``wo2`` two byte offsets into it (the quants and,
where the type has them, the high bits), ``x`` the int8 activation quants (C order),
``xo`` an element offset into it, ``k`` a small integer parameter (a bit position). It
returns a tuple of int32 sums. Offsets are not bounds-checked: the kernels compute them
from the tensor's shape.

``half(h)`` widens IEEE half bits to float32 with LLVM's ``fpext`` (``vcvtph2ps``).
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


@intrinsic
def half(typingctx, h):
    """IEEE half bits (an integer) -> float32, exact (NaNs come back quiet, as with F16C)."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 16:
            v = builder.trunc(v, _I16)
        elif v.type.width < 16:
            v = builder.zext(v, _I16)
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return types.float32(h), codegen


class _Block:
    """IR helpers for one intrinsic call: loads at the given offsets, vector arithmetic."""

    def __init__(self, context, builder, sig, args):
        self.b = builder
        w, wo1, wo2, x, xo, k = args
        self.k = builder.trunc(k, _I32) if k.type.width > 32 else k
        self._w = self._base(context, sig.args[0], w)
        self._x = self._base(context, sig.args[3], x)
        self.wo1, self.wo2, self.xo = wo1, wo2, xo

    def _base(self, context, arrty, arr):
        data = context.make_array(arrty)(context, self.b, arr).data
        return self.b.bitcast(data, _I8.as_pointer())

    def _load(self, base, off, delta, n):
        p = self.b.gep(base, [self.b.add(off, ir.Constant(off.type, delta))])
        return self.b.load(self.b.bitcast(p, ir.VectorType(_I8, n).as_pointer()), align=1)

    def w1(self, delta, n):
        """<n x i8> weight bytes at wo1 + delta."""
        return self._load(self._w, self.wo1, delta, n)

    def w2(self, delta, n):
        return self._load(self._w, self.wo2, delta, n)

    def x(self, delta, n):
        """<n x i16> activation quants at xo + delta (sign-extended)."""
        v = self._load(self._x, self.xo, delta, n)
        return self.b.sext(v, ir.VectorType(_I16, n))

    def u16(self, v):
        """Zero-extend <n x i8> to <n x i16>."""
        return self.b.zext(v, ir.VectorType(_I16, v.type.count))

    def s16(self, v):
        return self.b.sext(v, ir.VectorType(_I16, v.type.count))

    def splat(self, value, n, ty=_I16):
        return ir.Constant(ir.VectorType(ty, n), [value] * n)

    def bits(self, v, shift, mask):
        """(v >> shift) & mask on a vector; ``shift`` a Python int or an IR integer."""
        n, ty = v.type.count, v.type.element
        s = self.splat(shift, n, ty) if isinstance(shift, int) else self.splat_value(shift, n, ty)
        return self.b.and_(self.b.lshr(v, s), self.splat(mask, n, ty))

    def splat_value(self, value, n, ty=_I16):
        """An IR integer broadcast to <n x ty>."""
        if value.type.width > ty.width:
            value = self.b.trunc(value, ty)
        elif value.type.width < ty.width:
            value = self.b.zext(value, ty)
        vec = self.b.insert_element(ir.Constant(ir.VectorType(ty, n), ir.Undefined), value,
                                    ir.Constant(_I32, 0))
        return self.b.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, n), [0] * n))

    def concat(self, a, c):
        n = a.type.count
        order = ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n)))
        return self.b.shuffle_vector(a, c, order)

    def dot(self, q16, x16):
        """sum(q16 * x16) as i32; the products fit in int16 for every type here."""
        p = self.b.mul(q16, x16)
        n = p.type.count
        wide = self.b.sext(p, ir.VectorType(_I32, n))
        fn = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(_I32, [wide.type]), f"llvm.vector.reduce.add.v{n}i32")
        return self.b.call(fn, [wide])


def _block_dot(n_sums):
    """Decorator: an intrinsic (w, wo1, wo2, x, xo, k) -> UniTuple(int32, n_sums) whose IR
    is ``body(block) -> list of i32``."""

    def wrap(body):
        def typer(typingctx, w, wo1, wo2, x, xo, k):
            sig = types.UniTuple(types.int32, n_sums)(w, wo1, wo2, x, xo, k)

            def codegen(context, builder, signature, args):
                sums = body(_Block(context, builder, signature, args))
                return context.make_tuple(builder, signature.return_type, sums)

            return sig, codegen

        typer.__name__ = body.__name__
        typer.__doc__ = body.__doc__
        return intrinsic(typer)

    return wrap


# ---------------------------------------------------------------- 32-element blocks

@_block_dot(1)
def dot_q8_0(m):
    """Q8_0: 32 int8 quants at wo1."""
    return [m.dot(m.s16(m.w1(0, 32)), m.x(0, 32))]


@_block_dot(1)
def dot_q4_0(m):
    """Q4_0 / Q4_1 (k = 8 / 0 subtracted): 16 bytes at wo1, low nibbles then high."""
    q = m.u16(m.w1(0, 16))
    v = m.concat(m.bits(q, 0, 15), m.bits(q, 4, 15))
    v = m.b.sub(v, m.splat_value(m.k, 32, _I16))
    return [m.dot(v, m.x(0, 32))]


@_block_dot(1)
def dot_q5_0(m):
    """Q5_0 / Q5_1 (k = 16 / 0 subtracted): u32 high bits at wo2, 16 bytes of nibbles at wo1."""
    qh = m.b.bitcast(m.w2(0, 4), _I32)
    hv = m.splat_value(qh, 32, _I32)
    shifts = ir.Constant(ir.VectorType(_I32, 32), list(range(32)))
    high = m.b.trunc(m.b.and_(m.b.lshr(hv, shifts), m.splat(1, 32, _I32)), ir.VectorType(_I16, 32))
    q = m.u16(m.w1(0, 16))
    v = m.concat(m.bits(q, 0, 15), m.bits(q, 4, 15))
    v = m.b.or_(v, m.b.shl(high, m.splat(4, 32)))
    v = m.b.sub(v, m.splat_value(m.k, 32, _I16))
    return [m.dot(v, m.x(0, 32))]


# ---------------------------------------------------------------- K-quants

@_block_dot(4)
def dot_q2_K(m):
    """Q2_K: 16 bytes at wo1 hold 2-bit quants of 4 groups (shifts 0, 2, 4, 6), activations
    of group j at xo + 32 j."""
    q = m.u16(m.w1(0, 16))
    return [m.dot(m.bits(q, 2 * j, 3), m.x(32 * j, 16)) for j in range(4)]


@_block_dot(4)
def dot_q3_K(m):
    """Q3_K: as Q2_K, minus 4 where bit k + j of the hmask bytes at wo2 is clear."""
    q = m.u16(m.w1(0, 16))
    hm = m.u16(m.w2(0, 16))
    sums = []
    for j in range(4):
        bit = m.bits(hm, m.b.add(m.k, ir.Constant(m.k.type, j)), 1)
        v = m.b.add(m.b.sub(m.bits(q, 2 * j, 3), m.splat(4, 16)), m.b.shl(bit, m.splat(2, 16)))
        sums.append(m.dot(v, m.x(32 * j, 16)))
    return sums


@_block_dot(2)
def dot_q4_K(m):
    """Q4_K chunk: 32 bytes of nibbles at wo1, the low ones against xo, the high xo + 32."""
    q = m.u16(m.w1(0, 32))
    lo, hi = m.bits(q, 0, 15), m.bits(q, 4, 15)
    return [m.dot(lo, m.x(0, 32)), m.dot(hi, m.x(32, 32))]


@_block_dot(2)
def dot_q5_K(m):
    """Q5_K chunk: nibbles at wo1 as Q4_K, bit k (low) and k + 1 (high) of qh at wo2."""
    q = m.u16(m.w1(0, 32))
    h = m.u16(m.w2(0, 32))
    four = m.splat(4, 32)
    lo = m.b.or_(m.bits(q, 0, 15), m.b.shl(m.bits(h, m.k, 1), four))
    k1 = m.b.add(m.k, ir.Constant(m.k.type, 1))
    hi = m.b.or_(m.bits(q, 4, 15), m.b.shl(m.bits(h, k1, 1), four))
    return [m.dot(lo, m.x(0, 32)), m.dot(hi, m.x(32, 32))]


@_block_dot(4)
def dot_q6_K(m):
    """Q6_K group: ql bytes at wo1 and wo1 + 32, qh bytes at wo2 (16 each); the four
    quarters (ql low, ql+32 low, ql high, ql+32 high nibbles | qh bits 2j) minus 32."""
    q0 = m.u16(m.w1(0, 16))
    q1 = m.u16(m.w1(32, 16))
    qh = m.u16(m.w2(0, 16))
    four, off = m.splat(4, 16), m.splat(32, 16)
    low = [m.bits(q0, 0, 15), m.bits(q1, 0, 15), m.bits(q0, 4, 15), m.bits(q1, 4, 15)]
    quants = [m.b.sub(m.b.or_(low[j], m.b.shl(m.bits(qh, 2 * j, 3), four)), off) for j in range(4)]
    return [m.dot(quants[j], m.x(32 * j, 16)) for j in range(4)]


# kvalues_iq4nl of ggml-common.h (also _jit.KVALUES_IQ4NL)
_KV = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@_block_dot(1)
def dot_iq4(m):
    """IQ4_NL block / IQ4_XS sub-block: 16 bytes of 4-bit indices at wo1 into the 16
    non-linear levels (low nibbles against xo, high against xo + 16). The lookup is a tree
    of 15 vector selects on the index bits (generic IR has no variable byte shuffle)."""
    q = m.w1(0, 16)
    idx = m.concat(m.bits(q, 0, 15), m.bits(q, 4, 15))  # <32 x i8>: one vector register
    zero = m.splat(0, 32, _I8)
    level = [m.splat(v, 32, _I8) for v in _KV]
    for bit in range(4):
        on = m.b.icmp_unsigned("!=", m.b.and_(idx, m.splat(1 << bit, 32, _I8)), zero)
        level = [m.b.select(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return [m.dot(m.s16(level[0]), m.x(0, 32))]
