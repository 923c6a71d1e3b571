"""GPU offload: the Triton kernels, the device layers and the plan.

Without CUDA the kernels run in Triton's interpreter on the CPU (tests/conftest.py sets
TRITON_INTERPRET), so every type and the whole offloaded forward pass are checked on CI;
tests marked ``gpu`` need CUDA (CUDA graphs, speed) and skip without it.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from require import require
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

from ggforge.convert.pipeline import convert
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.quants import get_type, quantize
from ggforge.runtime import placement
from ggforge.runtime.config import ModelConfig
from ggforge.runtime.decoder import layer_windows
from runtime_settings import load_at_oracle_settings as load
from ggforge.runtime.kernels import QWeight
from ggforge.runtime.kernels import get_rows as cpu_get_rows
from ggforge.runtime.kernels import matmul as cpu_matmul
from ggforge.runtime.sampling import SamplerSettings
from ggforge.tools.cli import cli
from ggforge.tools.plan_view import render_plan

torch = require("torch")
require("triton")
from ggforge.runtime.gpu import backend, ops  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GREEDY = SamplerSettings(temperature=0.0, repeat_last_n=0)

gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL,
         T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS]


EXACT_DECODE = (T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_K, T.Q5_K, T.Q6_K)


def _weight(t, n_out, n_in, rng):
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    w[0, :7] *= 30.0                                   # an outlier-heavy row
    raw = quantize(w, get_type(int(t))).reshape(n_out, -1)
    return QWeight(np.ascontiguousarray(raw), int(t), n_in, n_out)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matmul_equals_cpu_kernels(t):
    """The fused dequantize-and-multiply kernels compute what the CPU kernels compute
    (same activation rounding), for decode (few tokens) and prefill (many)."""
    rng = np.random.default_rng(int(t))
    n_in = 512 if t not in (T.F32, T.F16, T.BF16) else 200    # ragged rows for floats
    qw = _weight(t, 40, n_in, rng)
    gw = ops.GWeight.upload(qw, DEVICE)
    assert gw.nbytes == placement.device_bytes(SimpleNamespace(nbytes=qw.raw.nbytes, ggml_type=t))
    # Q4_1/Q5_1: llama.cpp adds min * fp16(d * sum(q)) per block; we fold the fp16 rounding
    # of d in instead (a 5e-4 difference)
    bound = 2e-3 if t in (T.Q4_1, T.Q5_1) else 2e-6
    for n in (1, 3, 40):
        x = rng.standard_normal((n, n_in)).astype(np.float32)
        ref = cpu_matmul(x, qw)
        got = ops.matmul(torch.from_numpy(x).to(DEVICE), gw).cpu().numpy()
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < bound, f"{t.name} n={n}: {err:.3g}"
        if t in EXACT_DECODE and n <= ops.DECODE_MAX_TOKENS:
            # integer block sums, each block's float32 step as the CPU's, summed in float64
            # on both sides: the same float32 results whatever the order of the blocks
            assert np.array_equal(got, ref), f"{t.name} n={n}: {np.sum(got != ref)} differ"
    ids = np.array([5, 0, 39, 5])
    rows = ops.get_rows(gw, torch.from_numpy(ids).to(DEVICE)).cpu().numpy()
    assert np.array_equal(rows, cpu_get_rows(qw, ids))


@pytest.mark.parametrize("t", EXACT_DECODE, ids=lambda t: t.name)
def test_decode_products_equal_the_cpu_bit_for_bit(t):
    """Rows of 64 blocks (8 super-blocks): the CPU sums a row's blocks in order, the device
    in lanes and a tree; both add each block's float32 step in float64 and round once, so
    the float32 results are the same."""
    rng = np.random.default_rng(100 + int(t))
    qw = _weight(t, 64, 2048, rng)
    gw = ops.GWeight.upload(qw, DEVICE)
    for n in (1, 3):
        x = rng.standard_normal((n, 2048)).astype(np.float32)
        got = ops.matmul(torch.from_numpy(x).to(DEVICE), gw).cpu().numpy()
        ref = cpu_matmul(x, qw)
        assert np.array_equal(got, ref), f"{t.name} n={n}: {np.sum(got != ref)} of {got.size} differ"


def test_q8_0_planes_and_byte_path_agree():
    """Q8_0 rows of a multiple of 128 go to the planar kernels (quants and scales regrouped
    at upload, same bytes); others read the blocks as stored. Both equal the CPU, also
    where the decode kernel's last step runs past the row (384 columns in steps of 256)."""
    rng = np.random.default_rng(3)
    for n_in, planar in ((256, True), (384, True), (96, False)):
        qw = _weight(T.Q8_0, 24, n_in, rng)
        gw = ops.GWeight.upload(qw, DEVICE)
        assert (gw.planes is not None) == planar and gw.nbytes == qw.raw.nbytes
        for n in (1, 20):
            x = rng.standard_normal((n, n_in)).astype(np.float32)
            ref = cpu_matmul(x, qw)
            got = ops.matmul(torch.from_numpy(x).to(DEVICE), gw).cpu().numpy()
            assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-6
        ids = np.array([1, 23])
        got = ops.get_rows(gw, torch.from_numpy(ids).to(DEVICE)).cpu().numpy()
        assert np.array_equal(got, cpu_get_rows(qw, ids))


