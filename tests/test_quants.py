"""ggforge.formats.quants: registry facts, and byte identity with libggml's quantizers.

The oracle is libggml-base from llama-cpp-python (tests/ggml_oracle.py); the tests that
need it skip when it is not installed. Registry and error tests run everywhere.
"""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest

from ggforge.formats.errors import QuantizationError
from ggforge.formats.quants import (
    TYPES,
    QuantType,
    bf16_to_float32,
    dequantize,
    float32_to_bf16,
    get_type,
    quantize,
)

try:
    from ggml_oracle import ggml_or_skip
except ImportError:  # tests/ collected as a package
    from tests.ggml_oracle import ggml_or_skip

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
FLOATS = ["F32", "F16", "BF16"]


@pytest.fixture(scope="module")
def ggml():
    return ggml_or_skip()


# ---------------------------------------------------------------- test data

def _blocks(rows: list[list[float]], n_per_row: int = 64) -> np.ndarray:
    """Tile hand-made 32-value blocks into rows of n_per_row (shape (k, n_per_row))."""
    b = np.array(rows, dtype=np.float32)
    return np.tile(b, (1, n_per_row // 32))


def _case(name: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if name == "normal":
        return rng.standard_normal((64, 4096), dtype=np.float32)
    if name == "uniform":
        return rng.uniform(-1, 1, (32, 2048)).astype(np.float32)
    if name == "outliers":
        x = rng.standard_normal((32, 2048), dtype=np.float32)
        x[rng.random(x.shape) < 0.01] *= 1000
        return x
    if name == "zeros":
        return np.zeros((4, 128), np.float32)
    if name == "signed_zeros":  # sign of a zero scale/min must follow ggml's scan order
        z = np.where(rng.random((16, 256)) < 0.5, np.float32(-0.0), np.float32(0.0))
        z[8:, 5::7] = 1.0  # some blocks min = zero of either sign, max > 0
        return z.astype(np.float32)
    if name == "constant":
        return np.concatenate([np.full((2, 64), 0.3, np.float32), np.full((2, 64), -7.0, np.float32)])
    if name == "tiny":  # scales underflow fp16 to 0 or subnormal
        return (rng.standard_normal((16, 1024)) * 1e-30).astype(np.float32)
    if name == "fp16_subnormal":
        return (rng.standard_normal((16, 1024)) * 1e-6).astype(np.float32)
    if name == "huge":  # scales overflow fp16 to Inf
        return (rng.standard_normal((16, 1024)) * 1e30).astype(np.float32)
    if name == "near_fp16_max":  # scales straddle 65504
        return (rng.standard_normal((16, 1024)) * 65504 * 8).astype(np.float32)
    if name == "abs_ties":  # |max| shared by +v and -v: the first one sets the sign
        rows = []
        for first in (3.0, -3.0):
            blk = rng.uniform(-1, 1, 32).astype(np.float32)
            blk[4], blk[20] = first, -first
            rows.append(blk)
        return _blocks(rows)
    if name == "round_ties":  # x*id lands on k + 0.5: roundf goes away from zero
        blk = np.arange(-15.5, 16.5, 1.0, dtype=np.float32)
        blk[0] = 127.0
        blk2 = blk.copy()
        blk2[1] = np.nextafter(np.float32(0.5), np.float32(0))
        return _blocks([blk, -blk, blk2])
    if name == "fma_bait":
        return _fma_bait(rng)
    if name == "integers":
        return rng.integers(-16, 16, (32, 1024)).astype(np.float32)
    if name == "mixed":
        parts = [_case(n)[:4, :512] for n in ("normal", "zeros", "tiny", "huge", "outliers", "constant")]
        x = np.concatenate([np.resize(p, (4, 512)) for p in parts])
        return rng.permutation(x.reshape(-1, 32)).reshape(-1, 512)
    raise KeyError(name)


def _fma_bait(rng) -> np.ndarray:
    """Blocks where x*id rounds onto -7.5 (Q4_0) or -15.5 (Q5_0) though the exact product
    is not: rounded-then-added gives 1, a fused multiply-add gives 0. ggml-base is built
    without FMA, so this pins the non-fused behaviour down (random data almost never hits it).
    """
    b = rng.uniform(-0.5, 0.5, (4096, 32)).astype(np.float32)
    b[:, 0] = rng.uniform(1, 2, 4096).astype(np.float32)  # the block max, positive
    for col, levels in ((1, 8), (2, 16)):
        inv = np.float32(1) / (b[:, 0] / np.float32(-levels))  # id as ggml computes it
        target = -(levels - 0.5)
        x = (np.float32(target) / inv).astype(np.float32)
        for _ in range(8):  # walk ulps until float32(x*id) == target but x*id != target
            exact = x.astype(np.float64) * inv.astype(np.float64)
            hit = (exact.astype(np.float32) == target) & (exact != target)
            b[hit, col] = x[hit]
            x = np.nextafter(x, np.float32(np.inf) * np.sign(target))
    return b.reshape(-1, 512)


CASES = ["fma_bait", "normal", "uniform", "outliers", "zeros", "signed_zeros", "constant", "tiny",
         "fp16_subnormal", "huge", "near_fp16_max", "abs_ties", "round_ties", "integers", "mixed"]


def _first_diff(a: np.ndarray, b: np.ndarray) -> str:
    rows = np.flatnonzero((a != b).reshape(a.shape[0], -1).any(axis=1))
    return f"{rows.size} rows differ; first row {rows[:1]}" if rows.size else "same"


# ---------------------------------------------------------------- registry

def test_registry_sizes_match_gguf():
    assert set(LEGACY + FLOATS) <= set(TYPES)
    for name, qt in TYPES.items():
        assert isinstance(qt, QuantType) and qt.name == name
        assert qt.ggml_type.name == name
        assert (qt.block_size, qt.type_size) == gguf.GGML_QUANT_SIZES[qt.ggml_type]


@pytest.mark.parametrize("key", ["q8_0", "Q8_0", " q8_0", 8, gguf.GGMLQuantizationType.Q8_0, np.int32(8)])
def test_get_type_by_name_or_id(key):
    assert get_type(key) is TYPES["Q8_0"]
    assert get_type(TYPES["Q8_0"]) is TYPES["Q8_0"]


@pytest.mark.parametrize("key", ["q9_9", 4, 999, gguf.GGMLQuantizationType.IQ2_XXS, 3.5])
def test_get_type_unknown_lists_supported(key):
    with pytest.raises(QuantizationError) as err:
        get_type(key)
    if not isinstance(key, float):
        assert "Q8_0" in str(err.value) and "F16" in str(err.value)


def test_row_bytes_and_nbytes():
    q8 = get_type("Q8_0")
    assert q8.row_bytes(4096) == 128 * 34
    assert get_type("BF16").row_bytes(7) == 14
    with pytest.raises(QuantizationError, match="multiple of 32"):
        q8.row_bytes(100)
    # Python ints: no int64 overflow for absurd shapes.
    assert q8.nbytes((2**40, 2**30, 4096)) == 2**70 * 128 * 34
    assert get_type("Q4_0").nbytes((3, 5, 64)) == 15 * 2 * 18
    assert get_type("F32").nbytes(()) == 4


# ---------------------------------------------------------------- byte identity

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("qtype", LEGACY + FLOATS)
def test_quantize_matches_ggml(ggml, qtype, case):
    x = _case(case)
    ours = quantize(x, qtype, name=case)
    ref = ggml.quantize(qtype, x)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref), _first_diff(ours, ref)


@pytest.mark.parametrize("qtype", LEGACY + FLOATS)
def test_dequantize_matches_ggml(ggml, qtype):
    """On ggml's own blocks and on random bytes (NaN/Inf scales, signaling NaNs
    included): same float32 bits as traits->to_float."""
    qt = get_type(qtype)
    x = _case("mixed")
    rng = np.random.default_rng(7)
    garbage = rng.integers(0, 256, (512, qt.row_bytes(256)), dtype=np.uint8)
    for raw, shape in ((ggml.quantize(qtype, x), x.shape), (garbage, (512, 256))):
        ours = dequantize(raw, qtype, shape)
        ref = ggml.dequantize(qtype, raw, shape)
        assert ours.dtype == np.float32 and ours.shape == shape
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_q8_0_ignores_imatrix_like_ggml(ggml):
    x = _case("normal")[:8]
    w = np.random.default_rng(3).random(x.shape[-1]).astype(np.float32)
    assert np.array_equal(quantize(x, "Q8_0", imatrix=w), ggml.quantize("Q8_0", x, imatrix=w))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_imatrix_takes_the_row_path(ggml, qtype):
    """With an importance matrix these types run ggml's quantize_row_*_impl on whole
    rows (legacy_imatrix; the full cases are in tests/test_legacy_imatrix.py)."""
    x = _case("normal")[:8]
    w = np.random.default_rng(3).random(x.shape[-1]).astype(np.float32)
    assert np.array_equal(quantize(x, qtype, imatrix=w), ggml.quantize(qtype, x, imatrix=w))


def test_imatrix_shape_checked():
    with pytest.raises(QuantizationError, match="blk.0.ffn_up.weight"):
        quantize(np.ones((2, 64), np.float32), "Q8_0", name="blk.0.ffn_up.weight",
                 imatrix=np.ones(32, np.float32))


# ---------------------------------------------------------------- float types

def _bf16_reference(bits: np.ndarray) -> np.ndarray:
    """Round-half-even of the top 16 bits, in uint64 integers; ggml's quiet-NaN rule."""
    b = bits.astype(np.uint64)
    hi, lo = b >> 16, b & 0xFFFF
    up = (lo > 0x8000) | ((lo == 0x8000) & ((hi & 1) == 1))
    rounded = hi + up
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, hi | 64, rounded).astype(np.uint16)


def _special_bits() -> np.ndarray:
    specials = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 1, 0x807FFFFF,
                0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7F8000]
    rng = np.random.default_rng(11)
    rand = rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    ties = (rand & np.uint32(0xFFFF0000)) | np.uint32(0x8000)
    return np.concatenate([np.array(specials, np.uint32), rand, ties])


