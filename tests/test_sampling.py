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


def test_penalties_as_llama_cpps_penalties_sampler():
    """Repetition, frequency and presence penalties (OpenAI's frequency_penalty and
    presence_penalty) against llama.cpp's penalties sampler fed the same history."""
    import ctypes

    from require import require

    L = require("llama_cpp")
    x = rng.normal(size=50).astype(np.float32) * 2
    hist = list(np.random.default_rng(1).integers(0, 20, 40))
    for last_n, rep, freq, pres in [(64, 1.0, 0.5, 0.0), (16, 1.0, 0.0, 0.8), (8, 1.3, 0.4, -0.7),
                                    (64, 1.1, -0.3, 0.25)]:
        s = L.llama_sampler_init_penalties(x.size, last_n, rep, freq, pres)
        for t in hist:
            L.llama_sampler_accept(s, int(t))
        data = (L.llama_token_data * x.size)(*[L.llama_token_data(i, float(v), 0.0) for i, v in enumerate(x)])
        L.llama_sampler_apply(s, ctypes.byref(L.llama_token_data_array(data, x.size, -1, False)))
        L.llama_sampler_free(s)
        want = np.array([d.logit for d in data])
        got = apply_repeat_penalty(x.astype(np.float64), hist[-last_n:], rep, freq, pres)
        assert np.allclose(got, want, rtol=0, atol=1e-5), (last_n, rep, freq, pres)
        settings = SamplerSettings(temperature=0, repeat_last_n=last_n, repeat_penalty=rep,
                                   frequency_penalty=freq, presence_penalty=pres)
        assert Sampler(settings)(x, hist) == int(np.argmax(want))
