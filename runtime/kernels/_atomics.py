"""Atomics and spin-wait primitives for compiled code (numba intrinsics), for pool.py.

``load``/``store``/``fetch_add``/``cas`` act on one int64 element of an array, with
acquire / release / acq_rel ordering; ``fence_acquire`` orders the plain loads before it,
``fence_full`` everything;
``pause`` is x86's spin-wait hint, ``cpu_yield`` is ``sched_yield()`` (a pause where there
is none); ``voidptr`` turns an address back into a pointer (for ``numba.carray``).
"""

from __future__ import annotations

import sys

from llvmlite import binding, ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_X86 = binding.get_process_triple().startswith(("x86_64", "i386", "i686"))
_POSIX = sys.platform.startswith(("linux", "darwin", "freebsd"))


def _slot(context, builder, arrty, arr, idx):
    return builder.gep(context.make_array(arrty)(context, builder, arr).data, [idx])


@intrinsic
def load(typingctx, arr, idx):
    """arr[idx] with acquire ordering."""
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig.args[0], *args), "acquire", 8)
    return types.int64(arr, idx), codegen


@intrinsic
def store(typingctx, arr, idx, value):
    """arr[idx] = value with release ordering."""
    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(v, _slot(context, builder, sig.args[0], args[0], args[1]), "release", 8)
        return context.get_dummy_value()
    return types.void(arr, idx, value), codegen


@intrinsic
def fetch_add(typingctx, arr, idx, value):
    """Atomically arr[idx] += value; the old value."""
    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", _slot(context, builder, sig.args[0], args[0], args[1]), v,
                                  "acq_rel")
    return types.int64(arr, idx, value), codegen


@intrinsic
def cas(typingctx, arr, idx, old, new):
    """Atomically: if arr[idx] == old, arr[idx] = new; whether it did."""
    def codegen(context, builder, sig, args):
        p = _slot(context, builder, sig.args[0], args[0], args[1])
        res = builder.cmpxchg(p, args[2], args[3], "acq_rel", "acquire")
        return builder.zext(builder.extract_value(res, 1), ir.IntType(8))
    return types.uint8(arr, idx, old, new), codegen


@intrinsic
def fence_full(typingctx):
    """A sequentially consistent fence: no load or store moves across it."""
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def fence_acquire(typingctx):
    def codegen(context, builder, sig, args):
        builder.fence("acquire")
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def pause(typingctx):
    """The spin-wait hint (x86 ``pause``), nothing elsewhere."""
    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def cpu_yield(typingctx):
    """sched_yield(): let a thread waiting for this core run (a pause elsewhere)."""
    def codegen(context, builder, sig, args):
        if _POSIX:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                                "sched_yield")
            builder.call(fn, [])
        elif _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def voidptr(typingctx, addr):
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return types.voidptr(addr), codegen