def test_q8_0_decode_tiles_by_shape(tmp_path):
    """Wide products (both sides >= 4,096) step 2,048 columns, narrower ones 512; a tile
    file from scripts/device/q8_sweep.py, set through the settings, takes precedence; a
    malformed one is one ValueError naming the file."""
    from ggforge.runtime import gpu
    from ggforge.runtime.gpu import settings

    assert ops.q8_gemv_tiles(4096, 11008)["BK"] == 2048
    assert ops.q8_gemv_tiles(2048, 5632)["BK"] == 512
    f = tmp_path / "tiles.json"
    f.write_text('{"2048x5632": {"BM": 2, "BK": 1024, "num_warps": 2}}')
    try:
        gpu.configure(q8_tiles=settings.read_tile_file(f))
        assert ops.q8_gemv_tiles(2048, 5632) == {"BM": 2, "BK": 1024, "num_warps": 2}
        assert ops.q8_gemv_tiles(4096, 11008)["BK"] == 2048
    finally:
        gpu.configure(q8_tiles={})
    assert ops.q8_gemv_tiles(2048, 5632)["BK"] == 512
    for bad in ('{"2048x5632": {"BM": 2}}', "not json", "[1]"):
        f.write_text(bad)
        with pytest.raises(ValueError, match=r".*tiles\.json: not a tile"):
            settings.read_tile_file(f)
    with pytest.raises(ValueError, match="q8_tiles: not a tile table"):
        gpu.configure(q8_tiles={"1x1": {"BM": 0, "BK": 1, "num_warps": 1}})
    with pytest.raises(TypeError):
        gpu.configure(pdl_on=True)


def test_pdl_is_a_setting():
    """PDL follows settings.pdl where the GPU has it and is never asked of one that
    does not (Triton's interpreter here)."""
    from ggforge.runtime import gpu
    from ggforge.runtime.gpu import pdl

    try:
        for asked in (None, True, False):
            gpu.configure(pdl=asked)
            want = pdl.CAPABLE if asked is None else asked and pdl.CAPABLE
            assert pdl.enabled() == want
            assert pdl.launch() == ({"launch_pdl": True} if want else {})
    finally:
        gpu.configure(pdl=None)


def test_grouped_weights_are_one_launch_and_equal():
    rng = np.random.default_rng(1)
    a, b = _weight(T.Q4_K, 24, 256, rng), _weight(T.Q4_K, 8, 256, rng)
    group = ops.GWeight.upload_group([a, b], DEVICE)
    assert len(group) == 1 and group[0].n_out == 32
    mixed = ops.GWeight.upload_group([a, _weight(T.Q6_K, 8, 256, rng)], DEVICE)
    assert len(mixed) == 2
    x = rng.standard_normal((2, 256)).astype(np.float32)
    got = ops.matmul_group(torch.from_numpy(x).to(DEVICE), group).cpu().numpy()
    ref = np.concatenate([cpu_matmul(x, a), cpu_matmul(x, b)], axis=1)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-6


