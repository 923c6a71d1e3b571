"""Block quantization types: one registry of ggml tensor types, byte-identical to ggml.

    from ggforge.formats.quants import get_type, quantize, dequantize
    raw = quantize(w, "q8_0", name="blk.0.attn_q.weight")   # (rows, row_bytes) uint8
    w2 = dequantize(raw, "Q8_0", w.shape)                    # float32, w.shape

Type modules register themselves on import; import a new one here to add its types.
"""

from ggforge.formats.quants.registry import TYPES, QuantType, dequantize, get_type, quantize, register
from ggforge.formats.quants.floats import bf16_to_float32, float32_to_bf16
from ggforge.formats.quants import floats as _floats  # noqa: F401  (registers F32, F16, BF16)
from ggforge.formats.quants import legacy as _legacy  # noqa: F401  (registers Q8_0, Q4_*, Q5_*)
from ggforge.formats.quants import kquants as _kquants  # noqa: F401  (registers Q2_K..Q6_K, IQ4_*)

__all__ = [
    "TYPES",
    "QuantType",
    "get_type",
    "quantize",
    "dequantize",
    "register",
    "bf16_to_float32",
    "float32_to_bf16",
]
