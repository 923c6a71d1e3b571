"""Tests for runtime/kernels: matmul and get_rows on every weight type ggforge writes.

Oracle: llama.cpp's own CPU kernels, from the bundled libggml-cpu of llama-cpp-python
0.3.36, through ctypes. For weight type W, ``type_traits_cpu[W].vec_dot_type`` says what
the activations become, ``type_traits_cpu[vec_dot_type].from_float`` quantizes them (the
x86 code that llama.cpp runs on this machine) and ``type_traits_cpu[W].vec_dot`` is the
dot product llama.cpp computes for one weight row and one activation row. Our matmul
must give the same numbers to float32 rounding (1e-5 of the sum of the absolute terms),
our activation quantization the same bytes, and the result must stay close (1e-2) to the
float64 product of the dequantized weights and the unquantized activations.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from ggml_oracle import ggml_or_skip
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from ggforge.formats.errors import UnsupportedModelError
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.gguf_writer import GGUFWriter
from ggforge.formats.quants import dequantize, quantize
from ggforge.runtime import kernels
from ggforge.runtime.kernels import QWeight, act_quant, get_rows, matmul, set_threads

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"]
SUPER = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]
FLOATS = ["F32", "F16", "BF16"]
TYPES = FLOATS + LEGACY + SUPER
VEC_DOT = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
           **{t: "Q8_0" for t in ("Q8_0", "Q4_0", "Q5_0", "IQ4_NL")}, **{t: "Q8_K" for t in SUPER}}
N_OUT = 37  # not a multiple of 4: the prefill kernels' tail rows


# ---------------------------------------------------------------- the oracle

_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                            ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _CpuTraits(ctypes.Structure):
    """``struct ggml_type_traits_cpu`` of ggml-cpu.h."""

    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


class GgmlCpu:
    """llama.cpp's CPU dot products and activation quantizers (libggml-cpu.so)."""

    def __init__(self, ggml):
        self.ggml = ggml
        self.lib = ctypes.CDLL(str(ggml.lib_dir / "libggml-cpu.so"))
        self.lib.ggml_cpu_init.restype = None
        self.lib.ggml_cpu_init()  # fp16 tables
        self.lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        self.lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CpuTraits)

    def traits(self, qtype: str) -> _CpuTraits:
        return self.lib.ggml_get_type_traits_cpu(int(Q[qtype])).contents

    def from_float(self, qtype: str, x: np.ndarray) -> np.ndarray:
        """Rows of x (T, n) -> (T, row_bytes) in ``qtype``, by llama.cpp's from_float."""
        x = np.ascontiguousarray(x, np.float32)
        rb = self.ggml.row_size(qtype, x.shape[1])
        out = np.zeros((x.shape[0], rb), np.uint8)
        fn = _FROM_FLOAT(self.traits(qtype).from_float)
        for t in range(x.shape[0]):
            fn(x[t].ctypes.data, out[t].ctypes.data, x.shape[1])
        return out

    def matmul(self, wtype: str, raw: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, str]:
        """llama.cpp's x @ W.T, one vec_dot per (token, row) -> (T, n_out), vec_dot_type."""
        tr = self.traits(wtype)
        vtype = Q(tr.vec_dot_type).name
        xq = self.from_float(vtype, x)
        raw = np.ascontiguousarray(raw)
        fn = _VEC_DOT(tr.vec_dot)
        out = np.zeros((x.shape[0], raw.shape[0]), np.float32)
        s = ctypes.c_float()
        for t in range(x.shape[0]):
            for r in range(raw.shape[0]):
                fn(x.shape[1], ctypes.addressof(s), 0, raw[r].ctypes.data, 0, xq[t].ctypes.data,
                   0, 1)
                out[t, r] = s.value
        return out, vtype


@pytest.fixture(scope="module")
def cpu():
    return GgmlCpu(ggml_or_skip())


_WEIGHTS: dict = {}


