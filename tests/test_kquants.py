"""ggforge.formats.quants.kquants: Q2_K..Q6_K, IQ4_NL, IQ4_XS byte-identical to libggml.

The oracle is libggml-base from llama-cpp-python (tests/ggml_oracle.py), whose
ggml_quantize_chunk takes the ``quantize_row_*_ref`` path of the K-quants without an
importance matrix and the ``*_impl`` path with one (IQ4_* always the impl). Every case
is run both ways, plus with an importance matrix holding zeros, and the decoders are
compared bit for bit with traits->to_float.
"""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest

import ggforge.formats.quants.kquants as kquants
from ggforge.formats.errors import QuantizationError
from ggforge.formats.quants import dequantize, get_type, quantize

try:
    from ggml_oracle import ggml_or_skip
except ImportError:  # tests/ collected as a package
    from tests.ggml_oracle import ggml_or_skip

KTYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
N_PER_ROW = 1024


@pytest.fixture(scope="module")
def ggml():
    return ggml_or_skip()


# ---------------------------------------------------------------- test data

def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def _degenerate_blocks(rng: np.random.Generator) -> np.ndarray:
    """256-value blocks that hit the special cases of the scale searches, (k, 256)."""
    one_hot = np.zeros((4, 256), np.float32)
    one_hot[np.arange(4), [0, 77, 200, 255]] = [3.0, -3.0, 1e-3, -250.0]
    alternating = np.tile(np.float32([1.0, -1.0]), 128)
    ramp = np.linspace(-1, 1, 256, dtype=np.float32)
    half_zero = rng.standard_normal(256).astype(np.float32)
    half_zero[::2] = 0.0  # many exact zeros: min == 0 sub-blocks, zero weights without imatrix
    sub_zero = rng.standard_normal(256).astype(np.float32)
    sub_zero[32:64] = 0.0  # one all-zero sub-block (GROUP_MAX_EPS branches)
    sub_zero[160:176] = 0.0
    all_neg = -np.abs(rng.standard_normal(256)).astype(np.float32)
    all_pos = np.abs(rng.standard_normal(256)).astype(np.float32) + 1
    ties = rng.integers(-4, 5, 256).astype(np.float32) * np.float32(0.5)  # many equal levels
    spike = (rng.standard_normal(256) * 1e-3).astype(np.float32)
    spike[100] = 1e4  # one value dwarfs the rest of its super-block
    near_eps = (rng.standard_normal(256) * 1e-15).astype(np.float32)  # around GROUP_MAX_EPS
    fp16_edge = np.full(256, 65504.0 * 63 * 1.5, np.float32)  # max/63 just over fp16's max
    fp16_edge[::3] *= -1
    return np.stack([
        np.zeros(256, np.float32), np.full(256, -0.0, np.float32),
        np.full(256, 0.3, np.float32), np.full(256, -7.0, np.float32),
        *one_hot, alternating, -alternating, alternating * 1e-30, ramp,
        half_zero, sub_zero, all_neg, all_pos, ties, spike, near_eps, fp16_edge,
    ])  # (20, 256)


