"""numba plumbing shared by the kernels: lazy compilation, numba types, scalar helpers.

Three facts about numba (0.68, LLVM 15) decide how every kernel here is written:

* **Only the loop vectorizer runs** (numba turns LLVM's SLP vectorizer off). A loop whose
  trip count is a compile-time constant (``range(32)``) is fully unrolled into scalar code
  and never vectorized. Inner loops therefore run to *runtime* trip counts: block
  geometry (``qk`` = 32 or 256) is passed in as an argument and the loops count
  ``range(qk)`` or ``range(qk >> 1)``.
* **Integer arithmetic is promoted to int64**, which AVX2 cannot multiply in vectors.
  Integer dot products cast after every operation (``I(s + I(H(a) * H(b)))``): LLVM
  then narrows the arithmetic back to 16/32 bits and emits ``vpmaddwd``.
* **Indices are wrapped when they may be negative.** Computed indices are cast to
  unsigned (``U(o + j)``) so no wraparound select sits in a vector loop.

Where a loop over one 16- or 32-element block is all there is (decode), even a well
vectorized loop spends more on its setup and horizontal sum than on the block: the
quantized types' dot products are LLVM vector IR instead (_rows.py).

Kernels are compiled on first use, for one explicit signature each, and cached on disk
(``cache=True``): a model that uses three tensor types compiles three kernels once.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numba
import numpy as np
from numba.core import types

from ggforge.formats.jit import KVALUES_IQ4NL as _KVALUES
from ggforge.formats.jit import bits_f32, clear_stale_cache, f32_bits  # noqa: F401 (re-exported)
from ggforge.formats.jit import half as fp16_bits
from ggforge.formats.jit import jit as helper

U = np.uint64
F = np.float32
I = np.int32  # noqa: E741 (the casts read as types in the kernels)
H = np.int16

# numba types of the kernel signatures
i64 = types.int64
RAW = types.Array(types.uint8, 2, "C", readonly=True)       # (n_out, row_bytes) weight bytes
RAW16 = types.Array(types.uint16, 2, "C", readonly=True)    # (n_out, n_in) F16/BF16 bits
I8M = types.Array(types.int8, 2, "C")                       # (T, n) quantized activations
I4M = types.Array(types.int32, 2, "C")
F4M = types.Array(types.float32, 2, "C")                    # (rows, cols) float32

# kvalues_iq4nl of ggml-common.h (formats/jit.py), as int16 for the kernels' products
KVALUES_IQ4NL = _KVALUES.astype(np.int16)


clear_stale_cache(Path(__file__).parent)


class Kernel:
    """A kernel compiled on first call for one explicit signature, cached on disk.

    Kernels release the GIL (``nogil``): :mod:`threads` runs them on row ranges from a
    few threads, which uses the cores as ``prange`` would without parfor's compile time.
    """

    def __init__(self, pyfunc, signature, fastmath):
        self.pyfunc = pyfunc
        self.signature = signature
        self.fastmath = fastmath
        self._dispatcher = None
        self._lock = threading.Lock()
        self.__name__ = pyfunc.__name__
        self.__doc__ = pyfunc.__doc__

    def compile(self):
        """Compile (or load from the cache) now; returns the numba dispatcher."""
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = numba.njit(
                    self.signature, cache=True, nogil=True, error_model="numpy",
                    fastmath=set(self.fastmath) if self.fastmath else False,
                )(self.pyfunc)
        return self._dispatcher

    def __call__(self, *args):
        d = self._dispatcher
        if d is None:
            d = self.compile()
        return d(*args)

    def native_address(self) -> int:
        """The address of the compiled function itself (numba's calling convention: status
        = f(return slot, exception slot, *arguments as their data models)), for compiled
        code that calls kernels it was not compiled with (pool.call_kernel)."""
        cres = self.compile().overloads[self.signature.args]
        return cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)


def kernel(signature, fastmath=False):
    """Decorator: a :class:`Kernel` for ``signature`` (a numba signature)."""
    return lambda pyfunc: Kernel(pyfunc, signature, fastmath)


# Float reductions vectorize only when reassociation is allowed. Integer-valued sums
# (the quantized kernels) are exact in any order; float kernels accept the reordering,
# as ggml's own SIMD code reorders its sums.
FAST = frozenset({"reassoc", "contract", "nsz"})


# ---------------------------------------------------------------- half floats

_TWO_M24 = F(2.0**-24)


@helper
def half_bits_to_f32(h):
    """IEEE half bits -> float32 (LLVM ``fpext``: vectorizes to ``vcvtph2ps``)."""
    return fp16_bits(h)


@helper
def round_to_half(f):
    """float32 -> the float32 value of its nearest half (round half to even, as F16C's
    ``vcvtps2ph``): overflow gives Inf, NaN stays NaN."""
    a = abs(f)
    if not a < F(65520.0):
        return f if a != a else (F(np.inf) if f > 0 else F(-np.inf))
    if a < F(6.103515625e-05):                   # subnormal halves: steps of 2^-24
        r = F(np.rint(a * F(16777216.0))) * _TWO_M24
    else:                                         # 11 significant bits
        q = bits_f32(((f32_bits(a) >> 23) - 10) << 23)  # 2^(exponent - 10)
        r = F(np.rint(a / q)) * q
    return -r if f < 0 else r