def test_bf16_rounding_vs_integer_reference_and_ggml(ggml):
    bits = _special_bits()
    x = bits.view(np.float32)
    ours = float32_to_bf16(x)
    assert np.array_equal(ours, _bf16_reference(bits))
    assert np.array_equal(ours, ggml.fp32_to_bf16(x))
    # Widening is exact and inverts narrowing on bf16-representable values.
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    wide = bf16_to_float32(h)
    assert np.array_equal(wide.view(np.uint32), ggml.bf16_to_fp32(h).view(np.uint32))
    assert np.array_equal(float32_to_bf16(wide), _bf16_reference(h.astype(np.uint32) << 16))


def test_f16_conversions_vs_ggml(ggml):
    """All non-NaN float32 classes and every fp16 bit pattern, both directions."""
    x = _special_bits().view(np.float32)
    x = x[np.isfinite(x)]  # quantize() refuses NaN/Inf; the block function is checked below
    ours = quantize(x, "F16").view(np.uint16)
    assert np.array_equal(ours, ggml.fp32_to_fp16(x))
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    back = dequantize(h.view(np.uint8), "F16", (65536,))
    assert np.array_equal(back.view(np.uint32), ggml.fp16_to_fp32(h).view(np.uint32))
    odd = np.array([np.nan, -np.nan, np.inf, -np.inf, 65520.0, -65519.0], np.float32)
    with np.errstate(over="ignore"):
        blocks = get_type("F16").quantize_blocks(odd.reshape(-1, 1))
    assert np.array_equal(blocks.view(np.uint16).ravel(), ggml.fp32_to_fp16(odd))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("qtype", FLOATS)
