"""The package's numba and LLVM plumbing, in one place: decorators, bit casts, half floats,
the fused multiply-add, stack scratch, ggml's tables, and the on-disk cache's guard.

The quantizers (formats/quants) and the runtime's kernels (runtime/kernels) both compile
with numba and both need C's bit-level operations; they take them from here.

    jit / sig(signature) / driver     numba.njit with the package's settings
    f32_bits, bits_f32                reinterpret float32 <-> int32 (C's memcpy)
    half, half_bits                   IEEE half <-> float32 (LLVM fpext / fptrunc: F16C)
    fma32                             a * b + c rounded once (llvm.fma.f32)
    stack_f32(n)                      a float32 scratch buffer on the caller's stack
    clear_stale_cache(folder)         drop a folder's cached kernels when a source changed
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, errors, types
from numba.extending import intrinsic

F = np.float32

jit = numba.njit(cache=True, error_model="numpy")
"""Decorator of functions compiled lazily, for the types they are called with (also the
helpers a kernel calls, compiled into it)."""


def sig(signature):
    """Decorator of a scalar helper compiled eagerly for one explicit signature.

    Pinning the types matters for compile time: called from jitted code with literal
    arguments (``make_qx_quants(16, 32, ...)``), numba would otherwise compile one
    specialization per distinct literal.
    """
    return numba.njit(signature, cache=True, error_model="numpy")


driver = numba.njit(cache=True, error_model="numpy", nogil=True)
"""Decorator of the loops over blocks that Python calls. They release the GIL, and the
package's worker threads (formats/workers.py) run them on slices: the same use of the
cores as ``parallel=True`` with ``prange``, without its compile time (numba's parfor
passes added about 18 s to a cold start of the seven K/IQ4 types, 50 s instead of 32 s)."""

# kvalues_iq4nl of ggml-common.h: the 16 non-linear levels of IQ4_NL / IQ4_XS.
KVALUES_IQ4NL = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)


# ---------------------------------------------------------------- bit casts

@intrinsic
def f32_bits(typingctx, x):
    """Reinterpret a float32 as int32 (C's ``memcpy(&i, &f, 4)``)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, i):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(i), codegen


@intrinsic
def stack_f32(typingctx, n):
    """A pointer to ``n`` (a literal int) float32 on the stack of the calling function;
    ``numba.carray(stack_f32(8), (8,))`` makes it an array.

    For scratch that the hot loops of a kernel write: unlike an ``np.empty`` (a heap
    allocation per call, and a pointer LLVM must assume may alias the arguments), a
    stack buffer costs nothing and provably overlaps nothing, so loops over it vectorize
    without run-time overlap checks (k_lanes). The buffer is only valid until the
    function that called this returns: never return or store the array.
    """
    if not isinstance(n, types.IntegerLiteral):
        raise errors.RequireLiteralValue(n)
    count = n.literal_value

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, ir.FloatType(), size=count)

    return types.CPointer(types.float32)(n), codegen


# ---------------------------------------------------------------- half floats, fma

_I16 = ir.IntType(16)


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


@intrinsic
def half_bits(typingctx, x):
    """float32 -> the bits (uint16) of its nearest half, rounding half to even (LLVM
    ``fptrunc``: ``vcvtps2ph``, as ggml's GGML_CPU_FP32_TO_FP16)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

    return types.uint16(x), codegen


@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c on float32, rounded once (LLVM ``llvm.fma.f32``: ``vfmadd``), as ggml's
    SIMD code and its compiler-contracted ``x*y + z`` compute it."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        f = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f, [f, f, f]), "llvm.fma.f32")
        return builder.call(fn, args)

    return types.float32(a, b, c), codegen


# ---------------------------------------------------------------- the disk cache

def clear_stale_cache(here: Path) -> None:
    """Drop the cached kernels of folder ``here`` when any of its sources or this module
    changed.

    numba invalidates a cached function only when *its own* file changes, not when a
    helper it calls (in another file) does; a kernel would keep running old helper code.
    A fingerprint of the folder's sources and of this module, kept beside the cache,
    catches that.
    """
    digest = hashlib.sha1()
    for src in sorted(here.glob("*.py")) + [Path(__file__)]:
        digest.update(src.name.encode() + src.read_bytes())
    cache = here / "__pycache__"
    stamp = cache / "kernels.sha1"
    try:
        if stamp.exists() and stamp.read_text() == digest.hexdigest():
            return
        cache.mkdir(exist_ok=True)
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:  # a read-only install: numba caches elsewhere, sources do not change
        pass


