"""The weight type table and the two entry points: ``matmul`` and ``get_rows``.

Each ggml weight type maps to a :class:`Route`: its facts (runtime/type_facts.py: the
``vec_dot_type`` llama.cpp rounds the activations to, the block geometry) and a decode
(one token at a time) and a prefill (several tokens per pass over the weights) kernel. The quantized types' kernels (rows_legacy.py,
rows_kquants.py) read the weights packed (:func:`pack`) and give the same numbers in
both; they run on pool.py's workers (or threads.run_rows for huge outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from ggforge.formats.quants import dequantize
from ggforge.runtime.kernels import act_quant, dot_float, rows_kquants, rows_legacy
from ggforge.runtime.kernels import pool as decode_pool
from ggforge.runtime.kernels._jit import Kernel
from ggforge.runtime.kernels._rows import ROWS as PACK_ROWS
from ggforge.runtime.kernels._rows import pack_rows
from ggforge.runtime.kernels.prefill import ROWS, tokens_last
from ggforge.runtime.kernels.threads import get_threads, run_rows
from ggforge.runtime.type_facts import FACTS, TypeFacts, type_facts

# Up to this many tokens the decode kernels run (each token's dot products against a
# weight row group while it sits in L1); beyond, the prefill kernels (several tokens per
# unpacked block; for F16/BF16, vectorized over tokens padded to a multiple of 16).
DECODE_MAX_TOKENS = 6
# Prefill takes at most this many tokens per pass, so that one pass's activations (for
# F16/BF16 tokens-last float32, n_in x 256 x 4 bytes = 4 MiB at n_in = 4096) stay in cache.
TOKEN_TILE = 256


@dataclass(frozen=True)
class Route:
    """How one weight type is multiplied on the CPU: its facts and its kernels."""

    facts: TypeFacts
    decode: Kernel | None = None     # F16/BF16: a few tokens (F32: numpy)
    prefill: Kernel | None = None    # F16/BF16: many tokens
    rows: Kernel | None = None       # quantized: the row-group kernel (_rows.ROWS_SIG)

    @property
    def vec_dot_type(self) -> str:
        return self.facts.vec_dot_type

    @property
    def qk(self) -> int:
        return self.facts.qk

    @property
    def packed(self) -> bool:
        """Whether the kernel takes the weights packed (_rows.pack_rows)."""
        return self.rows is not None


FL, RL, RK = dot_float, rows_legacy, rows_kquants
_KERNELS = {
    T.F32: {},
    T.F16: dict(decode=FL.mv_f16, prefill=FL.mm_f16),
    T.BF16: dict(decode=FL.mv_bf16, prefill=FL.mm_bf16),
    T.Q8_0: dict(rows=RL.q8_0), T.Q4_0: dict(rows=RL.q4_0), T.Q5_0: dict(rows=RL.q5_0),
    T.IQ4_NL: dict(rows=RL.iq4_nl), T.Q4_1: dict(rows=RL.q4_1), T.Q5_1: dict(rows=RL.q5_1),
    T.Q2_K: dict(rows=RK.q2_K), T.Q3_K: dict(rows=RK.q3_K), T.Q4_K: dict(rows=RK.q4_K),
    T.Q5_K: dict(rows=RK.q5_K), T.Q6_K: dict(rows=RK.q6_K), T.IQ4_XS: dict(rows=RK.iq4_xs),
}
ROUTES: dict[int, Route] = {int(t): Route(FACTS[int(t)], **k) for t, k in _KERNELS.items()}


def route(ggml_type: int) -> Route:
    """The route of a weight type; UnsupportedModelError if there is none."""
    r = ROUTES.get(int(ggml_type))
    if r is None:
        type_facts(ggml_type, "the CPU backend")   # raises, naming the supported types
        raise AssertionError(f"type_facts and ROUTES disagree on {ggml_type}")
    return r


def pack(raw: np.ndarray, ggml_type: int, done=None) -> np.ndarray | None:
    """raw (n_out, row_bytes) as the type's kernels read it: packed in groups of eight rows
    for the row-group kernels, None for the others (they read raw). ``done(r0, r1)``: see
    _rows.pack_rows."""
    if not route(ggml_type).packed:
        return None
    return pack_rows(raw, route(ggml_type).facts.block_bytes, done)


def matmul_raw(x: np.ndarray, raw: np.ndarray, ggml_type: int, n_out: int,
               packed: np.ndarray | None = None) -> np.ndarray:
    """x (T, n_in) float32 C-contiguous, raw (n_out, row_bytes) -> (T, n_out) float32.
    ``packed``: pack(raw, ggml_type) where the type has it (made here if not given)."""
    rt = route(ggml_type)
    if rt.packed and packed is None:
        packed = pack(raw, ggml_type)
    n_tok, n_in = x.shape
    out = np.empty((n_tok, n_out), np.float32)
    if n_tok == 0 or n_out == 0:
        return out
    if rt.vec_dot_type == "f32":  # F32 x F32: BLAS on the mapped weights
        np.matmul(x, raw.view(np.float32).reshape(n_out, n_in).T, out=out)
        return out
    for t0 in range(0, n_tok, TOKEN_TILE):
        t1 = min(n_tok, t0 + TOKEN_TILE)
        _product(rt, int(ggml_type), x[t0:t1], raw if packed is None else packed, out[t0:t1])
    return out


def _product(rt: Route, ggml_type: int, x: np.ndarray, raw: np.ndarray, out: np.ndarray) -> None:
    """out (T, n_out) = x (T, n_in) @ W.T for a quantized or 16-bit weight type; ``raw``
    packed where the route says so."""
    n_tok, n_in = x.shape
    n_out = out.shape[1]
    work = raw.nbytes * n_tok
    if rt.vec_dot_type in ("f16", "bf16"):
        xr = act_quant.round_fp16(x) if rt.vec_dot_type == "f16" else act_quant.round_bf16(x)
        w16 = raw.view(np.uint16).reshape(n_out, n_in)
        if n_tok <= DECODE_MAX_TOKENS:
            run_rows(rt.decode, (w16, xr, out), n_out, work)
        else:
            run_rows(rt.prefill, (w16, tokens_last(xr), out), n_out, work, ROWS)
        return
    xq, xd, *extra = act_quant.quantize(x, rt.vec_dot_type)   # raw is packed here
    auxf = extra[0] if rt.vec_dot_type == "q8_1" else _NO_AUX_F
    auxi = extra[0] if rt.vec_dot_type == "q8_K" else _NO_AUX_I
    args = (raw, xq, xd, auxf, auxi, out)
    pool = None
    if work >= decode_pool.MIN_BYTES and out.size <= decode_pool.MAX_OUT:
        pool = decode_pool.get_pool(get_threads())
    if pool is not None:
        pool.product(rt.rows, args)
    elif n_tok <= DECODE_MAX_TOKENS:
        rt.rows(*args, 0, n_out)
    else:
        run_rows(rt.rows, args, n_out, work, PACK_ROWS)


_NO_AUX_F, _NO_AUX_I = np.zeros((1, 1), np.float32), np.zeros((1, 1), np.int32)


def get_rows_raw(raw: np.ndarray, ggml_type: int, n_in: int, ids: np.ndarray) -> np.ndarray:
    """Dequantize rows ``ids`` of raw (n_rows, row_bytes) -> (len(ids), n_in) float32."""
    route(ggml_type)
    picked = raw[ids]  # (n, row_bytes): only the rows asked for are read
    return dequantize(picked, int(ggml_type), (len(ids), n_in))


def get_rows_packed(packed: np.ndarray, ggml_type: int, n_in: int, ids: np.ndarray) -> np.ndarray:
    """get_rows_raw reading from pack(raw, ggml_type): the same bytes, the same result."""
    block_bytes = route(ggml_type).facts.block_bytes
    n_blocks = packed.shape[1] // PACK_ROWS // block_bytes
    groups = packed.reshape(-1, n_blocks, PACK_ROWS, block_bytes)   # (group, block, lane, byte)
    picked = groups[ids // PACK_ROWS, :, ids % PACK_ROWS, :]        # (n, block, byte)
    return dequantize(picked.reshape(len(ids), -1), int(ggml_type), (len(ids), n_in))