def weight(qtype: str, n_in: int, n_out: int = N_OUT):
    """(QWeight, float64 dequantized weights) of random normal weights, built once."""
    key = (qtype, n_in, n_out)
    if key not in _WEIGHTS:
        w = np.random.default_rng(n_in + n_out).standard_normal((n_out, n_in)).astype(np.float32)
        raw = quantize(w, qtype, name=f"test.{qtype}")
        qw = QWeight(raw, int(Q[qtype]), n_in, n_out)
        _WEIGHTS[key] = qw, dequantize(raw, qtype, w.shape).astype(np.float64)
    return _WEIGHTS[key]


def activations(n_tok: int, n_in: int, seed: int = 0, outlier: float = 20.0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n_tok, n_in)).astype(np.float32)
    x[:, 3] *= np.float32(outlier)  # an outlier column, as real activations have
    return x


def _ggml_activations(cpu, vtype: str, x: np.ndarray) -> np.ndarray:
    """x as llama.cpp feeds it to the dot products (quantized by its from_float), float64."""
    raw = cpu.from_float(vtype, x)
    if vtype == "F32":
        return raw.view(np.float32).astype(np.float64)
    if vtype == "F16":
        return raw.view(np.float16).astype(np.float64)
    if vtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    qs, d, _ = _split_q8(vtype, raw)
    qk = qs.shape[1] // d.shape[1]
    return (qs.reshape(len(x), -1, qk) * d[..., None].astype(np.float64)).reshape(x.shape)


