"""Programmatic dependent launch: on for Hopper and later GPUs (``gpu.configure(pdl=False)``
or ``ggforge bench --no-pdl`` turns it off).

A decode step is ~10 dependent kernels a layer; between two of them the GPU idles while
the next grid is launched (~2 us each in a CUDA graph on an H200, docs/gpu.md). With PDL
(``launch_pdl``), a kernel's blocks are scheduled while its predecessor still runs and
wait in ``gdc_wait`` until that grid has finished and its writes are visible. Every
kernel of the decode path calls ``start()`` before it touches memory, so each waits for
all earlier ones (transitively) and the order of reads and writes is unchanged.
Off under Triton's interpreter, which has no PTX. Measured on an H200 (docs/gpu.md): tg
1.1B Q8_0 893 -> 1,002 t/s, 5.9B Q8_0 317 -> 327 t/s.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ggforge.runtime.gpu import settings

# the GPU has it (Hopper and later; not Triton's interpreter, which has no PTX): the
# kernels then wait in start(), which is a no-op for a launch without the attribute
CAPABLE = (not settings.INTERPRET and torch.cuda.is_available()
           and torch.cuda.get_device_capability()[0] >= 9)
_ON = tl.constexpr(CAPABLE)


def enabled() -> bool:
    """PDL for the decode kernels: settings.pdl, or where the GPU has it."""
    asked = settings.current().pdl
    return CAPABLE if asked is None else bool(asked) and CAPABLE


def launch() -> dict:
    """The launch options of a decode kernel."""
    return {"launch_pdl": True} if enabled() else {}


@triton.jit
def start():
    if _ON:
        gdc_wait()
        gdc_launch_dependents()