@pytest.mark.parametrize("dot", [True, False])
@pytest.mark.parametrize("n_head,n_head_kv,d,window,softcap", [(8, 2, 16, 0, 0.0), (4, 1, 64, 5, 0.0),
                                                         (3, 3, 24, 0, 0.0), (4, 1, 64, 5, 1.5)])
def test_decode_attention_kernel_equals_float64_attention(n_head, n_head_kv, d, window, softcap, dot,
                                                          monkeypatch):
    """The two-launch decode attention (splits + combine; tensor-core or broadcast products;
    the combine reading 2 splits at a time) equals float64 attention rounded once (torch's,
    as the CPU backend's attend) bit for bit, on a ring with empty cells, future positions
    and a sliding window, with a scale that float32 does not hold exactly; and with Gemma 2's
    soft-capped scores."""
    from ggforge.runtime.gpu import attn_kernels
    monkeypatch.setattr(attn_kernels, "DOT", dot)
    monkeypatch.setattr(attn_kernels, "COMBINE_SPLITS", 2)
    gen = torch.Generator().manual_seed(n_head * 100 + d)
    cells = 37
    kc = torch.randn((cells, n_head_kv, d), generator=gen)
    vc = torch.randn((cells, n_head_kv, d), generator=gen)
    pc = torch.arange(cells, dtype=torch.int64) + 3
    pc[[4, 9]] = -1                                    # empty cells
    q = torch.randn((1, n_head, d), generator=gen) * 2
    qpos = torch.tensor([30])                          # cells holding 31.. are in the future
    args = [t.to(DEVICE) for t in (q, kc, vc, pc, qpos)]
    got = attn_kernels.decode_attention(*args, 0.3, window, cells, softcap=softcap).cpu()
    ref = backend._attention(q, kc, vc, pc, qpos, 0.3, window, softcap)
    if softcap:
        assert not torch.equal(ref, backend._attention(q, kc, vc, pc, qpos, 0.3, window))
    assert got.shape == ref.shape == (1, n_head * d)
    assert torch.equal(got, ref), f"{int((got != ref).sum())} of {got.numel()} differ"


@pytest.mark.parametrize("rope,n_rot,extras", [("norm", 16, False), ("neox", 12, True), ("neox", 16, False)])
def test_prep_kernel_equals_the_cpu_steps(rope, n_rot, extras):
    """Bias, q/k RMS norms, rope and the ring write in one launch give the CPU backend's
    numbers (runtime.layers: rms_norm, apply_rope) to the last bit or so, for three tokens
    of which one wraps the ring; partial rope (n_rot < head dim) passes the rest through."""
    from ggforge.runtime.gpu.fused_kernels import prep
    from ggforge.runtime.layers import apply_rope, rms_norm, rope_cache
    rng = np.random.default_rng(n_rot)
    n_head, n_kv, d, size, n = 6, 2, 16, 5, 3
    qkv = (rng.standard_normal((n, (n_head + 2 * n_kv) * d)) * 3).astype(np.float32)
    bias = rng.standard_normal(qkv.shape[1]).astype(np.float32) if extras else None
    qn, kn = (rng.standard_normal((2, d)).astype(np.float32) if extras else (None, None))
    pos = np.array([3, 4, 5])
    cos, sin = rope_cache(np.arange(8), n_rot, 10000.0, 1.0, None)
    x = qkv + bias if extras else qkv
    q, k, v = np.split(x, [n_head * d, (n_head + n_kv) * d], axis=1)
    q, k, v = q.reshape(n, n_head, d), k.reshape(n, n_kv, d), v.reshape(n, n_kv, d)
    if extras:
        q, k = rms_norm(q, qn, 1e-6), rms_norm(k, kn, 1e-6)
    q_ref = apply_rope(q, cos[pos], sin[pos], rope) * np.float32(0.25)
    k_ref = apply_rope(k, cos[pos], sin[pos], rope)
    arrays = {"qkv": qkv, "pos": pos, "cos": cos, "sin": sin, "bias": bias, "qn": qn, "kn": kn}
    t = {k_: None if a is None else torch.from_numpy(a).to(DEVICE) for k_, a in arrays.items()}
    kc, vc = torch.zeros((size, n_kv, d), device=DEVICE), torch.zeros((size, n_kv, d), device=DEVICE)
    pc = torch.full((size,), -1, dtype=torch.int64, device=DEVICE)
    got = prep(t["qkv"], t["pos"], t["cos"], t["sin"], kc, vc, pc, t["bias"], t["qn"], t["kn"],
               n_head, n_kv, d, d, 1e-6, rope, 0.25, size).cpu().numpy()
    np.testing.assert_allclose(got, q_ref, rtol=3e-7, atol=0)
    slots = pos % size                                           # 3, 4, 0
    np.testing.assert_allclose(kc.cpu().numpy()[slots], k_ref, rtol=3e-7, atol=0)
    np.testing.assert_array_equal(vc.cpu().numpy()[slots], v)
    assert pc.cpu().tolist() == [5, -1, -1, 3, 4]