def test_float_round_trips(qtype, dtype):
    x = np.random.default_rng(5).standard_normal((3, 4, 8)).astype(dtype)
    raw = quantize(x, qtype)
    assert raw.shape == (3, 4, 8 * get_type(qtype).type_size)
    y = dequantize(raw, qtype, x.shape)
    x32 = x.astype(np.float32)
    expected = {"F32": x32, "F16": x32.astype(np.float16).astype(np.float32),
                "BF16": bf16_to_float32(_bf16_reference(x32.view(np.uint32)))}[qtype]
    assert y.dtype == np.float32 and np.array_equal(y, expected)
    if dtype == np.float16 and qtype in ("F32", "F16"):
        assert np.array_equal(y, x.astype(np.float32))  # lossless


@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_round_trip_error_bound(qtype):
    """Dequantized values sit within one quantization step of the input (float64 check)."""
    x = _case("normal")[:16].astype(np.float64)
    y = dequantize(quantize(x, qtype), qtype, x.shape).astype(np.float64)
    levels = {"Q8_0": 127, "Q4_0": 8, "Q4_1": 15, "Q5_0": 16, "Q5_1": 31}[qtype]
    blocks = x.reshape(-1, 32)
    span = np.abs(blocks).max(axis=1) if qtype.endswith("_0") else np.ptp(blocks, axis=1)
    step = span / levels  # (n_blocks,)
    err = np.abs(y - x).reshape(-1, 32).max(axis=1)
    assert np.all(err <= step * 1.01 + 1e-7)