def _case(name: str) -> np.ndarray:
    """A float32 test matrix (rows, N_PER_ROW) by name."""
    rng = _rng(name)
    shape = (16, N_PER_ROW)
    if name == "normal":
        return rng.standard_normal((16, 4096), dtype=np.float32)
    if name == "outliers":  # a few huge values per row: the min/max and scale searches
        x = rng.standard_normal(shape, dtype=np.float32)
        x[rng.random(shape) < 0.005] *= np.float32(1000)
        return x
    if name == "uniform_positive":  # no negative values: mins clamp to 0
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if name == "degenerate":
        return _degenerate_blocks(rng).reshape(-1, N_PER_ROW)
    if name == "tiny":  # scales underflow fp16
        return (rng.standard_normal(shape) * 1e-30).astype(np.float32)
    if name == "fp16_subnormal":  # scales in fp16's subnormal range
        return (rng.standard_normal(shape) * 1e-6).astype(np.float32)
    if name == "huge":  # x*x overflows float32 and scales overflow fp16: Inf/NaN arithmetic
        return (rng.standard_normal(shape) * 1e30).astype(np.float32)
    if name == "near_fp16_max":  # scales straddle 65504
        return (rng.standard_normal(shape) * 65504 * 40).astype(np.float32)
    if name == "integers":  # exact ties in the rounding and the scale searches
        return rng.integers(-8, 8, shape).astype(np.float32)
    if name == "mixed":  # one row each of several cases, blocks shuffled
        parts = [_case(n)[:2, :N_PER_ROW] for n in ("normal", "tiny", "huge", "outliers")]
        x = np.concatenate(parts + [_case("degenerate")[:2]])
        return rng.permutation(x.reshape(-1, 32)).reshape(-1, N_PER_ROW)
    raise KeyError(name)


CASES = ["normal", "outliers", "uniform_positive", "degenerate", "tiny", "fp16_subnormal",
         "huge", "near_fp16_max", "integers", "mixed"]


def _imatrix(kind: str, n: int) -> np.ndarray | None:
    """Per-column importance as llama-quantize passes it (None, random, with zeros)."""
    if kind == "none":
        return None
    rng = _rng(f"imatrix-{kind}-{n}")
    w = (rng.random(n) * 4 + 0.01).astype(np.float32)
    if kind == "zeros":  # a zero super-block, zero sub-blocks, scattered zero columns
        w[:32] = 0.0
        w[256 + 16:256 + 48] = 0.0
        w[512:768] = 0.0
        w[rng.random(n) < 0.2] = 0.0
    return w


def _first_diff(a: np.ndarray, b: np.ndarray, type_size: int) -> str:
    bad = np.flatnonzero((a.reshape(-1, type_size) != b.reshape(-1, type_size)).any(axis=1))
    return f"{bad.size} blocks differ; first block {bad[:1]}" if bad.size else "same"


# ---------------------------------------------------------------- registry facts

def test_types_registered_with_gguf_sizes():
    for name in KTYPES:
        qt = get_type(name)
        assert qt is kquants.KQUANT_TYPES[name]
        assert qt.ggml_type == gguf.GGMLQuantizationType[name]
        assert (qt.block_size, qt.type_size) == gguf.GGML_QUANT_SIZES[qt.ggml_type]


def test_type_facts_match_ggml(ggml):
    for name in KTYPES:
        qt = get_type(name)
        tr = ggml.traits(name)
        assert (tr.blck_size, tr.type_size) == (qt.block_size, qt.type_size)
        assert not ggml.requires_imatrix(name)


# ---------------------------------------------------------------- byte identity

@pytest.mark.parametrize("imatrix", ["none", "random", "zeros"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("qtype", KTYPES)
def test_quantize_matches_ggml(ggml, qtype, case, imatrix):
    x = _case(case)
    w = _imatrix(imatrix, x.shape[-1])
    ours = quantize(x, qtype, name=case, imatrix=w)
    ref = ggml.quantize(qtype, x, imatrix=w)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref), _first_diff(ours, ref, get_type(qtype).type_size)


@pytest.mark.parametrize("qtype", KTYPES)
def test_dequantize_matches_ggml(ggml, qtype):
    """On ggml's own blocks (with and without imatrix) and on random bytes (NaN/Inf
    scales included): the same float32 bits as traits->to_float."""
    qt = get_type(qtype)
    x = _case("mixed")
    rng = _rng(f"garbage-{qtype}")
    garbage = rng.integers(0, 256, (64, qt.row_bytes(N_PER_ROW)), dtype=np.uint8)
    w = _imatrix("random", N_PER_ROW)
    for raw in (ggml.quantize(qtype, x), ggml.quantize(qtype, x, imatrix=w), garbage):
        shape = (raw.shape[0], N_PER_ROW)
        ours = dequantize(raw, qtype, shape)
        ref = ggml.dequantize(qtype, raw, shape)
        assert ours.dtype == np.float32 and ours.shape == shape
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "IQ4_NL"])
def test_many_chunks_with_imatrix(ggml, qtype):
    """A tensor larger than the registry's internal chunk, rows of 3 x 256 values: each
    chunk must get the importance of its own columns."""
    x = _rng("chunks").standard_normal((1400, 768), dtype=np.float32)
    w = _imatrix("random", 768)
    ours = quantize(x, qtype, imatrix=w)
    assert np.array_equal(ours, ggml.quantize(qtype, x, imatrix=w))


