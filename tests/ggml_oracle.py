"""libggml as a test oracle, through ctypes, from the installed llama-cpp-python.

    ggml = ggml_or_skip()                        # in a fixture: skips when llama_cpp is absent
    raw = ggml.quantize("Q4_K", x)               # (rows, row_bytes) uint8, ggml_quantize_chunk
    raw = ggml.quantize("Q4_K", x, imatrix=w)    # w: (n_per_row,) float32 importance
    y = ggml.dequantize("Q4_K", raw, x.shape)    # traits->to_float

Types are given by gguf name ("Q8_0") or ggml id. The library is loaded without importing
``llama_cpp`` (no model code runs): only ``libggml-base.so`` from its ``lib/`` folder, which
holds the reference quantizers (ggml-quants.c) and the fp16/bf16 row converters.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import gguf
import numpy as np

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_TO_FLOAT = ctypes.CFUNCTYPE(None, _PTR, _PTR, _I64)  # void (*)(const void *, float *, int64_t)


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` of the bundled ggml.h (llama-cpp-python 0.3.36)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", _I64),
        ("blck_size_interleave", _I64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", _PTR),
        ("from_float_ref", _PTR),
    ]


def find_lib_dir() -> Path | None:
    """The ``lib/`` folder of the installed llama_cpp package, or None."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        lib = Path(root) / "lib"
        if (lib / "libggml-base.so").exists():
            return lib
    return None


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class GGML:
    """Thin ctypes binding of the ggml entry points the format tests compare against."""

    def __init__(self, lib_dir: Path):
        self.lib_dir = Path(lib_dir)
        lib = ctypes.CDLL(str(self.lib_dir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        self.lib = lib
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, _PTR, _PTR, _I64, _I64, _I64, _PTR]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.restype = None
        lib.ggml_row_size.argtypes = [ctypes.c_int, _I64]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        for fn in ("ggml_fp32_to_fp16_row", "ggml_fp16_to_fp32_row",
                   "ggml_fp32_to_bf16_row", "ggml_bf16_to_fp32_row"):
            getattr(lib, fn).argtypes = [_PTR, _PTR, _I64]
            getattr(lib, fn).restype = None

    # ---------------------------------------------------------------- type facts

    @staticmethod
    def type_id(qtype) -> int:
        """A gguf name ("q8_0"), id or GGMLQuantizationType -> ggml's integer id."""
        if isinstance(qtype, str):
            return int(gguf.GGMLQuantizationType[qtype.upper()])
        return int(qtype)

    def traits(self, qtype) -> _TypeTraits:
        return self.lib.ggml_get_type_traits(self.type_id(qtype)).contents

    def row_size(self, qtype, n_per_row: int) -> int:
        return int(self.lib.ggml_row_size(self.type_id(qtype), n_per_row))

    def requires_imatrix(self, qtype) -> bool:
        return bool(self.lib.ggml_quantize_requires_imatrix(self.type_id(qtype)))

    # ---------------------------------------------------------------- (de)quantize

    def quantize(self, qtype, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml_quantize_chunk over all rows of ``x`` (..., n_per_row) -> (..., row_bytes) uint8.

        ``imatrix`` is one importance weight per column, (n_per_row,) float32, as
        llama-quantize passes it (the same vector for every row).
        """
        t = self.type_id(qtype)
        src = np.ascontiguousarray(x, dtype=np.float32)
        n_per_row = src.shape[-1]
        nrows = src.size // n_per_row
        row_bytes = self.row_size(t, n_per_row)
        dst = np.zeros(nrows * row_bytes, dtype=np.uint8)
        qw = None
        if imatrix is not None:
            qw = np.ascontiguousarray(imatrix, dtype=np.float32)
            assert qw.shape == (n_per_row,), qw.shape
        self.lib.ggml_quantize_init(t)
        written = self.lib.ggml_quantize_chunk(
            t, _ptr(src), _ptr(dst), 0, nrows, n_per_row, None if qw is None else _ptr(qw)
        )
        assert written == dst.size, (written, dst.size)
        return dst.reshape(*src.shape[:-1], row_bytes)

    def dequantize(self, qtype, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """traits->to_float over the whole buffer -> float32 of ``shape``."""
        tr = self.traits(qtype)
        n = int(np.prod(shape))
        src = np.ascontiguousarray(raw, dtype=np.uint8)
        dst = np.empty(n, dtype=np.float32)
        if not tr.to_float and self.type_id(qtype) == int(gguf.GGMLQuantizationType.F32):
            return src.view(np.float32).copy().reshape(shape)  # ggml's F32 has no to_float
        assert tr.to_float, f"{tr.type_name!r} has no to_float"
        _TO_FLOAT(tr.to_float)(_ptr(src), _ptr(dst), n)
        return dst.reshape(shape)

    # ---------------------------------------------------------------- float rows

    def _row(self, fn: str, x: np.ndarray, in_dtype, out_dtype) -> np.ndarray:
        src = np.ascontiguousarray(x, dtype=in_dtype)
        dst = np.empty(src.shape, dtype=out_dtype)
        getattr(self.lib, fn)(_ptr(src), _ptr(dst), src.size)
        return dst

    def fp32_to_fp16(self, x: np.ndarray) -> np.ndarray:
        """ggml_fp32_to_fp16_row -> uint16 bit patterns."""
        return self._row("ggml_fp32_to_fp16_row", x, np.float32, np.uint16)

    def fp16_to_fp32(self, bits: np.ndarray) -> np.ndarray:
        return self._row("ggml_fp16_to_fp32_row", bits, np.uint16, np.float32)

    def fp32_to_bf16(self, x: np.ndarray) -> np.ndarray:
        """ggml_fp32_to_bf16_row -> uint16 bit patterns (may use AVX512-BF16 where built so)."""
        return self._row("ggml_fp32_to_bf16_row", x, np.float32, np.uint16)

    def bf16_to_fp32(self, bits: np.ndarray) -> np.ndarray:
        return self._row("ggml_bf16_to_fp32_row", bits, np.uint16, np.float32)


@functools.lru_cache(maxsize=1)
def load_ggml() -> GGML | None:
    """The process-wide oracle, or None when llama-cpp-python is not installed."""
    lib_dir = find_lib_dir()
    return None if lib_dir is None else GGML(lib_dir)


def ggml_or_skip() -> GGML:
    """The oracle, or ``pytest.skip`` of the calling test or fixture (wrap it in a fixture)."""
    from require import missing

    ggml = load_ggml()
    if ggml is None:
        missing("llama-cpp-python (the libggml oracle)")
    return ggml