# ---------------------------------------------------------------- errors and shapes

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("qtype", sorted(TYPES))
def test_non_finite_names_tensor_and_index(qtype, bad):
    x = np.zeros((2, 3, 256), np.float32)  # a row of 256 fits every type's block
    x[1, 2, 33] = bad
    x[1, 2, 40] = np.nan
    with pytest.raises(QuantizationError) as err:
        quantize(x, qtype, name="blk.3.attn_k.weight")
    assert "blk.3.attn_k.weight" in str(err.value) and "(1, 2, 33)" in str(err.value)


@pytest.mark.parametrize("qtype", LEGACY)
def test_row_length_not_multiple(qtype):
    with pytest.raises(QuantizationError, match="token_embd.weight"):
        quantize(np.ones((4, 48), np.float32), qtype, name="token_embd.weight")


def test_non_float_input_refused():
    with pytest.raises(QuantizationError, match="output.weight"):
        quantize(np.ones((2, 32), np.int32), "Q8_0", name="output.weight")


def test_dequantize_wrong_size():
    with pytest.raises(QuantizationError, match="Q4_0"):
        dequantize(np.zeros(17, np.uint8), "Q4_0", (1, 32))


def test_shapes_dtypes_and_chunking(ggml):
    """N-d input, float16/float64 input (through float32, like ggml's float* API), empty
    tensors, and tensors larger than one internal chunk."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 256)).astype(np.float64)
    raw = quantize(x, "Q4_1")
    assert raw.shape == (2, 3, 160)
    assert np.array_equal(raw.reshape(6, -1), ggml.quantize("Q4_1", x.reshape(6, 256)))
    h = x.astype(np.float16)
    assert np.array_equal(quantize(h, "Q5_0"), quantize(h.astype(np.float32), "Q5_0"))
    assert quantize(np.zeros((0, 64), np.float32), "Q8_0").shape == (0, 68)
    assert dequantize(np.zeros((0, 68), np.uint8), "Q8_0", (0, 64)).shape == (0, 64)
    big = rng.standard_normal((300, 8192), dtype=np.float32)  # 2.4M elements > one chunk
    assert np.array_equal(quantize(big, "Q8_0"), ggml.quantize("Q8_0", big))
