"""runtime/type_facts.py is the one home of what the runtime knows about a weight type:
its block geometry against gguf-py's table, its vec_dot_type against libggml-cpu's own
type traits, the device padding against the word loads of the GPU kernels, and both
backends and the planner reading it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ggforge.formats.errors import UnsupportedModelError
from ggforge.runtime import placement
from ggforge.runtime.kernels.dispatch import ROUTES, route
from ggforge.runtime.type_facts import FACTS, type_facts
from ggml_oracle import ggml_or_skip
from require import require


@pytest.mark.parametrize("t", sorted(FACTS), ids=lambda t: T(t).name)
def test_block_geometry_is_gguf_py_s(t):
    f = FACTS[t]
    assert (f.qk, f.block_bytes) == GGML_QUANT_SIZES[T(t)]


def test_vec_dot_type_is_libggml_cpu_s():
    from test_kernels import GgmlCpu   # the ctypes view of type_traits_cpu

    cpu = GgmlCpu(ggml_or_skip())
    got = {f.name: f.vec_dot_type.lower() for f in FACTS.values()}
    want = {f.name: T(cpu.traits(f.name).vec_dot_type).name.lower() for f in FACTS.values()}
    assert got == want


def test_word_kernels_get_whole_words():
    """The GPU's integer decode kernels load 4-byte words of every block they read: each
    type routed to one has word-sized blocks on the device (padded where the file's are not)."""
    require("torch")
    require("triton")
    from ggforge.runtime.gpu import ops

    words = {r.facts.name for r in ops.GPU_ROUTES.values() if r.decode is not ops._gemv}
    assert words == {"Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"}
    for f in FACTS.values():
        assert f.device_block_bytes >= f.block_bytes
        assert f.name not in words or f.device_block_bytes % 4 == 0, f.name
    assert {f.name for f in FACTS.values() if f.device_block} == {"Q4_0", "Q5_0", "Q6_K"}


def test_planner_counts_the_padded_bytes():
    q6 = SimpleNamespace(nbytes=3 * 210, ggml_type=T.Q6_K)
    q4 = SimpleNamespace(nbytes=5 * 18, ggml_type=T.Q4_0)
    q8 = SimpleNamespace(nbytes=7 * 34, ggml_type=T.Q8_0)
    assert [placement.device_bytes(i) for i in (q6, q4, q8)] == [3 * 212, 5 * 20, 7 * 34]


def test_both_backends_read_the_table():
    assert set(ROUTES) == set(FACTS)
    assert all(route(t).facts is FACTS[t] for t in FACTS)
    require("torch")
    require("triton")
    from ggforge.runtime.gpu.ops import GPU_ROUTES

    assert set(GPU_ROUTES) == set(FACTS)
    assert all(r.facts is FACTS[t] for t, r in GPU_ROUTES.items())


def test_a_type_without_kernels_is_named_with_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match=r"IQ2_XXS; supported: F32, F16, BF16, Q8_0"):
        route(T.IQ2_XXS)
    with pytest.raises(UnsupportedModelError, match="id 999"):
        type_facts(999)