def _abs_terms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_k |x[t, k]| |w[r, k]|: the scale of the float32 rounding of a dot product."""
    return np.abs(x.astype(np.float64)) @ np.abs(w).T


# ---------------------------------------------------------------- matmul vs llama.cpp

@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n_tok", [1, 3, 7, 64])  # decode kernels up to 6 tokens
def test_matmul_matches_llama_cpp(cpu, qtype, n_tok):
    n_in = 512
    qw, wd = weight(qtype, n_in)
    x = activations(n_tok, n_in, seed=n_tok)
    y = matmul(x, qw)
    assert y.shape == (n_tok, N_OUT) and y.dtype == np.float32
    ref, vtype = cpu.matmul(qtype, qw.raw, x)
    assert vtype == VEC_DOT[qtype]
    tol = 1e-5 * _abs_terms(x, wd) + 1e-30
    bad = np.abs(y.astype(np.float64) - ref) > tol
    assert not bad.any(), f"{bad.sum()} of {bad.size}: ours {y[bad][:4]} llama.cpp {ref[bad][:4]}"
    # The same in exact arithmetic: float64 products of the blocks llama.cpp quantized.
    exact_q = _ggml_activations(cpu, vtype, x) @ wd.T
    if vtype == "Q8_1":  # ggml adds m_w * s_x, where s_x = fp16(d_x * sum(q_x)) is rounded
        qs, d, s = _split_q8(vtype, cpu.from_float(vtype, x))
        m_w = qw.raw.reshape(N_OUT, -1, qw.raw.shape[1] // (n_in // 32))[:, :, 2:4]
        m_w = m_w.copy().view(np.float16)[..., 0].astype(np.float64)            # (n_out, nb)
        sum_q = qs.reshape(n_tok, -1, 32).astype(np.float64).sum(-1)             # (T, nb)
        exact_q += (s - d.astype(np.float64) * sum_q) @ m_w.T
    assert (np.abs(y - exact_q) <= tol).all()
    # Close to the product without activation quantization (an outlier makes its block's
    # activation steps coarse, in llama.cpp too: this check runs without one).
    x = activations(n_tok, n_in, seed=n_tok, outlier=1.0)
    exact = x.astype(np.float64) @ wd.T
    assert np.linalg.norm(matmul(x, qw) - exact) <= 1e-2 * np.linalg.norm(exact)


@pytest.mark.parametrize("qtype", LEGACY)
def test_matmul_short_rows(cpu, qtype):
    """Rows of 5 blocks of 32 (legacy types need not fill 256), decode and prefill."""
    qw, wd = weight(qtype, 160, 5)
    for n_tok in (1, 9):
        x = activations(n_tok, 160, seed=3)
        ref, _ = cpu.matmul(qtype, qw.raw, x)
        tol = 1e-5 * _abs_terms(x, wd)
        assert (np.abs(matmul(x, qw) - ref) <= tol).all()


def test_token_tiles(monkeypatch):
    """Long prompts run in tiles of tokens (the last tile here takes the decode kernels)."""
    qw, wd = weight("Q4_K", 512)
    x = activations(40, 512, seed=8)
    whole = matmul(x, qw)
    monkeypatch.setattr(kernels.dispatch, "TOKEN_TILE", 16)
    tiled = matmul(x, qw)
    assert (np.abs(tiled - whole) <= 1e-5 * _abs_terms(x, wd)).all()
    np.testing.assert_array_equal(tiled[:32], whole[:32])  # same kernel, same sums per token


def test_one_token_as_vector(cpu):
    qw, _ = weight("Q4_K", 512)
    x = activations(1, 512)
    np.testing.assert_array_equal(matmul(x[0], qw), matmul(x, qw)[0])


def test_threads_do_not_change_results():
    qw, _ = weight("Q6_K", 512, 203)
    x = activations(5, 512)
    try:
        set_threads(1)
        one = [matmul(x[:1], qw), matmul(x, qw)]
        set_threads(3)
        kernels.threads.MIN_BYTES_PER_THREAD, old = 1, kernels.threads.MIN_BYTES_PER_THREAD
        try:
            three = [matmul(x[:1], qw), matmul(x, qw)]
        finally:
            kernels.threads.MIN_BYTES_PER_THREAD = old
    finally:
        set_threads()
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b)


def test_empty_and_bad_shapes():
    qw, _ = weight("Q8_0", 512)
    assert matmul(np.zeros((0, 512), np.float32), qw).shape == (0, N_OUT)
    with pytest.raises(ValueError, match="512"):
        matmul(np.zeros((2, 256), np.float32), qw)


# ---------------------------------------------------------------- activation quantization

def _split_q8(vtype: str, raw: np.ndarray):
    """ggml's Q8_0 / Q8_1 / Q8_K rows (T, row_bytes) -> (qs, d, s-or-bsums)."""
    t = raw.shape[0]
    if vtype == "Q8_K":
        b = raw.reshape(t, -1, 292)
        qs = b[:, :, 4:260].view(np.int8).reshape(t, -1)
        d = b[:, :, :4].copy().view(np.float32)[..., 0]
        return qs, d, b[:, :, 260:].copy().view(np.int16).reshape(t, -1).astype(np.int32)
    head = 4 if vtype == "Q8_1" else 2
    b = raw.reshape(t, -1, head + 32)
    d = b[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)
    s = b[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if head == 4 else None
    return b[:, :, head:].view(np.int8).reshape(t, -1), d, s


@pytest.mark.parametrize("vtype", ["Q8_0", "Q8_1", "Q8_K"])
def test_activation_quantization_is_llama_cpps(cpu, vtype):
    x = activations(6, 1024, seed=11)
    x[1] = 0.0                                    # an all-zero row
    x[2, :32] = 0.5 + np.arange(32, dtype=np.float32)  # halves: ties round to even
    x[2, 0] = np.float32(127.0)                   # (amax 127: the multiplier is exactly 1)
    x[3] *= np.float32(1e-6)
    x[4, :256] = np.linspace(-3, 3, 256, dtype=np.float32)
    qs, d, extra = _split_q8(vtype, cpu.from_float(vtype, x))
    ours = act_quant.quantize(x, vtype.lower().replace("q8_k", "q8_K"))
    np.testing.assert_array_equal(ours[0], qs)
    np.testing.assert_array_equal(ours[1], d)
    if extra is not None:
        np.testing.assert_array_equal(ours[2], extra)


def test_float_activation_rounding_is_llama_cpps(cpu):
    x = activations(2, 512, seed=5).reshape(-1)
    x[:4] = [65519.0, 65520.0, 3e-8, -1e-7]
    f16 = cpu.from_float("F16", x.reshape(1, -1)).view(np.float16).astype(np.float32)
    bf16 = cpu.from_float("BF16", x.reshape(1, -1)).view(np.uint16).astype(np.uint32) << 16
    np.testing.assert_array_equal(act_quant.round_fp16(x), f16[0])
    np.testing.assert_array_equal(act_quant.round_bf16(x).view(np.uint32), bf16[0])


# ---------------------------------------------------------------- get_rows, QWeight

@pytest.mark.parametrize("qtype", TYPES)
def test_get_rows_equals_dequantize(cpu, qtype):
    qw, wd = weight(qtype, 512)
    ids = np.array([0, 36, 5, 5, 17])
    rows = get_rows(qw, ids)
    assert rows.shape == (5, 512) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows, wd[ids].astype(np.float32))
    ggml = cpu.ggml.dequantize(qtype, qw.raw[ids], (5, 512))
    np.testing.assert_array_equal(rows, ggml)
    with pytest.raises(IndexError):
        get_rows(qw, [N_OUT])


