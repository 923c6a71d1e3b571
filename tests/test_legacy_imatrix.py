"""ggforge.formats.quants.legacy_imatrix: Q4_0, Q4_1, Q5_0, Q5_1 with an importance matrix.

The oracle is libggml's ggml_quantize_chunk with quant_weights (tests/ggml_oracle.py),
which runs quantize_row_q*_impl: a per-row statistic weighs every value, so the rows are
compared whole, for several row lengths (one block, three blocks, 4096 values), on
random, outlier and degenerate rows, with importance vectors that are random, hold
zeros, or are all zero.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from ggforge.formats.errors import QuantizationError
from ggforge.formats.quants import get_type, quantize
from ggforge.formats.quants.legacy_imatrix import quantize_rows_imatrix

try:
    from ggml_oracle import ggml_or_skip
except ImportError:  # tests/ collected as a package
    from tests.ggml_oracle import ggml_or_skip

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]
ROW_LENGTHS = [32, 96, 4096]


@pytest.fixture(scope="module")
def ggml():
    return ggml_or_skip()


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


# ---------------------------------------------------------------- test data

def _degenerate_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    """Rows that hit the special cases: zero / -0.0 / constant rows and blocks, one-hot,
    ties, values around GROUP_MAX_EPS, fp16 over- and underflow of the scales. (k, n)"""
    rows = [np.zeros(n), np.full(n, -0.0), np.full(n, 0.3), np.full(n, -7.0),
            np.tile([1.0, -1.0], n // 2), np.tile([1.0, -1.0], n // 2) * 1e-30,
            np.linspace(-1, 1, n), rng.integers(-8, 8, n) * 0.5,
            np.abs(rng.standard_normal(n)) + 1, -np.abs(rng.standard_normal(n)),
            rng.standard_normal(n) * 1e-15, np.full(n, 65504.0 * 40)]
    one_hot = np.zeros(n)
    one_hot[n // 3] = -250.0
    half_zero = rng.standard_normal(n)
    half_zero[::2] = 0.0
    block_zero = rng.standard_normal(n)
    block_zero[:32] = 0.0  # an all-zero block in an otherwise normal row
    spike = rng.standard_normal(n) * 1e-3
    spike[-1] = 1e4  # one value dominates sigma2
    return np.stack(rows + [one_hot, half_zero, block_zero, spike]).astype(np.float32)


def _case(name: str, n: int) -> np.ndarray:
    """A float32 test matrix (rows, n) by name."""
    rng = _rng(f"{name}-{n}")
    if name == "normal":
        return rng.standard_normal((24, n), dtype=np.float32)
    if name == "outliers":
        x = rng.standard_normal((24, n), dtype=np.float32)
        x[rng.random(x.shape) < 0.01] *= np.float32(1000)
        x[:, 0] = 1e3  # at least one per row, also in rows of one block
        return x
    if name == "degenerate":
        return _degenerate_rows(n, rng)
    if name == "tiny":  # scales in fp16's subnormal range and below
        scale = np.repeat([1e-6, 1e-8, 1e-30, 1e-38], 2)[:, None]
        return (rng.standard_normal((8, n)) * scale).astype(np.float32)
    if name == "huge":  # x*x overflows: sigma2 = Inf, weights Inf/NaN, as in C
        return (rng.standard_normal((8, n)) * 1e30).astype(np.float32)
    raise KeyError(name)


CASES = ["normal", "outliers", "degenerate", "tiny", "huge"]


def _imatrix(kind: str, n: int) -> np.ndarray:
    """Per-column importance as llama-quantize passes it: (n,) float32, positive."""
    rng = _rng(f"imatrix-{kind}-{n}")
    w = (rng.random(n) * 4 + 0.01).astype(np.float32)
    if kind == "zeros":  # a zero block and scattered zero columns
        w[:32] = 0.0
        w[rng.random(n) < 0.25] = 0.0
    elif kind == "all_zero":
        w[:] = 0.0
    return w


def _first_diff(a: np.ndarray, b: np.ndarray, type_size: int) -> str:
    bad = np.flatnonzero((a.reshape(-1, type_size) != b.reshape(-1, type_size)).any(axis=1))
    return f"{bad.size} blocks differ; first block {bad[:1]}" if bad.size else "same"


# ---------------------------------------------------------------- byte identity

@pytest.mark.parametrize("imatrix", ["random", "zeros", "all_zero"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", ROW_LENGTHS)
@pytest.mark.parametrize("qtype", TYPES)
def test_quantize_with_imatrix_matches_ggml(ggml, qtype, n, case, imatrix):
    x = _case(case, n)
    w = _imatrix(imatrix, n)
    ours = quantize(x, qtype, name=case, imatrix=w)
    ref = ggml.quantize(qtype, x, imatrix=w)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref), _first_diff(ours, ref, get_type(qtype).type_size)


@pytest.mark.parametrize("qtype", TYPES)
def test_many_rows_on_threads(ggml, qtype):
    """Enough rows for several thread slices, in a 3-d tensor; the same bytes as ggml."""
    x = _rng("threads").standard_normal((3, 700, 256), dtype=np.float32)
    w = _imatrix("zeros", 256)
    ours = quantize(x, qtype, imatrix=w)
    assert ours.shape == (3, 700, get_type(qtype).row_bytes(256))
    assert np.array_equal(ours, ggml.quantize(qtype, x, imatrix=w))


@pytest.mark.parametrize("qtype", TYPES)
def test_one_imatrix_per_expert(ggml, qtype):
    """An importance array (n_expert, 1, n_per_row) broadcast over each expert's rows
    gives what ggml gives quantizing each expert with its own vector."""
    x = _rng("experts").standard_normal((3, 40, 96), dtype=np.float32)
    w = np.stack([_imatrix(k, 96) for k in ("random", "zeros", "all_zero")])[:, None, :]
    ours = quantize(x, qtype, imatrix=w)
    ref = np.stack([ggml.quantize(qtype, x[e], imatrix=w[e, 0]) for e in range(3)])
    assert np.array_equal(ours, ref)


def test_entry_point_takes_row_vectors(ggml):
    """quantize_rows_imatrix directly: a (n,) vector, a (1, n) row and one row per row
    of the same vector all give ggml's bytes."""
    x = _case("normal", 96)
    w = _imatrix("random", 96)
    ref = ggml.quantize("Q5_1", x, imatrix=w)
    for qw in (w, w[None, :], np.tile(w, (x.shape[0], 1))):
        assert np.array_equal(quantize_rows_imatrix("Q5_1", x, qw), ref)


