"""llama.cpp's CPU flash attention over an F16 cache, which its default (-fa auto) runs:
kernels/flash_attn.py against libggml's own GGML_OP_FLASH_ATTN_EXT (ctypes, one-op
graphs), bit for bit on each of its three paths; and ggforge's defaults (F16 cache, flash
attention) against llama.cpp's defaults on the repository's trained model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ggforge
from ggforge.runtime import kernels, layers
from ggforge.runtime.kernels import flash_attn as fa
from ggml_graph import flash_attn_ext


def _case(rng, n_q, n_kv, n_head, n_head_kv, d, window=0):
    q = rng.standard_normal((n_q, n_head, d)).astype(np.float32)
    k16 = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float16)
    v16 = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float16)
    pos = np.arange(n_kv - n_q, n_kv)
    j = np.arange(n_kv)
    visible = (j[None, :] <= pos[:, None]) & ((window == 0) | (pos[:, None] - j[None, :] < window))
    return q, k16, v16, pos, visible


@pytest.mark.parametrize("n_q,n_kv,n_head,n_head_kv,d,threads,window", [
    (1, 256, 4, 2, 64, 2, 0),       # decode: one chunk
    (5, 256, 4, 2, 64, 2, 0),       # a short batch: one chunk per query
    (7, 256, 4, 4, 32, 1, 0),       # head size below one SIMD step: the leftover sums
    (3, 256, 8, 2, 128, 2, 0),
    (1, 512, 4, 2, 64, 2, 0),       # 512 cells or more: a chunk per thread
    (1, 768, 4, 2, 64, 3, 0),
    (1, 1024, 4, 1, 64, 2, 100),    # sliding window
    (64, 256, 4, 2, 64, 2, 0),      # 64 queries or more: tiles
    (100, 512, 2, 1, 64, 2, 50),
])
def test_kernels_equal_libggml_bit_for_bit(n_q, n_kv, n_head, n_head_kv, d, threads, window):
    rng = np.random.default_rng(n_q * 7 + n_kv)
    q, k16, v16, pos, visible = _case(rng, n_q, n_kv, n_head, n_head_kv, d, window)
    scale = 1 / np.sqrt(d)
    want = flash_attn_ext(q, k16, v16, visible, scale, threads)
    got = layers.flash_attention(q, k16.astype(np.float32), v16.astype(np.float32), pos, scale,
                                 window, n_ctx=n_kv, n_threads=threads)
    assert np.array_equal(got, want), float(np.abs(got - want).max())


@pytest.mark.parametrize("n_q,n_kv,threads,window", [
    (1, 256, 2, 0), (5, 256, 2, 4),  # one chunk (Gemma 2's tiny window)
    (1, 768, 3, 0),                  # a chunk per thread
    (64, 256, 2, 0), (70, 512, 2, 4),  # tiles
])
def test_softcap_equals_libggml_bit_for_bit(n_q, n_kv, threads, window):
    """Gemma 2's attention soft-cap (logit_softcap of ggml_flash_attn_ext): scores of a
    few units, capped at 1.5 and at 50 (the real models' cap), on each path."""
    rng = np.random.default_rng(n_q + n_kv)
    q, k16, v16, pos, visible = _case(rng, n_q, n_kv, 4, 2, 64, window)
    for cap in (1.5, 50.0):
        want = flash_attn_ext(q * 4, k16, v16, visible, 0.125, threads, logit_softcap=cap)
        got = layers.flash_attention(q * 4, k16.astype(np.float32), v16.astype(np.float32), pos, 0.125,
                                     window, n_ctx=n_kv, n_threads=threads, softcap=cap)
        assert np.array_equal(got, want), (cap, float(np.abs(got - want).max()))
        plain = layers.flash_attention(q * 4, k16.astype(np.float32), v16.astype(np.float32), pos, 0.125,
                                       window, n_ctx=n_kv, n_threads=threads)
        assert not np.array_equal(plain, want)


def test_the_views_llama_cpp_takes():
    """The cells a step views: the cache's first max(256, used rounded up to 256), at most
    n_ctx; the split path starts at 512 viewed cells (so at 257 used cells of a large
    cache), which changes the result only through the chunks' sums."""
    rng = np.random.default_rng(5)
    q, k16, v16, pos, visible = _case(rng, 1, 300, 4, 2, 64)
    k, v = k16.astype(np.float32), v16.astype(np.float32)
    scale = 0.125
    for n_ctx, view in ((4096, 512), (300, 300)):
        pad = np.zeros((view - 300, 2, 64), np.float16)
        vis = np.concatenate([visible, np.zeros((1, view - 300), bool)], axis=1)
        want = flash_attn_ext(q, np.concatenate([k16, pad]), np.concatenate([v16, pad]), vis, scale, 2)
        got = layers.flash_attention(q, k, v, pos, scale, 0, n_ctx=n_ctx, n_threads=2)
        assert np.array_equal(got, want), n_ctx


def test_simd_lanes_follow_the_cpu():
    flags = open("/proc/cpuinfo").read()
    assert fa.simd_lanes() == (16 if " avx512f" in flags else 8)


# -- the defaults against llama.cpp's defaults, on the trained model ------------------------------------
EMBEDDED = Path(__file__).resolve().parent.parent / "models" / "pystdlib-6m"
PROMPTS = ["def __init__(self", "import os\nimport sys\n\n\ndef main(", 'class Parser:\n    """',
           "    for i in range(len(", "if __name__ == '__main__':\n"]
STEPS = 24


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    from ggforge.convert.pipeline import convert

    root = tmp_path_factory.mktemp("pystdlib")
    return {t: convert(EMBEDDED, t, root / f"{t}.gguf").output for t in ("F32", "Q8_0", "Q4_K_M")}


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _llama(path, defaults: bool):
    """llama.cpp with its defaults (F16 cache, flash attention as -fa auto picks it on the
    CPU) or with an F32 cache and -fa off; 2 threads, all logits kept."""
    import llama_cpp

    kw = {} if defaults else dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=kernels.get_threads(),
                           logits_all=True, verbose=False, flash_attn=defaults, **kw)


