"""Weights on a torch device, still quantized, and the products that read them.

    gw = GWeight.upload(qweight, device)     # the GGUF block bytes, copied as they are
    y = matmul(x, gw)                        # x (n_tokens, n_in) float32 -> (n_tokens, n_out)
    e = get_rows(gw, ids)                    # embedding rows as float32

A few tokens take the matrix-vector kernel (decode), more take the tiled matrix-matrix
kernel (prefill); both dequantize inside the kernel (triton_kernels.py).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ggforge.formats.errors import UnsupportedModelError
from ggforge.formats.quants.k_common import KVALUES_IQ4NL
from ggforge.runtime.kernels import QWeight
from ggforge.runtime.type_facts import TypeFacts, type_facts

import triton

from ggforge.runtime.gpu import k4_kernels as K4
from ggforge.runtime.gpu import pdl, settings
from ggforge.runtime.gpu import q8_kernels as Q8
from ggforge.runtime.gpu import triton_kernels as K

ACT = K.ACT_CODES
FLOATS = {int(T.F32): torch.float32, int(T.F16): torch.float16, int(T.BF16): torch.bfloat16}
# up to this many tokens the matrix-vector kernels run: their integer decode kernels equal
# the CPU's products bit for bit, as the attention of up to layers.ATTEND_MAX_TOKENS (16)
# queries does, so a prompt of up to 16 tokens gives the CPU's logits (longer prompts take
# the GEMM kernels, which sum in float32)
DECODE_MAX_TOKENS = 16
# Triton's interpreter pays per program: give it few, large tiles
INTERPRET = settings.INTERPRET
_TABLES: dict[torch.device, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    """The IQ4_NL/IQ4_XS levels as float32 on the device."""
    t = _TABLES.get(device)
    if t is None:
        t = _TABLES[device] = torch.tensor(KVALUES_IQ4NL.astype(np.float32), device=device)
    return t


@dataclass
class GWeight:
    """A 2-D ggml weight on a device: ``data`` holds its rows, block bytes unchanged."""

    data: torch.Tensor          # uint8 (n_out, row_bytes), or (n_out, n_in) F32/F16/BF16
    ggml_type: int
    n_in: int
    n_out: int
    act: int                    # activation rounding code (vec_dot_type)
    bk: int                     # columns per kernel step: a multiple of the block size
    planes: tuple | None = None  # Q8_0: (quants int8 (n_out, n_in), scales fp16 (n_out, n_in/32))

    @classmethod
    def upload(cls, w: QWeight, device: torch.device | str) -> "GWeight":
        t = int(w.ggml_type)
        route = gpu_route(t)
        f = route.facts
        with warnings.catch_warnings():   # the file's read-only pages: copied, never written
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(np.ascontiguousarray(w.raw).view(np.uint8)).to(device)
        if route.planes and w.n_in % 128 == 0:   # same bytes, regrouped on the device
            blocks = data.reshape(w.n_out, w.n_in // 32, 34)
            planes = (blocks[:, :, 2:].contiguous().view(torch.int8).reshape(w.n_out, w.n_in),
                      blocks[:, :, :2].contiguous().view(torch.float16).reshape(w.n_out, -1))
            bk = 512 if w.n_in % 512 == 0 else 256 if w.n_in % 256 == 0 else 128
            return cls(planes[0], t, w.n_in, w.n_out, ACT[f.vec_dot_type], bk, planes)
        if f.device_block:                 # blocks padded: word-aligned
            blocks = data.reshape(w.n_out, -1, f.block_bytes)
            pad = torch.zeros((w.n_out, blocks.shape[1], f.device_block - f.block_bytes),
                              dtype=torch.uint8, device=data.device)
            data = torch.cat([pad, blocks] if f.pad_front else [blocks, pad], dim=2).reshape(w.n_out, -1)
        elif torch.device(device).type == "cpu":
            data = data.clone()            # on the CPU .to() kept the file's pages
        if t in FLOATS:
            data = data.view(FLOATS[t]).reshape(w.n_out, w.n_in)
            bk = 128
        else:
            bk = next(b for b in (256, 128, 64, 32) if b % f.qk == 0 and w.n_in % b == 0)
        return cls(data, t, w.n_in, w.n_out, ACT[f.vec_dot_type], bk)

    @classmethod
    def upload_group(cls, ws: list[QWeight], device) -> list["GWeight"]:
        """Weights that read the same input (q|k|v, gate|up): one weight with their rows
        stacked when they share a type (one kernel launch), else one each."""
        if len({int(w.ggml_type) for w in ws}) != 1 or len({w.n_in for w in ws}) != 1:
            return [cls.upload(w, device) for w in ws]
        rows = QWeight(np.concatenate([w.raw for w in ws]), ws[0].ggml_type, ws[0].n_in,
                       sum(w.n_out for w in ws))
        return [cls.upload(rows, device)]

    @property
    def nbytes(self) -> int:
        parts = self.planes if self.planes is not None else (self.data,)
        return sum(p.numel() * p.element_size() for p in parts)

    @property
    def row_stride(self) -> int:
        return self.data.shape[1]


def matmul(x: torch.Tensor, w: GWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` for float32 x (n_tokens, n_in) on the weight's device."""
    n_tok = x.shape[0]
    x = x.contiguous()
    if out is None:
        out = torch.empty((n_tok, w.n_out), dtype=torch.float32, device=x.device)
    if w.planes is not None:
        return _matmul_q8_0(x, w, out)
    if n_tok <= DECODE_MAX_TOKENS:
        return gpu_route(w.ggml_type).decode(x, w, out)
    _gemm(x, w, out)
    return out