# ---------------------------------------------------------------- behaviour

def test_imatrix_changes_the_result():
    """The importance matrix is used (the reference path would not match ggml's _impl
    on these rows either, but check the two paths differ outright)."""
    x = _case("normal", 4096)[:4]
    w = _imatrix("random", 4096)
    for qtype in TYPES:
        assert not np.array_equal(quantize(x, qtype), quantize(x, qtype, imatrix=w)), qtype


def test_q8_0_still_ignores_imatrix():
    x = _case("normal", 96)
    assert np.array_equal(quantize(x, "Q8_0", imatrix=_imatrix("random", 96)),
                          quantize(x, "Q8_0"))


@pytest.mark.parametrize("qtype", TYPES)
def test_blocks_alone_refuse_an_imatrix(qtype):
    """The per-block entry cannot see the row statistic, so it refuses rather than
    write bytes ggml would not."""
    qt = get_type(qtype)
    assert qt.quantize_rows_imatrix is not None
    with pytest.raises(QuantizationError, match="whole rows"):
        qt.quantize_blocks(np.ones((2, 32), np.float32), imatrix=np.ones((2, 32), np.float32))


def test_imatrix_shape_checked():
    with pytest.raises(QuantizationError, match="blk.0.ffn_up.weight"):
        quantize(np.ones((2, 64), np.float32), "Q4_0", name="blk.0.ffn_up.weight",
                 imatrix=np.ones(32, np.float32))
    with pytest.raises(QuantizationError, match="Q4_1"):
        quantize_rows_imatrix("Q4_1", np.ones((3, 64), np.float32), np.ones((2, 64), np.float32))


def test_empty_tensor():
    assert quantize(np.ones((0, 64), np.float32), "Q4_0", imatrix=np.ones(64)).shape == (0, 36)


def test_read_only_inputs(ggml):
    """Memory-mapped tensors and importance vectors arrive read-only."""
    x = _case("normal", 96)
    w = _imatrix("zeros", 96)
    ref = ggml.quantize("Q4_1", x, imatrix=w)
    x.flags.writeable = False
    w.flags.writeable = False
    assert np.array_equal(quantize(x, "Q4_1", imatrix=w), ref)
    assert np.array_equal(quantize(x, "Q4_0"), ggml.quantize("Q4_0", x))  # legacy_kernels
