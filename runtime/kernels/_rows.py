"""Eight weight rows at a time as LLVM vector IR: the machinery of the quantized kernels.

A decode product streams every weight byte once, so its speed is the cost per block and
the rate at which memory delivers the bytes. Taking one row at a time pays a horizontal
sum and a scalar scale per block and row. Here one intrinsic call computes the dot
products of **eight rows** with one to a few tokens' activations, over the whole row:

* per block, each row's integer products land in an ``<8 x i32>`` vector (``madd``:
  int16 products summed in pairs, what x86 does with ``vpmaddwd``);
* the eight rows' vectors are summed *together*, transposed (``reduce``: a tree of
  pairwise adds, ``vphaddd``), into one ``<8 x i32>`` whose lane i is row i's block sum;
* the float part then runs once for eight rows, lane i holding row i: the fp16 scales
  of the eight rows are gathered into one vector (``vcvtph2ps``). Each lane does exactly
  the operations of ggml's formula for one row's block step, in float32 and in its order
  (no fused multiply-add: the IR carries no fast-math flags), and adds the step to an
  ``<8 x double>`` accumulator, rounded to float32 once at the end; so a row's result
  does not depend on its lane, its group or the number of tokens, and hardly on the
  order of the blocks (the GPU's kernels sum them in another).

The IR is target independent, except that on x86 with AVX2 the 8-bit multiply-adds and
the 16-entry table lookups call ``vpmaddubsw`` / ``vpmaddwd`` / ``vpshufb`` directly
(LLVM does not find them in the generic form); elsewhere the same sums are spelled out.

The weights come **packed** (:func:`pack_rows`): the eight rows of a group interleaved
block by block, so a group is read front to back as one stream. Read in place, the
eight rows are eight streams 8 x row_bytes apart, which the hardware prefetchers serve
at half the speed (measured: 6 against 12 GB/s on one core).

A call unpacks each block's weights once and takes its dot products with ``n_tok``
consecutive tokens (1 in decode, more in prefill, which thus reuses the unpacked block).
Rows past the end are copies of the last row (packing pads them); tokens past the end
repeat the last token; both recompute values that are stored anyway.

An intrinsic built by :func:`rows_intrinsic` has the signature
``(packed, r, r_last, xq, xd, aux, out, t, t_last)``: ``packed`` the packed weights
(n_groups, 8 x row_bytes), rows ``r`` .. ``r + 7`` (``r`` a multiple of 8, stores up to
``r_last``), ``xq`` (T, n) int8, ``xd`` (T, n_blocks) float32 and ``aux`` (T, k) (Q8_1
sums or Q8_K bsums; any array where unused) the activations, ``out`` (T, n_out) float32,
tokens ``t`` .. ``min(t + n_tok - 1, t_last)``. It writes ``out[tokens, rows]``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import numpy as np
from llvmlite import binding, ir
from numba.core import cgutils, config, types
from numba.extending import intrinsic

from ggforge.runtime.kernels._jit import F4M, I4M, I8M, RAW, i64

ROWS = 8  # weight rows per call: the float32 lanes of one 256-bit register
# pack_rows copies this many bytes at a time (then the caller may drop their source pages)
PACK_CHUNK_BYTES = 4 << 20
TB = 8    # tokens per call of the prefill kernels (each unpacked block serves TB tokens)
# The kernels built on these intrinsics: (packed, xq, xd, auxf, auxi, out, r0, r1).
ROWS_SIG = types.void(RAW, I8M, F4M, F4M, I4M, F4M, i64, i64)

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
F64 = ir.DoubleType()


def _host_has_avx2() -> bool:
    """Whether numba compiles for this machine and it has AVX2 (x86's 8-bit multiply-adds)."""
    if config.CPU_NAME not in (None, "host") or config.CPU_FEATURES:
        return False
    return bool(binding.get_host_cpu_features().get("avx2", False))


AVX2 = _host_has_avx2()


def vec(ty, n):
    return ir.VectorType(ty, n)


def const(ty, values):
    values = list(values)
    return ir.Constant(vec(ty, len(values)), values)


class Group:
    """IR helpers for one call: the eight rows' pointers, the tokens' activation pointers."""

    def __init__(self, context, builder, sig, args, block_bytes, n_tok):
        self.b = b = builder
        packed, r, r_last, xq, xd, aux, out, t, t_last = args
        self._ctx = context
        self.block_bytes = block_bytes
        pa = self._array(sig.args[0], packed)
        group = b.gep(b.bitcast(pa.data, I8.as_pointer()),
                      [b.mul(b.ashr(r, ir.Constant(r.type, 3)), self._shape(pa)[1])])
        self.row = []                       # (row index for the store, i8* to block 0) x 8
        for i in range(ROWS):
            ri = b.add(r, ir.Constant(r.type, i))
            ri = b.select(b.icmp_signed("<", ri, r_last), ri, r_last)
            self.row.append((ri, b.gep(group, [ir.Constant(I64, i * block_bytes)])))
        xa = self._array(sig.args[4], xd)
        self.n_blocks = self._shape(xa)[1]
        aux_ty = I32 if sig.args[5].dtype == types.int32 else F32
        self.tokens = []                    # (token, xq row i8*, xd row float*, aux row) x n_tok
        for j in range(n_tok):
            tj = b.add(t, ir.Constant(t.type, j))
            tj = b.select(b.icmp_signed("<", tj, t_last), tj, t_last)
            self.tokens.append((tj, self._token_row(sig.args[3], xq, I8, tj),
                                self._token_row(sig.args[4], xd, F32, tj),
                                self._token_row(sig.args[5], aux, aux_ty, tj)))
        self.use_token(0)
        self._out = (sig.args[6], out)

    def use_token(self, j):
        """Make token j of the call the one x8, xd and aux read."""
        self.t, self.xp, self.dp, self.ap = self.tokens[j]

    def block(self, k):
        """Byte offset of block k from each row's pointer (blocks are 8 rows apart)."""
        return self.b.mul(k, ir.Constant(I64, ROWS * self.block_bytes))

    # ---------------------------------------------------------------- arrays
    def _array(self, arrty, arr):
        return self._ctx.make_array(arrty)(self._ctx, self.b, arr)

    def _shape(self, a):
        return cgutils.unpack_tuple(self.b, a.shape, 2)

    def _token_row(self, arrty, arr, elem, t):
        a = self._array(arrty, arr)
        data = self.b.bitcast(a.data, elem.as_pointer())
        return self.b.gep(data, [self.b.mul(t, self._shape(a)[1])])

    def accumulate(self, acc, term):
        """acc (<8 x double>) + term (<8 x float>, a block's float step) in float64: the sum
        over blocks then hardly depends on its order, so the GPU's kernels, which sum in
        another order, give the same float32 result (docs/gpu.md, Exactness)."""
        return self.b.fadd(acc, self.b.fpext(term, vec(F64, ROWS)))

    def store(self, acc):
        """out[current token, row i] = lane i of ``acc`` (<8 x double>), rounded to float32."""
        a = self._array(*self._out)
        op = self.b.gep(a.data, [self.b.mul(self.t, self._shape(a)[1])])
        acc = self.b.fptrunc(acc, vec(F32, ROWS))
        for i, (ri, _) in enumerate(self.row):
            self.b.store(self.b.extract_element(acc, ir.Constant(I32, i)), self.b.gep(op, [ri]))

    # ---------------------------------------------------------------- loads
    def _at(self, ptr, off):
        off = ir.Constant(I64, off) if isinstance(off, int) else off
        return self.b.gep(ptr, [off])

    def load(self, ptr, off, ty):
        """A value of type ``ty`` (scalar or vector) at byte ``off`` of the i8* ``ptr``."""
        return self.b.load(self.b.bitcast(self._at(ptr, off), ty.as_pointer()), align=1)

    def w(self, i, off, n):
        """<n x i8> bytes of row i at byte ``off``."""
        return self.load(self.row[i][1], off, vec(I8, n))

    def x8(self, off, n=32):
        """<n x i8>: activation quants off .. off + n of the token."""
        return self.load(self.xp, off, vec(I8, n))

    def x16(self, off, n):
        """<n x i16>: activation quants off .. off + n of the token, sign-extended."""
        return self.sext(self.x8(off, n), I16)

    def xd(self, block):
        """The token's activation scale of ``block`` (float)."""
        return self.b.load(self.b.gep(self.dp, [block]))

    def aux(self, idx, n=None):
        """aux[t, idx] (a scalar) or aux[t, idx: idx + n] (a vector)."""
        p = self.b.gep(self.ap, [idx])
        if n is None:
            return self.b.load(p)
        return self.b.load(self.b.bitcast(p, vec(p.type.pointee, n).as_pointer()), align=4)

    def halves(self, off):
        """<8 x float>: the fp16 at byte ``off`` of each of the eight rows."""
        v = ir.Constant(vec(I16, ROWS), ir.Undefined)
        for i, (_, p) in enumerate(self.row):
            v = self.b.insert_element(v, self.load(p, off, I16), ir.Constant(I32, i))
        return self.b.fpext(self.b.bitcast(v, vec(ir.HalfType(), ROWS)), vec(F32, ROWS))

    # ---------------------------------------------------------------- vector arithmetic
    def sext(self, v, ty):
        return self.b.sext(v, vec(ty, v.type.count))

    def zext(self, v, ty):
        return self.b.zext(v, vec(ty, v.type.count))

    def splat(self, value, n):
        """An IR scalar broadcast to <n x its type>."""
        v = self.b.insert_element(ir.Constant(vec(value.type, n), ir.Undefined), value,
                                  ir.Constant(I32, 0))
        return self.b.shuffle_vector(v, v, const(I32, [0] * n))

    def pick(self, a, idx, c=None):
        """Elements ``idx`` of ``a`` (or of the concatenation of ``a`` and ``c``)."""
        return self.b.shuffle_vector(a, a if c is None else c, const(I32, idx))

    def concat(self, a, c):
        return self.pick(a, range(2 * a.type.count), c)

    def bits(self, v, shift, mask):
        """(v >> shift) & mask, lane-wise, for Python int shift and mask."""
        n, ty = v.type.count, v.type.element
        if shift:
            v = self.b.lshr(v, const(ty, [shift] * n))
        return self.b.and_(v, const(ty, [mask] * n))

    def _x86(self, name, ret, *args):
        fn = cgutils.get_or_insert_function(
            self.b.module, ir.FunctionType(ret, [a.type for a in args]), name)
        return self.b.call(fn, args)

    def madd(self, a16, x16):
        """<n x i16> . <n x i16> -> <n/2 x i32>: adjacent products summed (``vpmaddwd``)."""
        n = a16.type.count
        if AVX2 and n == 16:
            return self._x86("llvm.x86.avx2.pmadd.wd", vec(I32, 8), a16, x16)
        p = self.b.mul(self.sext(a16, I32), self.sext(x16, I32))
        return self.b.add(self.pick(p, range(0, n, 2)), self.pick(p, range(1, n, 2)))

    def maddubs(self, u8, s8):
        """<32 x i8> unsigned . <32 x i8> signed -> <16 x i16>: adjacent products summed
        (``vpmaddubsw``). The callers' pair sums stay below 2^15: no saturation."""
        if AVX2:
            return self._x86("llvm.x86.avx2.pmadd.ub.sw", vec(I16, 16), u8, s8)
        p = self.b.mul(self.zext(u8, I16), self.sext(s8, I16))
        return self.b.add(self.pick(p, range(0, 32, 2)), self.pick(p, range(1, 32, 2)))

    def lookup16(self, idx, table):
        """<32 x i8>: table[idx] for indices 0..15 into 16 int8 constants (``vpshufb``
        on x86; elsewhere a tree of selects on the index bits)."""
        if AVX2:
            return self._x86("llvm.x86.avx2.pshuf.b", vec(I8, 32), const(I8, [int(v) for v in table] * 2), idx)
        zero = const(I8, [0] * 32)
        level = [const(I8, [int(v)] * 32) for v in table]
        for bit in range(4):
            on = self.b.icmp_unsigned("!=", self.b.and_(idx, const(I8, [1 << bit] * 32)), zero)
            level = [self.b.select(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
        return level[0]

    def pairs(self, v16):
        """<16 x i16> -> <8 x i32>: adjacent lanes summed."""
        return self.madd(v16, const(I16, [1] * 16))

    def hsum(self, v):
        """The sum of the lanes of an integer vector (a scalar)."""
        return self.b.extract_element(self.fold(v, 1), ir.Constant(I32, 0))

    def fold(self, v, n=ROWS):
        """Add the halves of an integer vector until it has ``n`` lanes."""
        while v.type.count > n:
            h = v.type.count // 2
            v = self.b.add(self.pick(v, range(h)), self.pick(v, range(h, 2 * h)))
        return v

    def _hadd(self, u, v):
        """Pairwise sums of u and v in ``vphaddd``'s lane order."""
        return self.b.add(self.pick(u, [0, 2, 8, 10, 4, 6, 12, 14], v),
                          self.pick(u, [1, 3, 9, 11, 5, 7, 13, 15], v))

    def reduce(self, vs):
        """Eight <8 x i32> -> one <8 x i32> whose lane i is the sum of vs[i] (exact)."""
        h = [self._hadd(vs[2 * i], vs[2 * i + 1]) for i in range(4)]
        a, c = self._hadd(h[0], h[1]), self._hadd(h[2], h[3])  # lanes: rows 0-3 | 0-3 (a)
        return self.b.add(self.pick(a, [0, 1, 2, 3, 8, 9, 10, 11], c),
                          self.pick(a, [4, 5, 6, 7, 12, 13, 14, 15], c))

    def float(self, v):
        return self.b.sitofp(v, vec(F32, v.type.count))

    def fsplat(self, value):
        return self.splat(value, ROWS)

    @contextmanager
    def blocks(self):
        """Loop over the blocks of the row; yields the block index (i64)."""
        with cgutils.for_range(self.b, self.n_blocks) as loop:
            yield loop.index


def rows_intrinsic(name, block_bytes, unpack, dot, n_tok=1):
    """An intrinsic (packed, r, r_last, xq, xd, aux, out, t, t_last) over blocks of
    ``block_bytes``: per block k at byte offset o (g.block(k)), ``unpack(g, k, o)`` reads
    the eight rows' weights (anything), then for each token ``dot(g, k, o, state, acc)``
    returns the token's new accumulator (<8 x double>, see Group.accumulate)."""

    def typer(typingctx, packed, r, r_last, xq, xd, aux, out, t, t_last):
        sig = types.void(packed, r, r_last, xq, xd, aux, out, t, t_last)

        def codegen(context, builder, signature, args):
            g = Group(context, builder, signature, args, block_bytes, n_tok)
            zero = ir.Constant(vec(F64, ROWS), [0.0] * ROWS)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(n_tok)]
            with g.blocks() as k:
                o = g.block(k)
                state = unpack(g, k, o)
                for j, acc in enumerate(accs):
                    g.use_token(j)
                    builder.store(dot(g, k, o, state, builder.load(acc)), acc)
            for j, acc in enumerate(accs):
                g.use_token(j)
                g.store(builder.load(acc))
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = name
    return intrinsic(typer)


def pack_rows(raw: np.ndarray, block_bytes: int,
              done: Callable[[int, int], None] | None = None) -> np.ndarray:
    """(n_rows, row_bytes) -> (ceil(n_rows / 8), 8 x row_bytes): each group of eight rows
    interleaved block by block (block b of rows 0..7, then block b + 1, ...); the last
    group padded with copies of the last row.

    Copied a few MiB at a time, with no full-size temporary; ``done(r0, r1)`` is told when
    rows r0..r1-1 have been copied (QWeight drops their mapped pages then, so that the
    source and the copy are never both resident in full)."""
    n, row_bytes = raw.shape
    nb = row_bytes // block_bytes
    n_groups = -(-n // ROWS)
    out = np.empty((n_groups, ROWS * row_bytes), np.uint8)
    step = max(1, PACK_CHUNK_BYTES // max(1, ROWS * row_bytes))   # groups per chunk
    for g0 in range(0, n_groups, step):
        g1 = min(n_groups, g0 + step)
        r0, r1 = g0 * ROWS, min(n, g1 * ROWS)
        src = raw[r0:r1]
        if r1 - r0 < (g1 - g0) * ROWS:   # the last group: pad with the last row
            src = np.concatenate([src, np.repeat(src[-1:], (g1 - g0) * ROWS - (r1 - r0), axis=0)])
        dst = out[g0:g1].reshape(g1 - g0, nb, ROWS, block_bytes)   # a view: written in place
        dst[...] = src.reshape(g1 - g0, ROWS, nb, block_bytes).transpose(0, 2, 1, 3)
        if done is not None:
            done(r0, r1)
    return out.reshape(-1, ROWS * row_bytes)
