"""The sampling chain against direct float64 definitions of each filter."""
from __future__ import annotations

import numpy as np

from ggforge.runtime.sampling import Sampler, SamplerSettings, apply_repeat_penalty, min_p, top_k, top_p

rng = np.random.default_rng(0)
LOGITS = rng.normal(size=1000) * 3


def _kept(x):
    return set(np.flatnonzero(np.isfinite(x)))


def test_top_k_keeps_the_k_largest():
    assert _kept(top_k(LOGITS, 10)) == set(np.argsort(-LOGITS)[:10])


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    p = np.exp(LOGITS - LOGITS.max())
    p /= p.sum()
    order = np.argsort(-p)
    n = next(i + 1 for i in range(p.size) if p[order[: i + 1]].sum() >= 0.9)
    assert _kept(top_p(LOGITS, 0.9)) == set(order[:n])


def test_min_p_relative_to_the_best():
    p = np.exp(LOGITS - LOGITS.max())
    assert _kept(min_p(LOGITS, 0.1)) == set(np.flatnonzero(p >= 0.1 - 1e-12))


def test_repeat_penalty_as_llama_cpp():
    x = np.array([2.0, -2.0, 1.0, 0.5])
    out = apply_repeat_penalty(x, [0, 1, 1], 1.25)
    assert np.allclose(out, [1.6, -2.5, 1.0, 0.5])


def test_greedy_and_seeded_sampling():
    assert Sampler(SamplerSettings(temperature=0))(LOGITS) == int(np.argmax(LOGITS))
    s = SamplerSettings(temperature=0.9, seed=7)
    a = [Sampler(s)(LOGITS) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same first draw
    draws = [Sampler(SamplerSettings(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=i))(LOGITS)
             for i in range(200)]
    assert set(draws) <= set(np.argsort(-LOGITS)[:3]) and len(set(draws)) > 1