def test_decode_reads_the_attention_bucket_of_the_cache():
    """The bytes a decode step reads from the cache (the benchmark's bandwidth figure): a
    full-context layer reads its cells up to the position rounded up to 256, capped at its
    size; a sliding-window ring is read whole. 2 kv heads x (8 + 8) floats + the position."""
    cache = backend.GpuCache([1000, 300], 2, 8, 8, [0, 100], torch.device("cpu"))
    cell = 2 * 8 * 4 * 2 + 8
    assert cache.read_bytes(0) == (256 + 300) * cell
    assert cache.read_bytes(300) == (512 + 300) * cell
    assert cache.read_bytes(900) == (1000 + 300) * cell


def test_gelu_is_the_cpu_backends_table():
    """GELU on the device looks up ggml's fp16 table as the CPU backend does: equal bit for
    bit, thresholds at +-10 included."""
    from ggforge.runtime.layers import gelu_fp16_table, gelu_table
    x = np.concatenate([np.linspace(-12, 12, 20001, dtype=np.float32),
                        np.float32([-10, 10, -9.999, 9.999, 0, -0.0, 1e-8, 65000])])
    from ggforge.runtime.gpu.fused_kernels import act
    gu = torch.from_numpy(np.concatenate([x, np.ones_like(x)])[None, :]).to(DEVICE)   # gate | up = 1
    got = act(gu, x.size, "gelu", torch.from_numpy(gelu_table()).to(DEVICE), quant=False)
    assert np.array_equal(got.cpu().numpy()[0], gelu_fp16_table(x[None, :])[0])


@pytest.fixture(scope="module")
def q4km(tiny_model, tmp_path_factory):
    files = {}

    def get(arch):
        if arch not in files:
            out = tmp_path_factory.mktemp(f"gpu-{arch}") / "m.gguf"
            files[arch] = convert(tiny_model(arch), "Q4_K_M", out).output
        return files[arch]
    return get


PROMPT = "Once upon a time, there was a tiny model that 42 people liked."


@pytest.mark.parametrize("arch,where", [
    ("llama3", "half"), ("qwen2", "all"),
    # gemma3's device layers are also checked, faster, by the ring test below
    pytest.param("gemma3", "half", marks=pytest.mark.slow)])