def _gemv(x: torch.Tensor, w: GWeight, out: torch.Tensor) -> torch.Tensor:
    """Decode through the generic kernel (triton_kernels._gemv: any type, element-wise
    dequantization, float64 sums)."""
    # tile sweep on an H100 (Q8_0 1.1B, 2026-11): 2 rows x 512 columns, 2 warps was fastest
    # for q|k|v, ffn_down and the output head alike
    bm, nw = (128, 4) if INTERPRET else (2, 2)
    bk = 512 if w.n_in % 512 == 0 and 512 % w.bk == 0 else w.bk
    grid = (triton.cdiv(w.n_out, bm), x.shape[0])
    K._gemv[grid](w.data, x, out, _table(x.device), w.n_out, w.n_in, w.row_stride,
                  TYPE=w.ggml_type, ACT=w.act, BM=bm, BK=bk, num_warps=nw, enable_fp_fusion=False,
                  **pdl.launch())
    return out


def _gemv_block32_words(x: torch.Tensor, w: GWeight, out: torch.Tensor) -> torch.Tensor:
    """Q4_0/Q5_0 decode: integer dot products on the padded blocks' words."""
    return Q8.matmul_q5_0(x, w.data, w.ggml_type == int(T.Q5_0), w.n_out, w.n_in, out,
                          **(dict(BM=64) if INTERPRET else {}))


def _gemv_k_words(words: str):
    """Q4_K/Q5_K/Q6_K decode: integer dot products on words (k4_kernels, ``words`` its
    layout name)."""
    def decode(x: torch.Tensor, w: GWeight, out: torch.Tensor) -> torch.Tensor:
        return K4.matmul_k(x, w.data, words, w.n_out, w.n_in, out, **(dict(BM=64) if INTERPRET else {}))
    return decode


def _gemm(x: torch.Tensor, w: GWeight, out: torch.Tensor) -> None:
    """Prefill through the tiled kernel (triton_kernels._gemm: float32 sums, FMA: see
    matmul_q8)."""
    n_tok = x.shape[0]
    bt, bm = (64, 128) if INTERPRET else (32, 32)
    bk = min(w.bk, 128) if w.act != ACT["q8_K"] else 256
    grid = (triton.cdiv(w.n_out, bm), triton.cdiv(n_tok, bt))
    K._gemm[grid](w.data, x, out, _table(x.device), n_tok, w.n_out, w.n_in, w.row_stride,
                  TYPE=w.ggml_type, ACT=w.act, BT=bt, BM=bm, BK=bk, num_warps=4)


@dataclass(frozen=True)
class GpuRoute:
    """How one weight type is held and multiplied on the device: its facts (type_facts.py),
    whether Q8_0 planes replace the blocks, and the decode kernel (up to DECODE_MAX_TOKENS
    tokens; prefill is triton_kernels._gemm for every type, or matmul_q8 for planes)."""

    facts: TypeFacts
    decode: Callable[[torch.Tensor, "GWeight", torch.Tensor], torch.Tensor] = _gemv
    planes: bool = False


GPU_ROUTES: dict[int, GpuRoute] = {int(t): GpuRoute(type_facts(t), *rest) for t, *rest in (
    (T.F32,), (T.F16,), (T.BF16,),
    (T.Q8_0, _gemv, True),          # planes where n_in % 128 == 0, else the generic kernels
    (T.Q4_0, _gemv_block32_words), (T.Q5_0, _gemv_block32_words),
    (T.Q4_1,), (T.Q5_1,), (T.IQ4_NL,),
    (T.Q2_K,), (T.Q3_K,),
    (T.Q4_K, _gemv_k_words("q4_K")), (T.Q5_K, _gemv_k_words("q5_K")), (T.Q6_K, _gemv_k_words("q6_K")),
    (T.IQ4_XS,),
)}


