"""Half-float conversions and the fused multiply-add as LLVM IR (numba intrinsics).

``half(h)`` widens IEEE half bits to float32 with LLVM's ``fpext`` (``vcvtph2ps``),
``half_bits(x)`` rounds a float32 to half bits (``fptrunc``, ``vcvtps2ph``). (The
kernels' vector code is in _rows.py.)
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

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
