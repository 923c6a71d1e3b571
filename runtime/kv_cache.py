"""The KV cache: allocated once for the context, written by position, read by attention."""
from __future__ import annotations

import numpy as np


class ContextFullError(ValueError):
    """The context window has no room for the tokens asked for."""


class KVCache:
    """Keys and values of every layer for positions 0..n_ctx-1 (slot j holds position j)."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, head_dim_v: int,
                 dtype=np.float32):
        self.n_ctx = n_ctx
        self.n_past = 0
        # (n_layer, n_ctx, n_head_kv, head_dim): written in place, never reallocated
        self.k = np.zeros((n_layer, n_ctx, n_head_kv, head_dim), dtype=dtype)
        self.v = np.zeros((n_layer, n_ctx, n_head_kv, head_dim_v), dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def check_room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            raise ContextFullError(
                f"context full: {self.n_past} tokens in the cache + {n} new > context size "
                f"{self.n_ctx}; use a larger --ctx-size or a shorter prompt")

    def store(self, layer: int, p0: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v (n, n_head_kv, d) at positions p0.. and return all keys and values
        up to the last one written, as float32."""
        n = k.shape[0]
        self.k[layer, p0:p0 + n] = k
        self.v[layer, p0:p0 + n] = v
        keys, values = self.k[layer, :p0 + n], self.v[layer, :p0 + n]
        if keys.dtype != np.float32:
            keys, values = keys.astype(np.float32), values.astype(np.float32)
        return keys, values

    def truncate(self, n: int) -> None:
        """Forget positions n.. (the next tokens are written from position n)."""
        self.n_past = min(self.n_past, n)
