"""GPU offload: the last layers of a model on a CUDA device (torch + Triton).

torch and Triton are an optional extra: ``pip install 'ggforge[gpu]'``. Nothing here is
imported unless a model is offloaded (``--gpu-layers`` other than 0).
"""
from __future__ import annotations

INSTALL_HINT = ("GPU offload needs torch with CUDA and Triton: pip install 'ggforge[gpu]' "
                "(or run with --gpu-layers 0)")


class GpuUnavailableError(ValueError):
    """No torch/Triton, or no CUDA device, for a run that asked for GPU layers."""


def _torch():
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as e:
        raise GpuUnavailableError(f"{INSTALL_HINT} ({e.name} is not installed)") from None
    return torch


def cuda_free_memory() -> int | None:
    """Bytes free on the current CUDA device, or None without torch or a device."""
    try:
        torch = _torch()
    except GpuUnavailableError:
        return None
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def resolve_device(device=None):
    """The torch device to offload to: ``device`` if given ('cpu' runs the same kernels in
    Triton's interpreter, for tests), else the current CUDA device."""
    torch = _torch()
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        raise GpuUnavailableError("--gpu-layers asks for a GPU but torch sees no CUDA device "
                                  "(a CPU-only torch, or no driver); run with --gpu-layers 0")
    return torch.device("cuda")


def backend_for(model, first: int, head: bool, device=None):
    """GpuLayers for layers first.. of model (and its output head if head)."""
    dev = resolve_device(device)
    from ggforge.runtime.gpu.backend import GpuLayers

    return GpuLayers(model, first, head, dev)


def configure(**changes):
    """Change the GPU backend's settings (runtime/gpu/settings.py: ``pdl``, ``q8_tiles``)."""
    _torch()
    from ggforge.runtime.gpu import settings

    return settings.configure(**changes)