def test_imatrix_changes_the_result():
    """The importance matrix is used (a silently ignored one would also match ggml
    where ggml ignores it, so check the two paths differ here)."""
    x = _case("normal")[:4]
    w = _imatrix("random", x.shape[-1])
    for qtype in KTYPES:
        assert not np.array_equal(quantize(x, qtype), quantize(x, qtype, imatrix=w)), qtype


# ---------------------------------------------------------------- quality and errors

@pytest.mark.parametrize("qtype", KTYPES)
def test_round_trip_error_is_small(qtype):
    """Relative RMS error of a normal matrix, against loose per-type bounds (float64)."""
    x = _case("normal")[:8].astype(np.float64)
    y = dequantize(quantize(x, qtype), qtype, x.shape).astype(np.float64)
    rel = np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2))
    bound = {"Q2_K": 0.40, "Q3_K": 0.20, "Q4_K": 0.10, "Q5_K": 0.05, "Q6_K": 0.025,
             "IQ4_NL": 0.10, "IQ4_XS": 0.10}[qtype]
    assert rel < bound


@pytest.mark.parametrize("qtype", KTYPES)
def test_row_length_not_multiple(qtype):
    bs = get_type(qtype).block_size
    with pytest.raises(QuantizationError, match="blk.0.attn_v.weight"):
        quantize(np.ones((2, bs + 16), np.float32), qtype, name="blk.0.attn_v.weight")


def test_imatrix_shape_checked():
    with pytest.raises(QuantizationError, match="blk.1.ffn_down.weight"):
        quantize(np.ones((2, 512), np.float32), "Q4_K", name="blk.1.ffn_down.weight",
                 imatrix=np.ones(256, np.float32))
    qt = get_type("Q5_K")
    with pytest.raises(QuantizationError, match="Q5_K"):
        qt.quantize_blocks(np.ones((2, 256), np.float32), imatrix=np.ones((1, 256), np.float32))


def test_empty_tensor():
    for qtype in KTYPES:
        qt = get_type(qtype)
        assert quantize(np.zeros((0, 256), np.float32), qtype).shape == (0, qt.row_bytes(256))
        assert dequantize(np.zeros((0, qt.row_bytes(256)), np.uint8), qtype, (0, 256)).shape == (0, 256)


@pytest.mark.parametrize("qtype", ["Q4_K", "IQ4_NL"])
def test_read_only_inputs(ggml, qtype):
    """Memory-mapped tensors (weights to quantize, blocks to decode) arrive read-only;
    the kernels' row helpers are compiled for writable arrays, so the wrapper copies."""
    x = _case("normal")[:4]
    w = _imatrix("random", x.shape[-1])
    ref = ggml.quantize(qtype, x, imatrix=w)
    x.flags.writeable = False
    w.flags.writeable = False
    raw = quantize(x, qtype, imatrix=w)
    assert np.array_equal(raw, ref)
    raw.flags.writeable = False
    assert np.array_equal(dequantize(raw, qtype, x.shape).view(np.uint32),
                          ggml.dequantize(qtype, ref, x.shape).view(np.uint32))