def gpu_route(ggml_type: int) -> GpuRoute:
    """The device route of a weight type; UnsupportedModelError naming the supported ones."""
    r = GPU_ROUTES.get(int(ggml_type))
    if r is None:
        type_facts(ggml_type)   # a type the runtime lacks altogether: that message
        raise UnsupportedModelError(
            f"the GPU backend has no kernel for weight type {type_facts(ggml_type).name}; "
            f"supported: {', '.join(r.facts.name for r in GPU_ROUTES.values())} (keep such "
            "layers on the CPU: a smaller --gpu-layers)")
    return r


# Q8_0 planar tiles (scripts/device/q8_sweep.py): decode 8 rows x 512 columns, 8 warps
# (H100, 1.1B shapes: 2.4-2.9 TB/s from DRAM); where rows and columns both number 4,096 or
# more, 2,048-column steps (H200, 7B shapes: ffn_down 8.4 us against 33 us in 256-column steps),
# and the two shapes whose sweep chose otherwise. Prefill 64 tokens x 128 rows, int8 dots
# 32 columns deep.
Q8_GEMV = dict(BM=8, BK=512, num_warps=8)
Q8_GEMV_WIDE = dict(BM=8, BK=2048, num_warps=8)
Q8_GEMV_SWEPT = {(6144, 4096): dict(BM=16, BK=1024, num_warps=4),     # 7B q|k|v
                 (22016, 4096): dict(BM=4, BK=2048, num_warps=4)}     # 7B gate|up
Q8_GEMM = dict(BT=64, BM=128, BK=64, num_warps=4)


def q8_gemv_tiles(n_out: int, n_in: int) -> dict:
    """Decode tiles for a Q8_0-planar product of this shape (settings.q8_tiles, e.g. a
    sweep's file read by settings.read_tile_file, first: to try a sweep's choice before
    it is made the default here)."""
    tiles = settings.current().q8_tiles.get(f"{n_out}x{n_in}")
    if tiles is None:
        wide = min(n_out, n_in) >= 4096
        tiles = Q8_GEMV_SWEPT.get((n_out, n_in), Q8_GEMV_WIDE if wide else Q8_GEMV)
    return dict(tiles)


def _matmul_q8_0(x: torch.Tensor, w: GWeight, out: torch.Tensor) -> torch.Tensor:
    """Round the activations to Q8_0 once, then integer block sums against the planes."""
    return matmul_q8(*Q8.quant_act(x), w, out)


def matmul_q8(xq: torch.Tensor, xd: torch.Tensor, w: GWeight,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` for a Q8_0-planar W from activations already rounded to Q8_0 (xq int8
    (n_tokens, n_in), xd float32 scales (n_tokens, n_in/32))."""
    q, d = w.planes
    n_tok = xq.shape[0]
    if out is None:
        out = torch.empty((n_tok, w.n_out), dtype=torch.float32, device=xq.device)
    if n_tok <= DECODE_MAX_TOKENS:
        cfg = dict(BM=128, BK=256, num_warps=4) if INTERPRET else q8_gemv_tiles(w.n_out, w.n_in)
        Q8._gemv[(triton.cdiv(w.n_out, cfg["BM"]), n_tok)](
            q.view(torch.int32), d, xq.view(torch.int32), xd, out, w.n_out, w.n_in, **cfg,
            enable_fp_fusion=False, **pdl.launch())
        return out
    cfg = dict(BT=64, BM=128, BK=128, num_warps=4) if INTERPRET else Q8_GEMM
    grid = (triton.cdiv(w.n_out, cfg["BM"]), triton.cdiv(n_tok, cfg["BT"]))
    # the prefill products keep fused multiply-adds: they sum in float32 in their own order
    # (not the CPU's bits in any case), and without them each block's scaling of a tile is
    # a multiply and an add instead of one fma (sm_90 PTX of a 64 x 128 tile, 64 columns a
    # step: 256 float32 instructions a step with fma, 384 without, beside 10 int8 mma)
    Q8._gemm[grid](q, d, xq, xd, out, n_tok, w.n_out, w.n_in, **cfg)
    return out


def matmul_group(x: torch.Tensor, ws: list[GWeight]) -> torch.Tensor:
    """The products of x with each weight of a group, side by side."""
    if len(ws) == 1:
        return matmul(x, ws[0])
    return torch.cat([matmul(x, w) for w in ws], dim=1)


def get_rows(w: GWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (int64 on the device) of ``w`` as float32 (len(ids), n_in)."""
    if w.planes is not None:
        q, d = w.planes
        return (q[ids].float().reshape(len(ids), -1, 32) * d[ids].float()[:, :, None]).reshape(len(ids), -1)
    out = torch.empty((ids.shape[0], w.n_in), dtype=torch.float32, device=ids.device)
    bk = w.bk
    grid = (ids.shape[0], triton.cdiv(w.n_in, bk))
    K._dequant_rows[grid](w.data, ids, out, _table(ids.device), w.n_in, w.row_stride,
                          TYPE=w.ggml_type, BK=bk, enable_fp_fusion=False)
    return out

