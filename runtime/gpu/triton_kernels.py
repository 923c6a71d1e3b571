"""Triton kernels that multiply activations by ggml-quantized weights, block bytes as the
GGUF file holds them (uploaded unchanged: still quantized).

One dequantizer per ggml type (``_deq``) maps a tile of element indices to float32 weight
values, read straight from the block bytes; two kernels use it:

* ``_gemv``: a few tokens (decode). Each program owns ``BM`` output rows and streams
  their bytes once, ``BK`` columns at a time, multiplying element-wise and summing.
* ``_gemm``: many tokens (prefill). Tiles of ``BT`` tokens x ``BM`` rows, the
  dequantized ``BM x BK`` weight tile fed to ``tl.dot`` in float32 (IEEE, no TF32).

Activations are first rounded as llama.cpp's CPU backend rounds them for the weight's
``vec_dot_type`` (runtime/kernels/act_quant.py): Q8_0/Q8_1 blocks of 32 (scale
fp16(amax/127), multiplier 127/amax, round half to even), Q8_K blocks of 256 (scale
-max/127 of the first element of largest magnitude), fp16 or bf16 for F16/BF16 weights.
So these kernels compute the CPU backend's products up to float32 summation order (the
integer decode kernels of q8_kernels.py and k4_kernels.py, which decode the common types,
equal them bit for bit).

The same source runs on a CUDA GPU and, in Triton's interpreter, on a machine without one
(TRITON_INTERPRET=1, which the test suite sets without a GPU: how it checks every type).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ggforge.runtime.gpu import pdl

C = tl.constexpr  # module constants a kernel reads must be constexpr objects

# ggml type ids (gguf.GGMLQuantizationType) used as compile-time switches
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = C(0), C(1), C(2), C(3), C(6), C(7), C(8)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = C(10), C(11), C(12), C(13), C(14)
IQ4_NL, IQ4_XS, BF16 = C(20), C(23), C(30)

# activation rounding (vec_dot_type) codes; ACT_CODES is the plain-int table for callers
ACT_CODES = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q8_1": 4, "q8_K": 5}
ACT_F32, ACT_F16, ACT_BF16, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = (C(v) for v in ACT_CODES.values())

# 1.5 * 2**23: adding and subtracting it rounds a float32 of magnitude < 2**22 to an
# integer, half to even (the rounding of _mm256_round_ps / np.rint)
_RNE_MAGIC = C(12582912.0)


@triton.jit
def _u8(p, off):
    return tl.load(p + off).to(tl.int32)


@triton.jit
def _i8(p, off):
    return tl.load(p + off).to(tl.int8, bitcast=True).to(tl.int32)


@triton.jit
def _f16(p, off):
    bits = (_u8(p, off) | (_u8(p, off + 1) << 8)).to(tl.int16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nib(p, off, high):
    """The low (high == 0) or high nibble of the byte at off."""
    b = _u8(p, off)
    return tl.where(high != 0, b >> 4, b & 15)


@triton.jit
def _k4_scale_min(p, sc_off, s):
    """get_scale_min_k4: the 6-bit scale and min of sub-block s (0..7) from 12 bytes."""
    lo = s < 4
    a = _u8(p, sc_off + s)                              # s < 4: scales[s]
    b = _u8(p, sc_off + s + 4)                          # scales[s + 4]
    c = _u8(p, sc_off + tl.maximum(s - 4, 0))           # s >= 4: scales[s - 4]
    sc = tl.where(lo, a & 63, (b & 0xF) | ((c >> 6) << 4))
    mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _deq(w, row_off, k, tab, TYPE: tl.constexpr):
    """Weights of the rows at offsets row_off (BM, 1), columns k (1, BK) -> float32.

    ``w`` is the uint8 block bytes (row_off in bytes), or for F32/F16/BF16 the typed
    values (row_off in elements)."""
    if TYPE == F32 or TYPE == F16 or TYPE == BF16:   # w typed; row_off in elements
        v = tl.load(w + row_off + k).to(tl.float32)
    elif TYPE == Q8_0:
        base = row_off + (k // 32) * 34
        v = _f16(w, base) * _i8(w, base + 2 + k % 32).to(tl.float32)
    elif TYPE == Q4_0:   # blocks padded in front to 20 bytes on the device (type_facts.FACTS)
        base = row_off + (k // 32) * 20 + 2
        l = k % 32
        v = _f16(w, base) * (_nib(w, base + 2 + l % 16, l // 16) - 8).to(tl.float32)
    elif TYPE == IQ4_NL:
        base = row_off + (k // 32) * 18
        l = k % 32
        q = tl.load(tab + _nib(w, base + 2 + l % 16, l // 16))
        v = _f16(w, base) * q
    elif TYPE == Q4_1:
        base = row_off + (k // 32) * 20
        l = k % 32
        v = _f16(w, base) * _nib(w, base + 4 + l % 16, l // 16).to(tl.float32) + _f16(w, base + 2)
    elif TYPE == Q5_0:   # blocks padded in front to 24 bytes on the device
        base = row_off + (k // 32) * 24 + 2
        l = k % 32
        h = (_u8(w, base + 2 + l // 8) >> (l % 8)) & 1
        q = _nib(w, base + 6 + l % 16, l // 16) | (h << 4)
        v = _f16(w, base) * (q - 16).to(tl.float32)
    elif TYPE == Q5_1:
        base = row_off + (k // 32) * 24
        l = k % 32
        h = (_u8(w, base + 4 + l // 8) >> (l % 8)) & 1
        q = _nib(w, base + 8 + l % 16, l // 16) | (h << 4)
        v = _f16(w, base) * q.to(tl.float32) + _f16(w, base + 2)
    elif TYPE == Q4_K:
        base = row_off + (k // 256) * 144
        j = k % 256
        g = j // 64
        hi = (j % 64) // 32
        sc, mn = _k4_scale_min(w, base + 4, 2 * g + hi)
        q = _nib(w, base + 16 + 32 * g + j % 32, hi).to(tl.float32)
        v = _f16(w, base) * sc * q - _f16(w, base + 2) * mn
    elif TYPE == Q5_K:
        base = row_off + (k // 256) * 176
        j = k % 256
        g = j // 64
        hi = (j % 64) // 32
        s = 2 * g + hi
        sc, mn = _k4_scale_min(w, base + 4, s)
        h = (_u8(w, base + 16 + j % 32) >> s) & 1
        q = (_nib(w, base + 48 + 32 * g + j % 32, hi) + 16 * h).to(tl.float32)
        v = _f16(w, base) * sc * q - _f16(w, base + 2) * mn
    elif TYPE == Q6_K:   # blocks padded to 212 bytes on the device (type_facts.FACTS)
        base = row_off + (k // 256) * 212
        j = k % 256
        h = j // 128
        c = (j % 128) // 32
        l = j % 32
        lo = _nib(w, base + 64 * h + l + 32 * (c & 1), c >> 1)
        hb = (_u8(w, base + 128 + 32 * h + l) >> (2 * c)) & 3
        sc = _i8(w, base + 192 + 8 * h + l // 16 + 2 * c).to(tl.float32)
        v = _f16(w, base + 208) * sc * ((lo | (hb << 4)) - 32).to(tl.float32)
    elif TYPE == Q3_K:
        base = row_off + (k // 256) * 110
        j = k % 256
        h = j // 128
        c = (j % 128) // 32
        l = j % 32
        s = 8 * h + 2 * c + l // 16                      # scale index 0..15
        a = s // 4
        low = _u8(w, base + 96 + (s % 8))
        low = tl.where(a < 2, low & 0xF, low >> 4)
        high = (_u8(w, base + 96 + 8 + s % 4) >> (2 * a)) & 3
        sc = ((low | (high << 4)) - 32).to(tl.float32)
        q = (_u8(w, base + 32 + 32 * h + l) >> (2 * c)) & 3
        m = (_u8(w, base + l) >> (4 * h + c)) & 1
        v = _f16(w, base + 108) * sc * (q - tl.where(m != 0, 0, 4)).to(tl.float32)
    elif TYPE == Q2_K:
        base = row_off + (k // 256) * 84
        j = k % 256
        h = j // 128
        c = (j % 128) // 32
        l = j % 32
        sc = _u8(w, base + 8 * h + 2 * c + l // 16)
        q = (_u8(w, base + 16 + 32 * h + l) >> (2 * c)) & 3
        v = _f16(w, base + 80) * (sc & 0xF).to(tl.float32) * q.to(tl.float32) \
            - _f16(w, base + 82) * (sc >> 4).to(tl.float32)
    else:  # IQ4_XS
        base = row_off + (k // 256) * 136
        j = k % 256
        ib = j // 32
        l = j % 32
        sh = _u8(w, base + 2) | (_u8(w, base + 3) << 8)
        ls = ((_u8(w, base + 4 + ib // 2) >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4)
        q = tl.load(tab + _nib(w, base + 8 + 16 * ib + l % 16, l // 16))
        v = _f16(w, base) * (ls - 32).to(tl.float32) * q
    return v


@triton.jit
def _rne(v):
    return (v + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def _act(x, BT: tl.constexpr, BK: tl.constexpr, ACT: tl.constexpr):
    """Round activations x (BT, BK) as llama.cpp quantizes them for the dot products."""
    if ACT == ACT_F16:
        return x.to(tl.float16).to(tl.float32)
    elif ACT == ACT_BF16:  # round half to even on the bits, as GGML_FP32_TO_BF16
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        return bits.to(tl.float32, bitcast=True)
    elif ACT == ACT_Q8_0 or ACT == ACT_Q8_1:
        xb = tl.reshape(x, (BT, BK // 32, 32))
        amax = tl.max(tl.abs(xb), axis=2, keep_dims=True)
        d = tl.math.div_rn(amax, 127.0).to(tl.float16).to(tl.float32)
        iscale = tl.where(amax != 0, tl.math.div_rn(127.0 + 0 * amax, tl.where(amax != 0, amax, 1.0)), 0.0)
        q = _rne(xb * iscale)
        return tl.reshape(q * d, (BT, BK))
    elif ACT == ACT_Q8_K:
        q, d = _round_q8_k(x, BT, BK)
        return tl.reshape(q * d, (BT, BK))
    else:
        return x


@triton.jit
def _round_q8_k(x, R: tl.constexpr, BK: tl.constexpr):
    """x (R, BK) float32 -> (quants as float32 (R, BK/256, 256), scales (R, BK/256, 1)), as
    quantize_row_q8_K_ref: the element of largest magnitude (the first, on a tie between
    signs) gives scale max/-127, q = min(rne(x * -127/max), 127); all zero for a zero block."""
    xb = tl.reshape(x, (R, BK // 256, 256))
    amax = tl.max(tl.abs(xb), axis=2, keep_dims=True)
    idx = tl.reshape(tl.arange(0, 256), (1, 1, 256))
    first_pos = tl.min(tl.where((xb == amax) & (amax > 0), idx, 256), axis=2, keep_dims=True)
    first_neg = tl.min(tl.where((xb == -amax) & (amax > 0), idx, 256), axis=2, keep_dims=True)
    vmax = tl.where(first_pos < first_neg, amax, -amax)
    safe = tl.where(amax != 0, vmax, 1.0)
    iscale = tl.math.div_rn(-127.0 + 0 * safe, safe)
    q = tl.where(amax != 0, tl.minimum(_rne(iscale * xb), 127.0), 0.0)
    d = tl.where(amax != 0, tl.math.div_rn(1.0 + 0 * iscale, iscale), 0.0)
    return q, d


@triton.jit
def _gemv(w, x, y, tab, n_out, n_in: tl.constexpr, row_stride,
          TYPE: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """y[t, rows] = x[t] . W[rows]: program (row block, token)."""
    pdl.start()
    pid = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM)
    row_off = (tl.minimum(rows, n_out - 1).to(tl.int64) * row_stride)[:, None]
    acc = tl.zeros((BM, BK), tl.float32)
    for k0 in range(0, n_in, BK):
        k = k0 + tl.arange(0, BK)[None, :]
        xv = tl.load(x + t * n_in + k, mask=k < n_in, other=0.0)
        xv = _act(xv, 1, BK, ACT)
        acc += _deq(w, row_off, tl.minimum(k, n_in - 1), tab, TYPE) * xv
    tl.store(y + t * n_out + rows, tl.sum(acc, axis=1), mask=rows < n_out)


@triton.jit
def _gemm(w, x, y, tab, n_tok, n_out, n_in: tl.constexpr, row_stride,
          TYPE: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
          BK: tl.constexpr):
    """y[toks, rows] = x[toks] @ W[rows].T: program (row block, token block)."""
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    toks = pid_t * BT + tl.arange(0, BT)
    row_off = (tl.minimum(rows, n_out - 1).to(tl.int64) * row_stride)[:, None]
    tok_off = (tl.minimum(toks, n_tok - 1).to(tl.int64) * n_in)[:, None]
    acc = tl.zeros((BT, BM), tl.float32)
    for k0 in range(0, n_in, BK):
        k = k0 + tl.arange(0, BK)[None, :]
        xv = _act(tl.load(x + tok_off + k, mask=k < n_in, other=0.0), BT, BK, ACT)  # (BT, BK)
        wv = _deq(w, row_off, tl.minimum(k, n_in - 1), tab, TYPE)                    # (BM, BK)
        acc += tl.dot(xv, tl.trans(wv), input_precision="ieee")
    out = y + toks.to(tl.int64)[:, None] * n_out + rows[None, :]
    tl.store(out, acc, mask=(toks[:, None] < n_tok) & (rows[None, :] < n_out))


@triton.jit
def _dequant_rows(w, ids, out, tab, n_in, row_stride, TYPE: tl.constexpr, BK: tl.constexpr):
    """out[i] = W[ids[i]] as float32 (embedding lookup): program (id, column block)."""
    i = tl.program_id(0).to(tl.int64)
    row_off = (tl.load(ids + i).to(tl.int64) * row_stride + tl.zeros((1, 1), tl.int64))
    k = tl.program_id(1) * BK + tl.arange(0, BK)[None, :]
    v = _deq(w, row_off, tl.minimum(k, n_in - 1), tab, TYPE)
    tl.store(out + i * n_in + k, v, mask=k < n_in)
