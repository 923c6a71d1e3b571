"""llama.cpp's mixes, end to end: our one-step file equals llama-quantize's, byte for byte.

For each tiny model: `convert(SRC, mix)` from safetensors, against llama.cpp's own
`llama_model_quantize` of our F32 file (same tensors, same types, identical bytes), and
`convert(F32.gguf, mix)` (a GGUF source) against the same. Then llama.cpp loads every mix
and its logits stay close to the F32 file's.
"""
from __future__ import annotations

import ctypes
import shutil

import gguf
import numpy as np
import pytest

from require import require

import llama_oracle
from conftest import LOGIT_ERRORS
from ggforge.convert.mixes import FILE_TYPES, MixOptions
from ggforge.convert.pipeline import convert
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.gguf_writer import GGUFWriter

llama_cpp = require("llama_cpp")

MIXES = [n for n, ft in FILE_TYPES.items() if ft.quantized]
NAMED = ["Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"]
ALL_ARCHS = ["llama2", "llama3", "smollm", "mistral", "qwen2", "qwen3", "gemma3", "gemma2", "phi3"]
# every mix on llama2 and llama-odd, and on phi3 (its fused attn_qkv has llama-quantize's own rules)
CASES = ([(a, m) for a in ("llama2", "llama-odd", "phi3") for m in MIXES]
         + [(a, m) for a in ALL_ARCHS if a not in ("llama2", "phi3") for m in NAMED])


def llama_quantize(src, dst, ftype: str, *, imatrix: dict[str, np.ndarray] | None = None,
                   **params) -> None:
    """llama.cpp's llama_model_quantize (llama-quantize's library call), 2 threads."""
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = int(FILE_TYPES[ftype].ftype)
    p.nthread = 2
    for k, v in params.items():
        setattr(p, k, v)
    keep = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(v, dtype=np.float32)
            keep += [arr, name.encode()]
            entries[i].name = keep[-1]
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        p.imatrix = entries
        keep.append(entries)
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p) == 0


def assert_same_tensors(ours, theirs) -> None:
    with GGUFFile.open(ours) as a, GGUFFile.open(theirs) as b:
        assert list(a.tensors) == list(b.tensors)  # same names, same (llama.cpp's) order
        for name, ta in a.tensors.items():
            tb = b.tensors[name]
            assert (ta.type_name, ta.shape) == (tb.type_name, tb.shape), name
            assert np.array_equal(a.raw(name), b.raw(name)), f"{name} ({ta.type_name}) differs"
        assert a.metadata["general.file_type"] == b.metadata["general.file_type"]


