"""libggml's own flash attention (GGML_OP_FLASH_ATTN_EXT on the CPU backend) through
ctypes: a one-op graph built and computed by the llama.cpp bundled with llama-cpp-python.

    out = flash_attn_ext(q, k16, v16, visible, scale, n_threads)

q (n_q, n_head, d) float32, k16 / v16 (n_kv, n_head_kv, d) float16, visible (n_q, n_kv)
bool -> (n_q, n_head * dv) float32, as llama.cpp's graph computes it with an F16 cache
(ggml_flash_attn_ext + GGML_PREC_F32, its mask F16 0 / -inf).
"""
from __future__ import annotations

import ctypes

import numpy as np

from ggml_oracle import ggml_or_skip

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
GGML_PREC_F32 = 10


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", _P), ("no_alloc", ctypes.c_bool)]


_LIBS: list = []


def _libs():
    if not _LIBS:
        g = ggml_or_skip()
        # our own handle: argtypes set here must not clash with other tests' bindings of
        # the same functions (ctypes keeps them per CDLL object)
        base = ctypes.CDLL(str(g.lib_dir / "libggml-base.so"))
        cpu = ctypes.CDLL(str(g.lib_dir / "libggml-cpu.so"))
        base.ggml_init.argtypes = [_InitParams]
        base.ggml_init.restype = _P
        base.ggml_free.argtypes = [_P]
        base.ggml_new_tensor_4d.argtypes = [_P, ctypes.c_int, _I64, _I64, _I64, _I64]
        base.ggml_new_tensor_4d.restype = _P
        base.ggml_get_data.argtypes = [_P]
        base.ggml_get_data.restype = _P
        base.ggml_flash_attn_ext.argtypes = [_P, _P, _P, _P, _P, ctypes.c_float, ctypes.c_float, ctypes.c_float]
        base.ggml_flash_attn_ext.restype = _P
        base.ggml_flash_attn_ext_set_prec.argtypes = [_P, ctypes.c_int]
        base.ggml_new_graph.argtypes = [_P]
        base.ggml_new_graph.restype = _P
        base.ggml_build_forward_expand.argtypes = [_P, _P]
        cpu.ggml_graph_compute_with_ctx.argtypes = [_P, _P, ctypes.c_int]
        cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
        cpu.ggml_cpu_init.restype = None
        cpu.ggml_cpu_init()
        _LIBS.extend([base, cpu])
    return _LIBS


def _tensor(base, ctx, gtype, data: np.ndarray, ne: tuple[int, int, int, int]):
    t = base.ggml_new_tensor_4d(ctx, gtype, *ne)
    src = np.ascontiguousarray(data)   # held: its buffer must outlive the copy
    ctypes.memmove(base.ggml_get_data(t), src.ctypes.data, src.nbytes)
    return t


def flash_attn_ext(q: np.ndarray, k16: np.ndarray, v16: np.ndarray, visible: np.ndarray,
                   scale: float, n_threads: int, logit_softcap: float = 0.0) -> np.ndarray:
    base, cpu = _libs()
    n_q, n_head, d = q.shape
    n_kv, n_head_kv, dv = v16.shape
    need = 4 * (q.size + k16.size + v16.size + visible.size + n_q * n_head * dv) \
        + n_threads * 4 * (d + 2 * dv + 64) * 64 + (64 << 20)
    ctx = base.ggml_init(_InitParams(need, None, False))
    try:
        # ggml's ne order: innermost first; llama.cpp's q is (d, n_q, n_head), k/v (d, n_kv, n_head_kv)
        tq = _tensor(base, ctx, GGML_TYPE_F32, q.astype(np.float32).transpose(1, 0, 2), (d, n_q, n_head, 1))
        tk = _tensor(base, ctx, GGML_TYPE_F16, k16.astype(np.float16).transpose(1, 0, 2), (d, n_kv, n_head_kv, 1))
        tv = _tensor(base, ctx, GGML_TYPE_F16, v16.astype(np.float16).transpose(1, 0, 2), (dv, n_kv, n_head_kv, 1))
        mask = np.where(visible, np.float16(0), np.float16(-np.inf)).astype(np.float16)
        tm = _tensor(base, ctx, GGML_TYPE_F16, mask, (n_kv, n_q, 1, 1))
        out = base.ggml_flash_attn_ext(ctx, tq, tk, tv, tm, scale, 0.0, logit_softcap)
        base.ggml_flash_attn_ext_set_prec(out, GGML_PREC_F32)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        assert cpu.ggml_graph_compute_with_ctx(ctx, graph, n_threads) == 0
        res = np.empty((n_q, n_head, dv), np.float32)          # ne (dv, n_head, n_q)
        ctypes.memmove(res.ctypes.data, base.ggml_get_data(out), res.nbytes)
        return res.reshape(n_q, n_head * dv)
    finally:
        base.ggml_free(ctx)
