"""Activation quantization: float32 rows -> the weight type's ``vec_dot_type``.

llama.cpp's CPU backend does not multiply quantized weights by float32 activations: it
first quantizes each activation row to the weight type's ``vec_dot_type``
(ggml-cpu.c ``type_traits_cpu``), then takes integer dot products per block. These are
those quantizers, as the bundled llama.cpp (llama-cpp-python 0.3.36, x86-64 with AVX2)
runs them:

* Q8_0 and Q8_1 (ggml-cpu/arch/x86/quants.c ``quantize_row_q8_0``/``_q8_1``, the AVX
  path): ``d = amax / 127`` stored as fp16, multiplier ``127 / amax`` (not the reference
  code's ``1 / d``), rounded half to even (``_mm256_round_ps``, not ``roundf``). Q8_1
  also stores ``s = fp16(d * sum(q))`` with the unrounded ``d``.
* Q8_K (``quantize_row_q8_K`` = ggml-quants.c ``quantize_row_q8_K_ref`` on x86):
  ``iscale = -127 / max`` where ``max`` is the signed element of largest magnitude (the
  first one), ``q = min(127, nearest_int(iscale * x))``, ``d = 1 / iscale`` as float32,
  and ``bsums`` = the sums of each 16 quants.

Output layouts, for ``T`` rows of ``n`` elements: ``xq`` int8 (T, n); ``xd`` float32
(T, n / qk) with the scales as float32 values (fp16-exact for Q8_0/Q8_1); ``xs``
float32 (T, n / 32) for Q8_1; ``bsums`` int32 (T, n / 16) for Q8_K.
"""

from __future__ import annotations

import numpy as np
from numba import types

from ggforge.runtime.kernels._jit import F, F4M, H, I, I4M, I8M, i64, kernel, round_to_half


@kernel(types.void(F4M, i64, I8M, F4M))
def quant_q8_0(x, qk, xq, xd):
    """x (T, n) -> xq (T, n) int8, xd (T, n/qk): ggml's x86 quantize_row_q8_0."""
    for t in range(x.shape[0]):
        for b in range(x.shape[1] // qk):
            o = b * qk
            amax = F(0)
            for j in range(qk):
                amax = max(amax, abs(x[t, o + j]))
            xd[t, b] = round_to_half(amax / F(127))
            iscale = F(127) / amax if amax != 0 else F(0)
            for j in range(qk):
                xq[t, o + j] = np.int8(np.rint(x[t, o + j] * iscale))


@kernel(types.void(F4M, i64, I8M, F4M, F4M))
def quant_q8_1(x, qk, xq, xd, xs):
    """x (T, n) -> xq, xd, xs (T, n/qk) = fp16(d * sum(q)): ggml's x86 quantize_row_q8_1."""
    for t in range(x.shape[0]):
        for b in range(x.shape[1] // qk):
            o = b * qk
            amax = F(0)
            for j in range(qk):
                amax = max(amax, abs(x[t, o + j]))
            d = amax / F(127)
            xd[t, b] = round_to_half(d)
            iscale = F(127) / amax if amax != 0 else F(0)
            s = I(0)
            for j in range(qk):
                q = np.int8(np.rint(x[t, o + j] * iscale))
                xq[t, o + j] = q
                s = I(s + I(q))
            xs[t, b] = round_to_half(d * F(s))


@kernel(types.void(F4M, i64, I8M, F4M, I4M))
def quant_q8_K(x, qk, xq, xd, bsums):
    """x (T, n) -> xq, xd (T, n/256) float32, bsums (T, n/16): quantize_row_q8_K_ref."""
    for t in range(x.shape[0]):
        for b in range(x.shape[1] // qk):
            o = b * qk
            amax = F(0)
            vmax = F(0)
            for j in range(qk):
                ax = abs(x[t, o + j])
                if ax > amax:
                    amax = ax
                    vmax = x[t, o + j]
            if amax == 0:
                xd[t, b] = 0
                for j in range(qk):
                    xq[t, o + j] = 0
            else:
                iscale = F(-127) / vmax
                for j in range(qk):
                    xq[t, o + j] = np.int8(min(F(127), F(np.rint(iscale * x[t, o + j]))))
                xd[t, b] = F(1) / iscale
            for g in range(qk >> 4):
                s = I(0)
                for j in range(16):
                    s = I(s + I(H(xq[t, o + 16 * g + j])))
                bsums[t, (o >> 4) + g] = s


# vec_dot_type -> (block size, quantizer); see quantize()
_QK = {"q8_0": 32, "q8_1": 32, "q8_K": 256}


def quantize(x: np.ndarray, vec_dot_type: str) -> tuple[np.ndarray, ...]:
    """Quantize float32 rows ``x`` (T, n) to ``vec_dot_type`` ("q8_0", "q8_1", "q8_K").

    Returns ``(xq, xd)`` for q8_0, ``(xq, xd, xs)`` for q8_1, ``(xq, xd, bsums)`` for q8_K
    (shapes in the module docstring).
    """
    qk = _QK[vec_dot_type]
    t, n = x.shape
    xq = np.empty((t, n), np.int8)
    xd = np.empty((t, n // qk), np.float32)
    if vec_dot_type == "q8_0":
        quant_q8_0(x, qk, xq, xd)
        return xq, xd
    if vec_dot_type == "q8_1":
        xs = np.empty((t, n // qk), np.float32)
        quant_q8_1(x, qk, xq, xd, xs)
        return xq, xd, xs
    bsums = np.empty((t, n // 16), np.int32)
    quant_q8_K(x, qk, xq, xd, bsums)
    return xq, xd, bsums


def round_fp16(x: np.ndarray) -> np.ndarray:
    """float32 -> float32 values of the nearest fp16 (ggml_cpu_fp32_to_fp16, F16C: RNE)."""
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> float32 values of ggml's bf16 rounding (GGML_FP32_TO_BF16: RNE, NaN quiet)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = (bits + (np.uint32(0x7FFF) + lsb)) >> np.uint32(16)
    quiet = (bits >> np.uint32(16)) | np.uint32(64)
    return (np.where(nan, quiet, rounded) << np.uint32(16)).astype(np.uint32).view(np.float32)