def test_qweight_from_gguf_is_a_view(tmp_path):
    w = activations(40, 256, seed=2)
    raw = quantize(w, "Q4_K")
    path = tmp_path / "w.gguf"
    with open(path, "wb") as f:
        gw = GGUFWriter(f)
        gw.add_string("general.architecture", "test")
        gw.add_tensor_info("blk.0.ffn_up.weight", w.shape, Q.Q4_K)
        gw.add_tensor_info("norm.weight", (7,), Q.F32)
        gw.write_header()
        gw.write_tensor("blk.0.ffn_up.weight", raw)
        gw.write_tensor("norm.weight", np.ones(7, np.float32))
        gw.finish()
    with GGUFFile.open(path) as g:
        qw = QWeight.from_gguf(g, "blk.0.ffn_up.weight")
        assert (qw.n_in, qw.n_out, qw.ggml_type) == (256, 40, int(Q.Q4_K))
        assert qw.raw.shape == (40, 256 // 256 * GGML_QUANT_SIZES[Q.Q4_K][1])
        assert not qw.raw.flags.writeable and not qw.raw.flags.owndata  # the mapping itself
        np.testing.assert_array_equal(qw.raw, raw)
        x = activations(3, 256)
        np.testing.assert_array_equal(matmul(x, qw), matmul(x, QWeight(raw, int(Q.Q4_K), 256, 40)))
        with pytest.raises(Exception, match="missing"):
            QWeight.from_gguf(g, "nope.weight")


def test_unsupported_type_is_named():
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        QWeight(np.zeros((1, 66), np.uint8), int(Q.IQ2_XXS), 256, 1)
    assert kernels.vec_dot_type(Q.Q5_K) == "q8_K"


# ---------------------------------------------------------------- decode on all cores (pool.py)

def _row_args(qw, x):
    """(packed, xq, xd, auxf, auxi, out) for the row-group kernel of qw's type."""
    vtype = kernels.vec_dot_type(qw.ggml_type)
    xq, xd, *extra = act_quant.quantize(x, vtype)
    auxf = extra[0] if vtype == "q8_1" else np.zeros((1, 1), np.float32)
    auxi = extra[0] if vtype == "q8_K" else np.zeros((1, 1), np.int32)
    return qw.packed(), xq, xd, auxf, auxi, np.full((len(x), qw.n_out), np.nan, np.float32)


@pytest.mark.parametrize("qtype", LEGACY + SUPER)
@pytest.mark.parametrize("n_tok", [1, 4, 11])
def test_row_kernels_on_the_pool_match_llama_cpp_and_one_thread(cpu, qtype, n_tok):
    """Products big enough for the worker pool: llama.cpp's numbers, and bit for bit the
    one-thread kernel's, one token or TB at a time (301 rows: groups of 8 and chunks of
    32 with a tail)."""
    from ggforge.runtime.kernels import dispatch, pool
    qw, wd = weight(qtype, 512, 301)
    assert qw.nbytes * n_tok >= pool.MIN_BYTES
    x = activations(n_tok, 512, seed=7)
    try:
        set_threads(1)
        one = matmul(x, qw)
        set_threads(2)
        many = [matmul(x, qw) for _ in range(10)]
    finally:
        set_threads()
    kernel = dispatch.route(qw.ggml_type).rows
    workers = pool.get_pool(2)
    for _ in range(10):
        args = _row_args(qw, x)
        assert workers.run(kernel, args)
        many.append(args[-1])
    for tokens in range(n_tok):  # one token at a time: the decode path
        args = _row_args(qw, x[tokens:tokens + 1])
        kernel(*args, 0, 301)
        np.testing.assert_array_equal(args[-1][0], one[tokens])
    for y in many:
        np.testing.assert_array_equal(y, one)
    ref, _ = cpu.matmul(qtype, qw.raw, x)
    assert (np.abs(one.astype(np.float64) - ref) <= 1e-5 * _abs_terms(x, wd) + 1e-30).all()


def _publish(pool_mod, ctrl, job, slot, args, scratch, flags):
    """A job descriptor as pool._run writes it (for driving a worker by hand)."""
    packed, xq, xd, auxf, auxi, out = args
    d = [slot, out.shape[1], xq.shape[0], packed.ctypes.data, packed.shape[1], xq.ctypes.data,
         xq.shape[1], xd.ctypes.data, xd.shape[1], auxf.ctypes.data, auxf.shape[1],
         auxi.ctypes.data, auxi.shape[1], scratch.ctypes.data, flags.ctypes.data]
    ctrl[pool_mod.DESC:pool_mod.DESC + len(d)] = d
    ctrl[pool_mod.SEQ] = job
    ctrl[pool_mod.WORD] = job << 32


def _table(pool_mod, kernel):
    """A kernel table with ``kernel`` in slot 0."""
    table = np.zeros(pool_mod.SLOTS, np.int64)
    table[0] = kernel.native_address()
    return table


@pytest.mark.parametrize("qtype", ["Q5_0", "Q6_K"])
def test_pool_worker_computes_claimed_chunks(qtype):
    """A worker alone takes every chunk of a published job into the scratch buffer and
    flags each with the job id; its numbers are the one-thread kernel's."""
    from ggforge.runtime.kernels import dispatch, pool
    qw, _ = weight(qtype, 512, 301)
    kernel = dispatch.route(qw.ggml_type).rows
    args = _row_args(qw, activations(3, 512, seed=4))
    ctrl = np.zeros(pool.BUSY + 8, np.int64)
    scratch = np.full((3, 301), np.nan, np.float32)
    flags = np.zeros(10, np.int64)
    table = _table(pool, kernel)
    _publish(pool, ctrl, 7, 0, args, scratch, flags)
    assert pool._worker(ctrl, 0, 1000, table) == 0      # no work left: back to sleep
    assert (flags == 7).all() and ctrl[pool.BUSY] == 0
    ctrl[pool.WORD] = 8 << 32                              # a job whose descriptor is not out yet
    assert pool._worker(ctrl, 0, 1000, table) == 0 and (flags == 7).all()
    kernel(*args, 0, 301)
    np.testing.assert_array_equal(scratch, args[-1])
    ctrl[pool.EXIT] = 1
    assert pool._worker(ctrl, 0, 1000, table) == 1


def test_pool_caller_computes_a_late_workers_chunk():
    """A worker that claims a chunk and never finishes it (its thread descheduled) does
    not hold the caller up: the caller computes that chunk itself, the result is whole."""
    import threading

    import numba

    from ggforge.runtime.kernels import _atomics, dispatch, pool

    @numba.njit(nogil=True)
    def claim_one_and_stall(ctrl, job):
        while True:
            w = _atomics.load(ctrl, pool.WORD)
            if w >> 32 == job and w & 0xFFFFFFFF < 10 and _atomics.cas(ctrl, pool.WORD, w, w + 1):
                return w & 0xFFFFFFFF

    qw, _ = weight("Q8_0", 512, 301)
    kernel = dispatch.route(qw.ggml_type).rows
    args = _row_args(qw, activations(1, 512, seed=5))
    ctrl = np.zeros(pool.BUSY + 8, np.int64)
    scratch = np.zeros(301, np.float32)
    flags = np.zeros(10, np.int64)
    claim_one_and_stall(ctrl.copy(), 0)                # compiled before the race starts
    got = []
    th = threading.Thread(target=lambda: got.append(claim_one_and_stall(ctrl, 1)))
    th.start()
    while True:  # until the stalling thread has its chunk, the caller takes them all
        ctrl[:] = 0
        job, late = pool._run(ctrl, _table(pool, kernel), 0, *args, scratch, flags, 1000)
        if got or not th.is_alive():
            break
    th.join()
    assert job == 1 and late == 1 and got
    one = _row_args(qw, activations(1, 512, seed=5))
    kernel(*one, 0, 301)
    np.testing.assert_array_equal(args[-1], one[-1])


def test_pack_rows_interleaves_groups_of_eight_block_by_block():
    from ggforge.runtime.kernels._rows import pack_rows
    raw = np.arange(11 * 6, dtype=np.uint8).reshape(11, 6)          # 11 rows of 3 blocks of 2
    packed = pack_rows(raw, 2)
    assert packed.shape == (2, 8 * 6)
    group = packed[1].reshape(3, 8, 2)                               # (block, row, byte)
    np.testing.assert_array_equal(group[:, :3], raw[8:11].reshape(3, 3, 2).transpose(1, 0, 2))
    np.testing.assert_array_equal(group[:, 3:], np.repeat(group[:, 2:3], 5, axis=1))  # padding


def test_pack_rows_in_chunks_is_the_same_and_reports_every_row(monkeypatch):
    from ggforge.runtime.kernels import _rows
    raw = np.random.default_rng(3).integers(0, 256, (43, 12), dtype=np.uint8)   # 6 groups
    whole = _rows.pack_rows(raw, 4)
    monkeypatch.setattr(_rows, "PACK_CHUNK_BYTES", 2 * 8 * 12)                  # 2 groups a chunk
    seen = []
    np.testing.assert_array_equal(_rows.pack_rows(raw, 4, lambda r0, r1: seen.append((r0, r1))),
                                  whole)
    assert seen == [(0, 16), (16, 32), (32, 43)]


@pytest.mark.parametrize("qtype", LEGACY + SUPER)
def test_get_rows_after_packing_reads_the_copy_and_gives_the_same_rows(qtype):
    w = np.random.default_rng(9).standard_normal((N_OUT, 512)).astype(np.float32)
    raw = quantize(w, qtype, name=f"test.{qtype}")
    qw = QWeight(raw, int(Q[qtype]), 512, N_OUT)
    ids = np.array([0, 36, 5, 5, 17, 32, 7, 8])          # 32..36: the padded last group
    before = get_rows(qw, ids)
    assert qw.packed() is not None
    raw.fill(0)   # the copy, not the raw bytes, is read now
    np.testing.assert_array_equal(get_rows(qw, ids), before)


def test_pool_chooser_keeps_the_faster_way():
    from ggforge.runtime.kernels.pool import Chooser
    c = Chooser(round_jobs=4)
    modes = []

    def run(speed, rounds):  # speed: bytes per second with (True) and without the workers
        for _ in range(rounds * c.round_jobs):
            modes.append(c.use_pool)
            c.record(1000, 1000 / speed[c.use_pool])
        return np.mean(modes[-(rounds // 2) * c.round_jobs:])

    assert 0.95 < run({True: 2.0, False: 1.0}, 400) < 1      # the workers, seldom not
    assert c.interval == c.MAX_INTERVAL and c.rate[True] == 0.5 * c.rate[False]
    assert run({True: 0.5, False: 1.0}, 400) < 0.05           # a busy machine: alone
    assert run({True: 2.0, False: 1.0}, 400) > 0.95           # and back
    c = Chooser(round_jobs=4)
    for i in range(12):  # one slow start (compilation) does not decide
        c.record(1000, 100.0 if i == 0 else 1000 / (2.0 if c.use_pool else 1.0))
    assert c.preferred and c.use_pool
