"""The KV cache: allocated once for the context, written by position, read by attention."""
from __future__ import annotations

import os

import numpy as np


class ContextFullError(ValueError):
    """The context window has no room for the tokens asked for."""


class CacheTooLargeError(ValueError):
    """The KV cache for the context size asked for does not fit in memory."""


def available_memory() -> int | None:
    """Bytes the system can still give this process (Linux MemAvailable); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


# --cache-type-k / --cache-type-v: the element types the CPU cache can hold (llama.cpp's
# default is f16; f32 keeps our logits equal to llama.cpp's with an f32 cache)
CACHE_TYPES = {"f32": np.float32, "f16": np.float16}


def cache_dtype(name) -> np.dtype:
    """The numpy type of a cache type name ('f32', 'f16'), or a numpy float type itself."""
    if not isinstance(name, str):
        dt = np.dtype(name)
        if dt in (np.dtype(np.float32), np.dtype(np.float16)):
            return dt
        name = str(dt)
    dt = CACHE_TYPES.get(name.lower())
    if dt is None:
        raise ValueError(f"KV cache type {name!r} is not supported; supported: "
                         + ", ".join(CACHE_TYPES))
    return np.dtype(dt)


class KVCache:
    """Keys and values of every layer for positions 0..n_ctx-1 (slot j holds position j),
    keys as ``dtype``, values as ``v_dtype`` (default: ``dtype``): F32 or F16."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, head_dim_v: int,
                 dtype=np.float32, v_dtype=None, flash_attn: bool = False):
        self.n_ctx = n_ctx
        self.n_past = 0
        self.gpu = None  # the device layers' cache (runtime/gpu/backend.py), if any
        k_dtype = cache_dtype(dtype)
        v_dtype = k_dtype if v_dtype is None else cache_dtype(v_dtype)
        # llama.cpp's flash-attention arithmetic over an F16 cache (layers.flash_attention)
        self.flash_attn = bool(flash_attn)
        if self.flash_attn and not k_dtype == v_dtype == np.float16:
            raise ValueError("flash attention needs an F16 key and value cache")
        # Checked before allocating: numpy would raise MemoryError for an impossible size,
        # or (lazily zeroed pages) let a too-large cache fail later, mid-generation.
        ks, vs = k_dtype.itemsize, v_dtype.itemsize
        need = n_layer * n_ctx * n_head_kv * (head_dim * ks + head_dim_v * vs)
        free = available_memory()
        too_large = CacheTooLargeError(
            f"a KV cache of {n_ctx} tokens needs {need / 2**30:,.2f} GiB ({n_layer} layers x "
            f"{n_ctx} tokens x {n_head_kv} heads x ({head_dim} x {ks} + {head_dim_v} x {vs} bytes))"
            + ("" if free is None else f" but only {free / 2**30:,.2f} GiB of memory is available")
            + "; use a smaller --ctx-size" + ("" if vs == ks == 2 else " or --cache-type-k/v f16"))
        if free is not None and need > free:
            raise too_large
        try:
            # (n_layer, n_ctx, n_head_kv, head_dim): written in place, never reallocated
            self.k = np.zeros((n_layer, n_ctx, n_head_kv, head_dim), dtype=k_dtype)
            self.v = np.zeros((n_layer, n_ctx, n_head_kv, head_dim_v), dtype=v_dtype)
        except MemoryError:
            raise too_large from None

    @property
    def k_f16(self) -> bool:
        return self.k.dtype == np.float16

    @property
    def v_f16(self) -> bool:
        return self.v.dtype == np.float16

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + (self.gpu.nbytes if self.gpu is not None else 0)

    def check_room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            raise ContextFullError(
                f"context full: {self.n_past} tokens in the cache + {n} new > context size "
                f"{self.n_ctx}; use a larger --ctx-size or a shorter prompt")

    def store(self, layer: int, p0: int, k: np.ndarray, v: np.ndarray,
              as_stored: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v (n, n_head_kv, d) at positions p0.. and return all keys and values
        up to the last one written, as float32 (``as_stored``: as the cache holds them,
        views of it, no copy)."""
        n = k.shape[0]
        self.k[layer, p0:p0 + n] = k     # to F16: round to nearest even, as ggml_cpy
        self.v[layer, p0:p0 + n] = v
        keys, values = self.k[layer, :p0 + n], self.v[layer, :p0 + n]
        if as_stored:
            return keys, values
        if keys.dtype != np.float32:
            keys = keys.astype(np.float32)
        if values.dtype != np.float32:
            values = values.astype(np.float32)
        return keys, values

    def truncate(self, n: int) -> None:
        """Forget positions n.. (the next tokens are written from position n)."""
        self.n_past = min(self.n_past, n)
        if self.gpu is not None:
            self.gpu.truncate(self.n_past)

    def reusable(self, n: int) -> int:
        """How many of the first n cached positions a new prompt may keep: all of them,
        unless a sliding-window ring on the device has overwritten what position n needs."""
        n = min(n, self.n_past)
        return n if self.gpu is None else self.gpu.reusable(n)
