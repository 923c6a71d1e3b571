"""ggforge.formats.quants.k_lanes: the scale searches in SIMD lanes give the scalar searches'
bits, and the kernels built on them (k_q4_q5_lanes, k_q6) give libggml's, for any number of
super-blocks (the kernels take them a batch at a time; the last batch may be short).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from ggforge.formats.quants import get_type, quantize
from ggforge.formats.quants.k_lanes import MAX_LANES, qkx_lanes, qx_lanes
from ggforge.formats.quants.k_search import make_qkx_quants, make_qx_quants

try:
    from ggml_oracle import ggml_or_skip
except ImportError:  # tests/ collected as a package
    from tests.ggml_oracle import ggml_or_skip

F = np.float32


@pytest.fixture(scope="module")
def ggml():
    return ggml_or_skip()


def _groups(seed: str, n: int, g: int) -> np.ndarray:
    """(g, n) float32 groups: random, with the searches' special cases mixed in."""
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    x = rng.standard_normal((g, n)).astype(F)
    specials = [
        np.zeros(n, F), np.full(n, -0.0, F), np.full(n, 0.3, F), np.full(n, -7.0, F),
        np.abs(x[0]) + 1, -np.abs(x[0]), (x[0] * 1e-16).astype(F), x[0] * F(1e4),
        np.where(np.arange(n) % 2, F(1.0), F(-1.0)), rng.integers(-4, 5, n).astype(F) * F(0.5),
    ]
    for i, s in enumerate(specials[:g]):
        x[(3 * i + 1) % g] = s
    return x


# (n, nmax, rmin, rdelta, nstep, use_mad): Q4_K, Q5_K, Q2_K ref; Q4_K/Q5_K/Q4_1 impl
QKX_CASES = [(32, 15, -1.0, 0.1, 20, False), (32, 31, -0.5, 0.1, 15, False),
             (16, 3, -0.5, 0.1, 15, True), (32, 15, -0.9, 0.05, 36, False),
             (32, 31, -0.9, 0.05, 36, False), (16, 3, -0.9, 0.05, 36, False), (32, 15, -1.0, 0.1, 0, False)]


@pytest.mark.parametrize("case", QKX_CASES, ids=str)
@pytest.mark.parametrize("g", [1, 7, 8, 13, MAX_LANES])
def test_qkx_lanes_equal_scalar_search(case, g):
    n, nmax, rmin, rdelta, nstep, use_mad = case
    x = _groups(f"qkx{case}{g}", n, g)
    w = np.abs(_groups(f"w{case}{g}", n, g)) if not use_mad else np.abs(x)
    w[0] = 0  # zero weights
    L_ref = np.zeros((g, n), np.uint8)
    ref = np.zeros((g, 2), F)
    laux = np.zeros(n, np.uint8)
    for j in range(g):
        ref[j] = make_qkx_quants(n, nmax, x[j], w[j], L_ref[j], laux, F(rmin), F(rdelta), nstep, use_mad)
    Lt = np.zeros((n, MAX_LANES), np.uint8)
    scales, mins = np.zeros(MAX_LANES, F), np.zeros(MAX_LANES, F)
    xt, wt = np.zeros((n, MAX_LANES), F), np.zeros((n, MAX_LANES), F)
    xt[:, :g], wt[:, :g] = x.T, w.T
    qkx_lanes(n, g, nmax, xt, wt, F(rmin), F(rdelta), nstep, use_mad, Lt, scales, mins)
    assert np.array_equal(scales[:g].view(np.uint32), ref[:, 0].view(np.uint32))
    assert np.array_equal(mins[:g].view(np.uint32), ref[:, 1].view(np.uint32))
    assert np.array_equal(Lt[:, :g].T, L_ref)


@pytest.mark.parametrize("n, nmax", [(16, 32), (16, 4), (32, 8), (32, 16)])
@pytest.mark.parametrize("has_w", [False, True])
@pytest.mark.parametrize("g", [1, 5, 16, MAX_LANES])
def test_qx_lanes_equal_scalar_search(n, nmax, has_w, g):
    x = _groups(f"qx{n}{nmax}{has_w}{g}", n, g)
    w = np.abs(_groups(f"qxw{n}{g}", n, g))
    L_ref = np.zeros((g, n), np.int8)
    ref = np.array([make_qx_quants(n, nmax, x[j], L_ref[j], w[j], has_w) for j in range(g)], F)
    Lt = np.zeros((n, MAX_LANES), np.int8)
    scales = np.zeros(MAX_LANES, F)
    xt, wt = np.zeros((n, MAX_LANES), F), np.zeros((n, MAX_LANES), F)
    xt[:, :g], wt[:, :g] = x.T, w.T
    qx_lanes(n, g, nmax, xt, wt, has_w, Lt, scales)
    assert np.array_equal(scales[:g].view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(Lt[:, :g].T, L_ref)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("n_blocks", [1, 2, 3, 5, 6, 9])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_kernels_any_block_count_match_ggml(ggml, qtype, n_blocks, with_imatrix):
    """Batches of 4 (Q4_K/Q5_K) or 2 (Q6_K) super-blocks, the last one short."""
    rng = np.random.default_rng(n_blocks)
    x = rng.standard_normal((1, 256 * n_blocks)).astype(F)
    x[0, 256:512] = 0.0  # an all-zero super-block between others
    imatrix = rng.uniform(0, 2, x.shape[1]).astype(F) if with_imatrix else None
    ours = quantize(x, qtype, imatrix=imatrix)
    assert np.array_equal(ours, ggml.quantize(qtype, x, imatrix=imatrix))
    assert ours.shape == (1, get_type(qtype).row_bytes(x.shape[1]))