def _llama_run(llm, ids, n):
    """llama.cpp's greedy continuation (prompt as one batch, then one token at a time), its
    logits of each step, and the same sequence's logits as one batch."""
    llm.reset()
    llm.eval(ids)
    out, steps = [], [np.array(llm.scores[len(ids) - 1])]
    for _ in range(n):
        out.append(int(np.argmax(steps[-1])))
        llm.eval([out[-1]])
        steps.append(np.array(llm.scores[llm.n_tokens - 1]))
    llm.reset()
    llm.eval(ids + out[:-1])
    batch = np.array(llm.scores[len(ids) - 1:len(ids) + n - 1])
    return out, np.stack(steps[:-1]), batch


def _ours(path, ids, want, n, **kw):
    """Our greedy continuation with ggforge.load's defaults (or ``kw``), and our logits fed
    llama.cpp's continuation token by token."""
    with ggforge.load(path, n_ctx=512, **kw) as m:
        free = list(m.generate_tokens(ids, max_tokens=n, temperature=0.0, repeat_penalty=1.0))
        cache = m.model.new_cache(512, *m.cache_types, m.flash_attn)
        rows = [m.model.forward(np.asarray(ids), cache)[-1]]
        rows += [m.model.forward(np.asarray([t]), cache)[-1] for t in want[:-1]]
    return free, np.stack(rows)


