"""Programmatic dependent launch (Hopper and later), opt-in: GGFORGE_PDL=1.

A decode step is ~10 dependent kernels a layer; between two of them the GPU idles while
the next grid is launched (~2 us each in a CUDA graph on an H200, NOTES.md). With PDL
(``launch_pdl``), a kernel's blocks are scheduled while its predecessor still runs and
wait in ``gdc_wait`` until that grid has finished and its writes are visible. Every
kernel of the decode path calls ``start()`` before it touches memory, so each waits for
all earlier ones (transitively) and the order of reads and writes is unchanged.
Off under Triton's interpreter, which has no PTX.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ON = os.environ.get("GGFORGE_PDL") == "1" and os.environ.get("TRITON_INTERPRET") != "1"
_ON = tl.constexpr(ON)
LAUNCH = {"launch_pdl": True} if ON else {}   # launch options of the decode kernels


@triton.jit
def start():
    if _ON:
        gdc_wait()
        gdc_launch_dependents()
