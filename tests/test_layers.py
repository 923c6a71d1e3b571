"""Tests for runtime/layers: the compiled element-wise steps against the numpy expressions
they replace (the arithmetic the runtime was checked against llama.cpp with), bit for bit
where the operations are the same, and attention against a float64 reference."""
from __future__ import annotations

import numpy as np
import pytest

from ggforge.runtime import layers

F32 = np.float32
rng = np.random.default_rng(0)


def _rms_norm_numpy(x, w, eps):
    mean = (np.sum((x * x).astype(np.float64), axis=-1, keepdims=True) / x.shape[-1]).astype(F32)
    return x * (F32(1.0) / np.sqrt(mean + F32(eps))).astype(F32) * w


def _gelu_numpy(x):
    xf = x.astype(np.float16).astype(F32)
    c = F32(0.7978845608028654)
    g = F32(0.5) * xf * (F32(1.0) + np.tanh(c * xf * (F32(1.0) + F32(0.044715) * xf * xf)))
    y = np.where(x <= F32(-10.0), F32(0.0), g.astype(np.float16).astype(F32))
    return np.where(x >= F32(10.0), x, y)


def _rope_numpy(x, cos, sin, mode):
    n_rot = cos.shape[1] * 2
    c, s = cos[:, None, :], sin[:, None, :]
    out = x.copy()
    a, b = (slice(0, n_rot, 2), slice(1, n_rot, 2)) if mode == "norm" else \
        (slice(0, n_rot // 2), slice(n_rot // 2, n_rot))
    out[..., a] = x[..., a] * c - x[..., b] * s
    out[..., b] = x[..., a] * s + x[..., b] * c
    return out


@pytest.mark.parametrize("shape", [(1, 640), (5, 640), (3, 4, 256)])
def test_rms_norm_is_the_numpy_expression(shape):
    x = (rng.standard_normal(shape) * 3).astype(F32)
    w = rng.standard_normal(shape[-1]).astype(F32)
    y = layers.rms_norm(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == F32
    # ggml sums the squares in order in double, numpy pairwise: equal once rounded to float
    np.testing.assert_array_equal(y, _rms_norm_numpy(x, w, 1e-6))


def test_gelu_is_ggmls_table_at_every_half_and_at_the_edges():
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(F32)
    edges = np.array([-10.0, -9.9999, 9.9999, 10.0, 1e5, -1e5, np.inf, -np.inf], F32)
    x = np.concatenate([halves, edges, (rng.standard_normal(10000) * 4).astype(F32)])
    with np.errstate(invalid="ignore", over="ignore"):
        np.testing.assert_array_equal(layers.gelu_fp16_table(x.reshape(2, -1)),
                                      _gelu_numpy(x).reshape(2, -1))


@pytest.mark.parametrize("freq_factors", [None, (rng.random(32) + 0.5).astype(F32)])
def test_rope_tables_are_the_per_position_values(freq_factors):
    pos = np.array([0, 3, 255, 256, 1000, 70000])
    cos, sin = layers.rope_cache(pos, 64, 1e6, 0.25, freq_factors)
    ref_cos, ref_sin = layers._rope_rows(pos, 64, 1e6, 0.25, freq_factors)
    np.testing.assert_array_equal(cos, ref_cos)
    np.testing.assert_array_equal(sin, ref_sin)
    for p in (0, 999):  # a row does not depend on the other positions computed with it
        c1, s1 = layers._rope_rows(np.array([p]), 64, 1e6, 0.25, freq_factors)
        np.testing.assert_array_equal(layers.rope_cache(np.array([p]), 64, 1e6, 0.25, freq_factors)[0], c1)


@pytest.mark.parametrize("mode", ["norm", "neox"])
def test_rope_is_the_numpy_expression(mode):
    x = rng.standard_normal((3, 4, 96)).astype(F32)           # n_rot 64 of head_dim 96
    cos, sin = layers.rope_cache(np.array([5, 6, 7]), 64, 1e4, 1.0, None)
    np.testing.assert_array_equal(layers.apply_rope(x, cos, sin, mode), _rope_numpy(x, cos, sin, mode))


@pytest.mark.parametrize("n_tok,n_kv,window,softcap", [(1, 1, 0, 0.0), (1, 77, 0, 0.0), (3, 40, 0, 0.0),
                                                  (2, 64, 16, 0.0), (3, 40, 0, 1.5), (2, 64, 16, 1.5)])
def test_decode_attention_matches_float64_and_numpy_path(n_tok, n_kv, window, softcap, monkeypatch):
    """The compiled kernel of a few queries against float64 and the numpy path, also with
    Gemma 2's soft-cap (scores q.k -> softcap * tanh(q.k / softcap), then scaled)."""
    q = rng.standard_normal((n_tok, 4, 64)).astype(F32)
    k = rng.standard_normal((n_kv, 2, 64)).astype(F32)
    v = rng.standard_normal((n_kv, 2, 48)).astype(F32)
    pos = np.arange(n_kv - n_tok, n_kv)
    q = q * 4 if softcap else q      # scores of a few units: the cap bites
    got = layers.attention(q, k, v, pos, 0.125, window, softcap=softcap)
    ref = np.empty((n_tok, 4, 48))
    for t in range(n_tok):
        allowed = (np.arange(n_kv) <= pos[t]) & ((pos[t] - np.arange(n_kv) < window) if window else True)
        for h in range(4):
            s = k[:, h // 2].astype(np.float64) @ q[t, h]
            s = (np.tanh(s / softcap) * softcap if softcap else s) * 0.125
            p = np.where(allowed, np.exp(s - s[allowed].max()), 0.0)
            ref[t, h] = p / p.sum() @ v[:, h // 2]
    np.testing.assert_allclose(got, ref.reshape(n_tok, -1), rtol=0, atol=2e-6)
    monkeypatch.setattr(layers, "ATTEND_MAX_TOKENS", 0)       # the numpy path (prefill)
    np.testing.assert_allclose(layers.attention(q, k, v, pos, 0.125, window, softcap=softcap), got,
                               rtol=0, atol=2e-6)
    if softcap:
        assert np.abs(layers.attention(q, k, v, pos, 0.125, window) - got).max() > 1e-3