@pytest.fixture(scope="module")
def f32_file(tiny_model, tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            folder = tiny_model(arch)
            cache[arch] = (folder, convert(folder, "f32", tmp_path_factory.mktemp(arch) / "f32.gguf").output)
        return cache[arch]
    return get


@pytest.mark.parametrize("arch,mix", CASES)
def test_one_step_mix_equals_llama_quantize(arch, mix, f32_file, tmp_path):
    folder, f32 = f32_file(arch)
    ours = convert(folder, mix, tmp_path / "ours.gguf").output
    theirs = tmp_path / "theirs.gguf"
    llama_quantize(f32, theirs, mix)
    assert_same_tensors(ours, theirs)
    from_gguf = convert(f32, mix, tmp_path / "from-gguf.gguf").output  # GGUF source path
    assert_same_tensors(from_gguf, theirs)
    if arch != "llama-odd":
        ids = list(range(1, 24))
        err = float(np.linalg.norm(llama_oracle.logits(ours, ids) - (ref := llama_oracle.logits(f32, ids)))
                    / np.linalg.norm(ref))
        LOGIT_ERRORS[(arch, mix + "*")] = err  # * = against the F32 GGUF, in the table
        assert err < 0.8


def test_fallbacks_for_rows_not_divisible_by_256(f32_file, tmp_path):
    folder, _ = f32_file("llama-odd")
    out = convert(folder, "q4_k_m", tmp_path / "o.gguf").output
    with GGUFFile.open(out) as g:
        types = {n: t.type_name for n, t in g.tensors.items()}
    assert types["blk.0.attn_q.weight"] == "Q5_0"     # Q4_K -> Q5_0 (96 columns)
    assert types["blk.0.ffn_down.weight"] == "F16"    # 200 columns: no 32-block type fits
    assert types["output.weight"] == "Q8_0"           # output with odd rows -> Q8_0


@pytest.mark.parametrize("opts,params", [
    (MixOptions(pure=True), dict(pure=True)),
    (MixOptions(output_type="Q8_0", token_embedding_type="Q4_K"),
     dict(output_tensor_type=int(gguf.GGMLQuantizationType.Q8_0),
          token_embedding_type=int(gguf.GGMLQuantizationType.Q4_K))),
])
def test_llama_quantize_options(opts, params, f32_file, tmp_path):
    folder, f32 = f32_file("llama2")
    ours = convert(folder, "q4_k_m", tmp_path / "ours.gguf", options=opts).output
    theirs = tmp_path / "theirs.gguf"
    llama_quantize(f32, theirs, "Q4_K_M", **params)
    assert_same_tensors(ours, theirs)


def test_tensor_type_override(f32_file, tmp_path):
    folder, f32 = f32_file("llama2")
    opts = MixOptions(tensor_types=[(r"attn_v", "Q8_0"), (r"ffn_(up|gate)", "Q5_K")])
    out = convert(folder, "q4_k_m", tmp_path / "o.gguf", options=opts).output
    with GGUFFile.open(out) as g:
        assert g.tensors["blk.1.attn_v.weight"].type_name == "Q8_0"
        assert g.tensors["blk.0.ffn_up.weight"].type_name == "Q5_K"
        assert g.tensors["blk.0.attn_q.weight"].type_name == "Q4_K"


@pytest.mark.parametrize("arch,mix", [("llama3", "Q4_K_M"), ("llama3", "IQ4_XS"), ("llama3", "Q3_K_S"),
                                      ("llama3", "Q4_0"), ("llama3", "Q5_1"), ("llama-odd", "Q4_K_M")])
def test_imatrix_mix_equals_llama_quantize(arch, mix, f32_file, tmp_path):
    folder, f32 = f32_file(arch)
    rng = np.random.default_rng(1)
    with GGUFFile.open(f32) as g:
        imatrix = {n: rng.uniform(0.01, 3.0, t.shape[-1]).astype(np.float32)
                   for n, t in g.tensors.items() if len(t.shape) == 2}
    ours = convert(folder, mix, tmp_path / "ours.gguf", imatrix=imatrix,
                   options=MixOptions(has_imatrix=True)).output
    theirs = tmp_path / "theirs.gguf"
    llama_quantize(f32, theirs, mix, imatrix=imatrix)
    assert_same_tensors(ours, theirs)


def test_imatrix_files_gguf_and_legacy(tmp_path):
    from ggforge.formats.imatrix import load_imatrix

    sums = np.arange(1, 9, dtype=np.float32)
    path = tmp_path / "im.gguf"
    with open(path, "wb") as f:
        w = GGUFWriter(f)
        w.add_array("imatrix.datasets", ["wiki"], gguf.GGUFValueType.STRING)
        w.add_uint32("imatrix.chunk_count", 4)
        w.add_uint32("imatrix.chunk_size", 512)
        w.add_tensor_info("blk.0.ffn_up.weight.in_sum2", (8,), gguf.GGMLQuantizationType.F32)
        w.add_tensor_info("blk.0.ffn_up.weight.counts", (1,), gguf.GGMLQuantizationType.F32)
        w.write_header()
        w.write_tensor("blk.0.ffn_up.weight.in_sum2", sums)
        w.write_tensor("blk.0.ffn_up.weight.counts", np.array([4.0], np.float32))
        w.finish()
    assert np.array_equal(load_imatrix(path)["blk.0.ffn_up.weight"], sums / 4)
    legacy = tmp_path / "im.dat"
    name = b"blk.0.ffn_up.weight"
    legacy.write_bytes(np.array([1, len(name)], "<i4").tobytes() + name
                       + np.array([2, 8], "<i4").tobytes() + sums.tobytes())
    assert np.array_equal(load_imatrix(legacy)["blk.0.ffn_up.weight"], sums / 2)


def test_requantize_needs_permission(f32_file, tmp_path):
    from ggforge.formats.errors import QuantizationError

    folder, _ = f32_file("llama2")
    q8 = convert(folder, "q8_0", tmp_path / "q8.gguf").output
    with pytest.raises(QuantizationError, match="allow-requantize"):
        convert(q8, "q4_k_m", tmp_path / "q4.gguf")
    out = convert(q8, "q4_k_m", tmp_path / "q4.gguf", options=MixOptions(allow_requantize=True)).output
    theirs = tmp_path / "theirs.gguf"
    llama_quantize(q8, theirs, "Q4_K_M", allow_requantize=True)
    assert_same_tensors(out, theirs)


def _write_imatrix_gguf(path, imatrix: dict[str, np.ndarray], counts: float) -> None:
    """imatrix (name -> mean squared activation) as llama-imatrix's GGUF: sums and counts."""
    with open(path, "wb") as f:
        w = GGUFWriter(f)
        w.add_array("imatrix.datasets", ["test"], gguf.GGUFValueType.STRING)
        w.add_uint32("imatrix.chunk_count", int(counts))
        w.add_uint32("imatrix.chunk_size", 512)
        for n, v in imatrix.items():
            w.add_tensor_info(n + ".in_sum2", v.shape, gguf.GGMLQuantizationType.F32)
            w.add_tensor_info(n + ".counts", (1,), gguf.GGMLQuantizationType.F32)
        w.write_header()
        for n, v in imatrix.items():
            w.write_tensor(n + ".in_sum2", v * np.float32(counts))
            w.write_tensor(n + ".counts", np.array([counts], np.float32))
        w.finish()


def test_imatrix_through_the_command_line_equals_llama_quantize(f32_file, tmp_path):
    """`quantize FOLDER q4 --imatrix FILE` (the short name, the default output name) gives
    llama_model_quantize's bytes with the same importance matrix, and not those without."""
    from click.testing import CliRunner

    from ggforge.tools.cli import cli

    folder, f32 = f32_file("llama3")
    src = tmp_path / "Tiny3"
    shutil.copytree(folder, src)
    rng = np.random.default_rng(2)
    with GGUFFile.open(f32) as g:
        imatrix = {n: rng.uniform(0.01, 3.0, t.shape[-1]).astype(np.float32)
                   for n, t in g.tensors.items() if len(t.shape) == 2}
    _write_imatrix_gguf(tmp_path / "im.gguf", imatrix, counts=4.0)
    r = CliRunner().invoke(cli, ["quantize", str(src), "q4", "--imatrix", str(tmp_path / "im.gguf"),
                                 "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    ours = src / "Tiny3-Q4_K_M.gguf"
    theirs = tmp_path / "theirs.gguf"
    llama_quantize(f32, theirs, "Q4_K_M", imatrix=imatrix)
    assert_same_tensors(ours, theirs)
    plain = tmp_path / "plain.gguf"
    llama_quantize(f32, plain, "Q4_K_M")
    with pytest.raises(AssertionError):
        assert_same_tensors(ours, plain)