def test_offloaded_layers_follow_the_cpu_backend(q4km, arch, where):
    """Logits and a greedy continuation with layers on the device equal the CPU run
    (qwen2: biases and a tied head; gemma3: a sliding and a global layer on the device,
    rings, extra norms, GELU)."""
    path = q4km(arch)
    with load(path) as m:
        ids = m.tokenize(PROMPT)
        ref = m.eval(ids)
        ref_tokens = list(m.generate_tokens(ids, max_tokens=6, settings=GREEDY))
        n_layer = m.model.config.n_layer
    ngl = n_layer // 2 if where == "half" else "all"
    with load(path, gpu_layers=ngl, device=DEVICE) as m:
        assert m.model.n_cpu_layers == (n_layer - n_layer // 2 if where == "half" else 0)
        assert m.model.gpu.layers and len(m.model.gpu.layers) == n_layer - m.model.n_cpu_layers
        assert m.model.gpu.head == (where == "all")
        got = m.eval(ids)
        tokens = list(m.generate_tokens(ids, max_tokens=6, settings=GREEDY))
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert err < 2e-2, err
    assert tokens == ref_tokens


@pytest.mark.parametrize("arch,where", [
    ("llama3", "half"), ("gemma3", "half"),
    # Phi-3: fused projections as row views, long rope factors and attn_factor (48 s interpreted)
    pytest.param("phi3-long", "all", marks=pytest.mark.slow),
    pytest.param("gemma3", "all", marks=pytest.mark.slow),
    pytest.param("llama3", "all", marks=pytest.mark.slow),
    pytest.param("qwen2", "all", marks=pytest.mark.slow)])
def test_device_layers_equal_the_cpu_bit_for_bit(q4km, arch, where):
    """Short prompts (up to DECODE_MAX_TOKENS) and decode steps: the device's products (integer
    block sums, float32 block steps summed in float64) and attention (float64, rounded
    once) give the CPU backend's float32 results exactly, though both sum in other orders;
    so logits are equal, not close, and greedy continuations cannot part at near-ties."""
    path = q4km(arch)
    with load(path) as m:
        ids = m.tokenize(PROMPT)[:8]
        ref = m.eval(ids)
        ref_tokens = list(m.generate_tokens(ids, max_tokens=4, settings=GREEDY))
        ref_next = m.model.forward(np.asarray(ref_tokens[-1:]), m.cache)
        n_layer = m.model.config.n_layer
    with load(path, gpu_layers=n_layer // 2 if where == "half" else "all", device=DEVICE) as m:
        got = m.eval(ids)
        tokens = list(m.generate_tokens(ids, max_tokens=4, settings=GREEDY))
        got_next = m.model.forward(np.asarray(tokens[-1:]), m.cache)
    assert np.array_equal(got, ref), f"{np.sum(got != ref)} of {got.size} prompt logits differ"
    assert tokens == ref_tokens
    assert np.array_equal(got_next, ref_next), f"{np.sum(got_next != ref_next)} logits differ"


def test_softcapped_attention_on_the_device_equals_the_cpu(tiny_model, tmp_path):
    """Gemma 2 (Q8_0), its last two layers (a sliding and a global one) on the device: the
    soft-capped attention of a short prompt and of decode steps gives the CPU backend's
    logits bit for bit. (Its Q4_K_M file differs from the CPU in a last bit of one prompt
    row, with or without the soft-cap: in a product, not in the attention.)"""
    path = convert(tiny_model("gemma2"), "Q8_0", tmp_path / "m.gguf").output
    with load(path) as m:
        ids = m.tokenize(PROMPT)[:8]
        ref = m.eval(ids)
        ref_tokens = list(m.generate_tokens(ids, max_tokens=3, settings=GREEDY))
    with load(path, gpu_layers=2, device=DEVICE) as m:
        got = m.eval(ids)
        tokens = list(m.generate_tokens(ids, max_tokens=3, settings=GREEDY))
    assert np.array_equal(got, ref), f"{np.sum(got != ref)} of {got.size} logits differ"
    assert tokens == ref_tokens


def test_prompt_products_of_cpu_layers_run_on_the_device(q4km, monkeypatch):
    """With layers offloaded, a CPU layer's products over a batch of OFFLOAD_MIN_BATCH
    tokens or more run on the device, as llama.cpp's CUDA backend takes them (32 there; 4
    here, for a short prompt); single-token steps stay on the CPU. Logits and a greedy
    continuation still follow the CPU run."""
    from ggforge.runtime import model as model_mod
    monkeypatch.setattr(model_mod, "OFFLOAD_MIN_BATCH", 4)
    path = q4km("llama3")
    with load(path) as m:
        ids = m.tokenize(PROMPT)
        ref = m.eval(ids)
        ref_tokens = list(m.generate_tokens(ids, max_tokens=6, settings=GREEDY))
        n_layer = m.model.config.n_layer
    batches = []
    host_matmul = backend.GpuLayers.host_matmul
    monkeypatch.setattr(backend.GpuLayers, "host_matmul",
                        lambda self, x, w: batches.append(x.shape[0]) or host_matmul(self, x, w))
    with load(path, gpu_layers=n_layer // 2, device=DEVICE) as m:
        got = m.eval(ids)
        n_cpu = m.model.n_cpu_layers
        tokens = list(m.generate_tokens(ids, max_tokens=6, settings=GREEDY))
    assert n_cpu > 0 and len(batches) >= 7 * n_cpu and set(batches) == {len(ids)}
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert err < 2e-2, err
    assert tokens == ref_tokens


@pytest.mark.parametrize("arch", ["llama3", "gemma3", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_fused_q8_0_decode_follows_the_cpu_backend(tiny_model, tmp_path, arch):
    """Q8_0 layers decode through the fused kernels (norm, residual and activation each
    ending in the Q8_0 rounding; attention writing rounded output): SiLU and GELU, post
    norms; Gemma 2's soft-capped attention and logits (60 s interpreted). Greedy
    continuations equal the CPU run's; the logits of a decoded token equal
    the unfused device path's and follow the CPU's (random tiny models amplify 1e-7
    differences to ~1e-2 through quantized activations, see docs/gpu.md)."""
    path = convert(tiny_model(arch), "Q8_0", tmp_path / "m.gguf").output
    with load(path) as m:
        ids = m.tokenize(PROMPT)
        ref_tokens = list(m.generate_tokens(ids, max_tokens=6, settings=GREEDY))
        ref = m.model.forward(np.asarray(ref_tokens[:1]), m.cache)   # one more decode step
    runs = {}
    for fused in (True, False):   # False: the same layers through the separate glue
        with load(path, gpu_layers="all", device=DEVICE) as m:
            assert all(L.fused for L in m.model.gpu.layers)
            for L in m.model.gpu.layers:
                L.fused = fused
            tokens = list(m.generate_tokens(ids, max_tokens=6, settings=GREEDY))
            runs[fused] = m.model.forward(np.asarray(ref_tokens[:1]), m.cache)
        assert tokens == ref_tokens
    got = runs[True]
    assert float(np.linalg.norm(got - runs[False]) / np.linalg.norm(got)) < 1e-5
    assert float(np.linalg.norm(got - ref) / np.linalg.norm(ref)) < 2e-2


@pytest.mark.parametrize("ctk,ctv", [("f16", "f32"), ("f16", "f16")])
def test_f16_cache_on_the_device_follows_the_cpus(q4km, ctk, ctv):
    """--cache-type-k/v f16 with layers offloaded: the device cache is float16 (half the
    bytes) and the logits and greedy tokens follow the CPU backend with the same cache
    types: the queries rounded to F16 before K.q, the normalized softmax weights before the
    product with V (an F16 value cache decodes through torch's attention for that).
    (qwen2: the tiny llama3's prompt ends on a near-tie, top-2 logits 0.007 apart.)"""
    path = q4km("qwen2")
    with load(path, cache_type_k=ctk, cache_type_v=ctv) as m:
        ids = m.tokenize(PROMPT)
        ref = m.eval(ids)
        ref_tokens = list(m.generate_tokens(ids, max_tokens=6, settings=GREEDY))
    with load(path, gpu_layers="all", device=DEVICE, cache_type_k=ctk, cache_type_v=ctv) as m:
        g = m.cache.gpu
        assert g.k[0].dtype == torch.float16 and g.v[0].dtype == (torch.float16 if ctv == "f16" else torch.float32)
        got = m.eval(ids)
        tokens = list(m.generate_tokens(ids, max_tokens=6, settings=GREEDY))
        c = m.model.config
        assert g.nbytes == sum(k.shape[0] for k in g.k) * c.n_head_kv * (
            c.head_dim * 2 + c.head_dim_v * (2 if ctv == "f16" else 4))
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert err < 2e-2, err
    assert tokens == ref_tokens


def test_sliding_window_ring_and_prefix_reuse(q4km, monkeypatch):
    """A small batch size makes the sliding-window layers' ring wrap during the prompt; the
    result still equals the CPU's, and a prompt that extends the last one reuses the cache
    only when the ring still holds the window it needs."""
    monkeypatch.setattr(backend, "UBATCH", 4)
    path = q4km("gemma3")
    with load(path) as m:
        ids = m.tokenize(PROMPT)
        ref = m.eval(ids)
    with load(path, gpu_layers=2, device=DEVICE) as m:        # layers 4 (sliding) and 5 (global)
        c = m.model.config
        w = layer_windows(c)
        assert w[c.n_layer - 2] and not w[c.n_layer - 1]
        cache = m.model.new_cache(64)
        sizes = cache.gpu.sizes
        assert min(sizes) == c.sliding_window + 4 < len(ids)     # rings smaller than the prompt
        logits = m.model.forward(np.asarray(ids), cache, all_logits=True)
        assert np.linalg.norm(logits - ref) / np.linalg.norm(ref) < 2e-2
        n = len(ids)
        assert cache.reusable(n) == n                     # the ring holds the last window
        assert cache.reusable(n - 2) == n - 2
        assert cache.reusable(3) == 0                     # position 3's window is overwritten


def test_plan_counts_layers_as_llama_cpp(q4km):
    with GGUFFile.open(q4km("gemma3")) as g:
        c = ModelConfig.from_gguf(g)
        for n, first, head in [(0, c.n_layer, False), (2, c.n_layer - 2, False),
                               (c.n_layer, 0, False), (c.n_layer + 1, 0, True), (99, 0, True)]:
            p = placement.make_plan(g, c, 128, n)
            assert p.first_gpu_layer == first and p.head_on_gpu == head
            assert [L.device for L in p.layers] == ["cpu"] * first + ["gpu"] * (c.n_layer - first) \
                or n == 0 and all(L.device == "cpu" for L in p.layers)
        p = placement.make_plan(g, c, 128, "all")
        assert p.gpu_layers == c.n_layer + 1
        # the KV formula: cells x kv heads x (dk + dv) x 4 bytes; sliding layers hold a ring
        per_cell = c.n_head_kv * (c.head_dim + c.head_dim_v) * 4
        swa = [w > 0 for w in layer_windows(c)]
        ring = min(128, c.sliding_window + placement.UBATCH)
        assert p.gpu_kv == sum((ring if s else 128) * per_cell for s in swa)
        def dev(t):   # blocks padded on the device: Q6_K 210 -> 212, Q5_0 22 -> 24, Q4_0 18 -> 20
            pad = {T.Q6_K: (210, 212), T.Q5_0: (22, 24), T.Q4_0: (18, 20)}.get(t.ggml_type, (1, 1))
            return int(t.nbytes) // pad[0] * pad[1]
        weights = sum(dev(t) for name, t in g.tensors.items() if name.startswith("blk."))
        assert any(t.ggml_type == T.Q6_K for t in g.tensors.values())
        head = int(g.tensors["output_norm.weight"].nbytes) + dev(g.tensors["token_embd.weight"])
        assert p.gpu_weights == weights + head                  # tied head: a copy of token_embd
        # layers left on the CPU are counted as the file holds them (no device padding)
        cpu_only = placement.make_plan(g, c, 128, 0)
        assert sum(L.weights for L in cpu_only.layers) == sum(
            int(t.nbytes) for name, t in g.tensors.items() if name.startswith("blk.")) < weights
        # -ctk f16 -ctv f32: keys 2 bytes an element, values 4
        mixed = placement.make_plan(g, c, 128, "all", kv_bytes=(2, 4))
        assert mixed.gpu_kv == sum((ring if s else 128) * c.n_head_kv * (c.head_dim * 2 + c.head_dim_v * 4)
                                   for s in swa)
        assert "KV cache (K float16, V float32)" in render_plan(mixed)


def test_auto_takes_the_most_layers_that_fit_and_all_fails_with_numbers(q4km):
    with GGUFFile.open(q4km("llama3")) as g:
        c = ModelConfig.from_gguf(g)
        full = placement.make_plan(g, c, 256, "all")
        two = placement.make_plan(g, c, 256, 2)
        free = two.gpu_total + 1
        auto = placement.make_plan(g, c, 256, "auto", device_free=free)
        assert auto.gpu_layers == 2 and auto.fits
        tight = placement.make_plan(g, c, 256, "all", device_free=free)
        assert not tight.fits and full.gpu_total > free
        with pytest.raises(placement.PlanError, match="does not fit.*weights"):
            placement.check_fits(tight)
        assert placement.make_plan(g, c, 256, "auto", device_free=1000).gpu_layers == 0


def test_parse_gpu_layers_and_memory():
    assert placement.parse_gpu_layers("all") == "all" and placement.parse_gpu_layers("7") == 7
    assert placement.parse_bytes("6GiB") == 6 << 30 and placement.parse_bytes("512MiB") == 512 << 20
    assert placement.parse_bytes("2GB") == 2 * 10**9
    for bad in ("-1", "lots"):
        with pytest.raises(ValueError):
            placement.parse_gpu_layers(bad)
    with pytest.raises(ValueError):
        placement.parse_bytes("six gigs")


def test_inspect_plan_prints_the_arithmetic(q4km):
    path = q4km("gemma3")
    r = CliRunner().invoke(cli, ["inspect", str(path), "--plan", "-c", "256", "--gpu-memory", "8GiB"])
    assert r.exit_code == 0, r.output
    assert "sliding-window layers x min(256," in r.output and "fits" in r.output
    assert "blk.0" in r.output and "output" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(path), "--plan", "-ngl", "all", "--gpu-memory", "1MiB"])
    assert r.exit_code == 1 and "NO" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(path), "--plan", "-c", "256", "--gpu-memory", "8GiB",
                                 "-ctk", "f16", "-ctv", "f16"])
    assert r.exit_code == 0 and "KV cache (float16)" in r.output and "x 2 B" in r.output


def test_run_with_gpu_layers_that_do_not_fit_fails_before_loading(q4km):
    r = CliRunner().invoke(cli, ["run", str(q4km("llama3")), "-p", "hi", "-ngl", "all",
                                 "--gpu-memory", "1MiB"])
    if not CUDA:   # no device: says so, in one line
        assert r.exit_code == 1 and r.output.startswith("error:") and "CUDA" in r.output
    else:
        assert r.exit_code == 1 and "does not fit" in r.output


def test_gpu_layers_without_torch_says_how_to_install(q4km, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "triton", None)
    r = CliRunner().invoke(cli, ["run", str(q4km("llama3")), "-p", "hi", "-ngl", "2"])
    assert r.exit_code == 1
    assert "pip install 'ggforge[gpu]'" in r.output and len(r.output.strip().splitlines()) == 1


@gpu_only
def test_decode_graph_equals_eager(q4km):
    """One token at a time through the captured CUDA graph follows one batched pass.
    (Random tiny models: a last-bit difference can flip an activation rounding, so the
    bound is the one the offload test uses.)"""
    path = q4km("llama3")
    with load(path, gpu_layers="all") as m:
        ids = m.tokenize(PROMPT)
        eager = m.eval(ids)                                  # one batched pass, no graph
        cache = m.model.new_cache(64)
        steps = np.concatenate([m.model.forward(np.asarray([t]), cache) for t in ids])
    assert np.linalg.norm(steps - eager) / np.linalg.norm(eager) < 2e-2