@pytest.mark.parametrize("ftype", ["F32", "Q8_0", "Q4_K_M"])
def test_defaults_follow_llama_cpp_defaults(ftype, embedded):
    """ggforge's defaults give llama.cpp's defaults' answers. Fed llama.cpp's greedy
    continuation of each prompt, our logits are within twice the larger of two floors
    measured here: llama.cpp's own batched against one-token logits of the same tokens, and
    what our products differ by where attention is exact (the same comparison with an F32
    cache and -fa off). Flash attention is what brings us there: without it (-fa off) we are
    further from llama.cpp's defaults on average. Our greedy continuation equals its own up
    to a step where its top two logits are closer than our logits' distance there, and at
    most half of the prompts part at all. (Measured 2026-12-08, AVX-512: F32 0.8-1.3e-4
    against floors of 0.4-1.0e-4 and 2.0-3.0e-4 without flash attention; Q4_K_M 0.7-1.1e-2
    against 0.5-0.9e-2 and 1.2-1.5e-2.)"""
    path = embedded[ftype]
    ref16, ref32 = _llama(path, True), _llama(path, False)
    try:
        errs, errs_off, floors, parted = [], [], [], []
        for prompt in PROMPTS:
            ids = ref16.tokenize(prompt.encode(), add_bos=True)
            want, steps, batch = _llama_run(ref16, ids, STEPS)
            free, ours = _ours(path, ids, want, STEPS)
            _, ours_off = _ours(path, ids, want, STEPS, flash_attn="off")
            want32, steps32, _ = _llama_run(ref32, ids, STEPS)
            _, ours32 = _ours(path, ids, want32, STEPS, cache_type_k="f32", cache_type_v="f32")
            errs.append(_rel(ours, steps))
            errs_off.append(_rel(ours_off, steps))
            floors.append(max(_rel(batch, steps), _rel(ours32, steps32), 1e-6))
            k = next((i for i, (a, b) in enumerate(zip(free, want)) if a != b), None)
            if k is not None:
                top2 = np.sort(steps[k])[-2:]
                assert top2[1] - top2[0] <= 2 * np.abs(ours[k] - steps[k]).max(), (
                    f"{ftype} {prompt!r}: parted from llama.cpp at step {k} where its choice was clear")
                parted.append(prompt)
        assert max(errs) <= 2 * max(floors), (errs, floors)
        assert np.mean(errs) < np.mean(errs_off), (errs, errs_off)
        assert len(parted) <= len(PROMPTS) // 2, parted
    finally:
        ref16.close()
        ref32.close()



# Gemma 2's soft-capped attention through the defaults (F16 cache, flash attention): relative
# logit error of ours against llama.cpp's defaults, fed its greedy continuation, and with an
# F32 cache and -fa off on both sides; measured 2026-12-08 (AVX-512, 2 threads, F32 file):
# 5.2e-4 and 4.9e-5. The defaults' figure is the family's (tiny Gemma 3, no soft-cap: 5.9e-4):
# a rounding of the F16 cache moves an input of the fp16 GELU table by a step.
GEMMA2_MEASURED = (5.2e-4, 4.9e-5)


def test_gemma2_defaults_follow_llama_cpp_defaults(tiny_model, tmp_path):
    from ggforge.convert.pipeline import convert

    path = convert(tiny_model("gemma2"), "F32", tmp_path / "g.gguf").output
    ref16, ref32 = _llama(path, True), _llama(path, False)
    try:
        ids = ref16.tokenize(b"Once upon a time, there was a tiny model that 42 people liked.", add_bos=True)
        want, steps, _ = _llama_run(ref16, ids, STEPS)
        free, ours = _ours(path, ids, want, STEPS)
        want32, steps32, _ = _llama_run(ref32, ids, STEPS)
        _, ours32 = _ours(path, ids, want32, STEPS, cache_type_k="f32", cache_type_v="f32", flash_attn="off")
    finally:
        ref16.close()
        ref32.close()
    assert _rel(ours, steps) < 3 * GEMMA2_MEASURED[0], _rel(ours, steps)
    assert _rel(ours32, steps32) < 3 * GEMMA2_MEASURED[1], _rel(ours32, steps32)
    k = next((i for i, (a, b) in enumerate(zip(free, want)) if a != b), None)
    if k is not None:
        top2 = np.sort(steps[k])[-2:]
        assert top2[1] - top2[0] <= 2 * np.abs(ours[k] - steps[k]).max(), f"parted at step {k}"
