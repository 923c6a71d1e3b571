"""Tests for formats/safetensors.py and formats/checkpoint.py.

Oracles: the `safetensors` library writes the files and loads them back for comparison
(torch for BF16); every rejection is a hand-built file whose bad bytes we chose.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as torch_save_file

from ggforge.formats.checkpoint import Checkpoint
from ggforge.formats.errors import FormatError, UnsupportedModelError
from ggforge.formats.safetensors import SafetensorsFile, TensorEntry

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------
# helpers


def write_raw(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    """8-byte little-endian header length + header bytes + data, exactly as given."""
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def rejects(path: Path, *fragments: str) -> str:
    """Opening `path` raises FormatError naming the file and each fragment; returns the message."""
    with pytest.raises(FormatError) as info:
        SafetensorsFile.open(path)
    msg = str(info.value)
    assert path.name in msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def header_order(path: Path) -> list[str]:
    """Tensor names in the order the file's own JSON header lists them."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]


def write_sharded(folder: Path, shards: list[dict[str, np.ndarray]], index: bool = True) -> Path:
    """Write shards as transformers names them, plus its index json; returns the index path."""
    folder.mkdir(exist_ok=True)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.nbytes
    index_path = folder / "model.safetensors.index.json"
    if index:
        index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index_path


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------
# round trips against the safetensors library


MIXED = {
    "f32": f32(5, 7),
    "f16": f32(3, 4, 2).astype(np.float16),
    "f64": RNG.standard_normal(6),
    "scalar_f32": np.array(2.5, dtype=np.float32),
    "scalar_f16": np.array(-1.25, dtype=np.float16),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "empty_f16": np.zeros((3, 0), dtype=np.float16),
    "i8": RNG.integers(-128, 127, 9, dtype=np.int8),
    "u8": RNG.integers(0, 255, 9, dtype=np.uint8),
    "i16": RNG.integers(-999, 999, 5, dtype=np.int16),
    "i32": RNG.integers(-2**31, 2**31 - 1, (2, 3), dtype=np.int32),
    "i64": RNG.integers(-2**62, 2**62, 4, dtype=np.int64),
    "flags": np.array([True, False, True]),
}


def test_roundtrip_matches_library(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file(MIXED, path, metadata={"format": "pt", "note": "hi"})
    expected = load_file(path)
    with SafetensorsFile.open(path) as f:
        assert list(f.tensors) == header_order(path)
        assert set(f.tensors) == set(MIXED)
        assert f.metadata == {"format": "pt", "note": "hi"}
        raw = path.read_bytes()
        for name, want in expected.items():
            e = f.tensors[name]
            assert isinstance(e, TensorEntry) and e.path == str(path)
            assert e.shape == want.shape and e.n_elements == want.size and e.nbytes == want.nbytes
            assert raw[e.offset:e.offset + e.nbytes] == want.tobytes()
            got = f.read(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            assert got.flags.writeable  # a copy: views of the read-only mmap are not
        assert f.tensors["f16"].dtype == "F16" and f.tensors["flags"].dtype == "BOOL"
        assert f.tensors["scalar_f32"].shape == () and f.tensors["scalar_f32"].n_elements == 1
        assert f.tensors["empty"].nbytes == 0


def test_read_float32_matches_library(tmp_path):
    path = tmp_path / "floats.safetensors"
    save_file(MIXED, path)
    expected = load_file(path)
    with SafetensorsFile.open(path) as f:
        for name in ("f32", "f16", "f64", "scalar_f32", "scalar_f16", "empty", "empty_f16"):
            got = f.read_float32(name)
            assert got.dtype == np.float32 and got.shape == expected[name].shape
            np.testing.assert_array_equal(got, expected[name].astype(np.float32))
        for name in ("i32", "u8", "flags"):
            with pytest.raises(UnsupportedModelError) as info:
                f.read_float32(name)
            assert name in str(info.value) and f.tensors[name].dtype in str(info.value)


def test_bf16_matches_torch(tmp_path):
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"),
                            1e-40, 3.0e38, 1.17e-38])
    tensors = {
        "w": torch.randn(33, 17, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
        "special": special.to(torch.bfloat16),
        "scalar": torch.tensor(0.3).to(torch.bfloat16),
        "empty": torch.zeros(0, 8, dtype=torch.bfloat16),
    }
    path = tmp_path / "bf16.safetensors"
    torch_save_file(tensors, path)
    with SafetensorsFile.open(path) as f:
        for name, t in tensors.items():
            assert f.tensors[name].dtype == "BF16" and f.tensors[name].shape == tuple(t.shape)
            bits = f.read(name)
            assert bits.dtype == np.uint16 and bits.shape == tuple(t.shape)
            np.testing.assert_array_equal(bits, t.view(torch.int16).numpy().view(np.uint16))
            values = f.read_float32(name)
            want = t.float().numpy()
            assert values.dtype == np.float32
            np.testing.assert_array_equal(values.view(np.uint32), want.view(np.uint32))


def test_many_tensors_keep_header_order(tmp_path):
    tensors = {f"layer.{i}.w": f32(i % 5, 3) for i in range(300)}
    path = tmp_path / "many.safetensors"
    save_file(tensors, path)
    expected = load_file(path)
    with SafetensorsFile.open(path) as f:
        assert list(f.tensors) == header_order(path)
        for name in f.tensors:
            np.testing.assert_array_equal(f.read(name), expected[name])


def test_no_tensors_and_header_padding(tmp_path):
    # The library pads headers with spaces to 8 bytes; an empty file is legal.
    path = write_raw(tmp_path / "empty.safetensors", b"{}      ")
    with SafetensorsFile.open(path) as f:
        assert f.tensors == {} and f.metadata == {}


def test_read_copies_only_the_tensor(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": f32(256, 1024) for i in range(16)}, path)  # 16 x 1 MiB
    tracemalloc.start()
    try:
        with SafetensorsFile.open(path) as f:
            _, peak_open = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            x = f.read_float32("t3")
            _, peak_read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x.shape == (256, 1024)
    assert peak_open < 256 * 1024  # header only
    assert peak_read < 3 * 2**20  # about one tensor, not the 16 MiB file


def test_closed_file_refuses_reads(tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({"a": f32(2)}, path)
    f = SafetensorsFile.open(path)
    f.read("a")
    f.close()
    with pytest.raises(ValueError):
        f.read("a")
    with SafetensorsFile.open(path) as f, pytest.raises(KeyError, match="nope"):
        f.read("nope")


def test_file_truncated_after_open(tmp_path):
    # Touching a mapping past a shrunken file's end would kill the process (SIGBUS).
    path = tmp_path / "shrinks.safetensors"
    save_file({"a": f32(64), "b": f32(64)}, path)
    with SafetensorsFile.open(path) as f:
        f.read("a")
        os.truncate(path, os.path.getsize(path) - 128)
        with pytest.raises(FormatError, match="changed size"):
            f.read("b")


# ---------------------------------------------------------------------------------------
# checkpoints


SHARDS = [
    {"embed.weight": f32(10, 4), "layers.0.w": f32(4, 4).astype(np.float16)},
    {"layers.1.w": f32(4, 4), "layers.1.scalar": np.array(1.5, np.float32)},
    {"norm.weight": f32(4), "lm_head.weight": f32(10, 4), "empty": np.zeros((0,), np.float32)},
]


def check_merged(ckpt: Checkpoint, folder: Path, shards: list[dict]) -> None:
    names = [n for i in range(len(shards))
             for n in header_order(folder / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")]
    assert list(ckpt.tensors) == names  # shard order, then header order
    assert ckpt.model_dir == folder
    assert ckpt.files == [folder / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                          for i in range(len(shards))]
    assert ckpt.total_bytes == sum(v.nbytes for s in shards for v in s.values())
    for i, shard in enumerate(shards):
        expected = load_file(ckpt.files[i])
        for name in shard:
            assert ckpt.tensors[name].path == str(ckpt.files[i])
            np.testing.assert_array_equal(ckpt.read(name), expected[name])
            np.testing.assert_array_equal(ckpt.read_float32(name), expected[name].astype(np.float32))


def test_sharded_via_folder_and_index(tmp_path):
    index = write_sharded(tmp_path / "m", SHARDS)
    for source in (tmp_path / "m", index, str(index)):
        with Checkpoint.open(source) as ckpt:
            check_merged(ckpt, tmp_path / "m", SHARDS)
    with pytest.raises(ValueError):
        ckpt.read("embed.weight")  # closed with the context


def test_shards_without_index(tmp_path):
    write_sharded(tmp_path / "m", SHARDS, index=False)
    with Checkpoint.open(tmp_path / "m") as ckpt:
        check_merged(ckpt, tmp_path / "m", SHARDS)


def test_single_shard_file_reads_that_shard(tmp_path):
    write_sharded(tmp_path / "m", SHARDS)
    shard = tmp_path / "m" / "model-00002-of-00003.safetensors"
    with Checkpoint.open(shard) as ckpt:
        assert ckpt.files == [shard] and ckpt.model_dir == tmp_path / "m"
        assert list(ckpt.tensors) == header_order(shard)
        np.testing.assert_array_equal(ckpt.read("layers.1.w"), SHARDS[1]["layers.1.w"])


def test_single_file_folder(tmp_path):
    (tmp_path / "m").mkdir()
    save_file(MIXED, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text("{}")
    with Checkpoint.open(tmp_path / "m") as ckpt:
        assert ckpt.files == [tmp_path / "m" / "model.safetensors"]
        assert set(ckpt.tensors) == set(MIXED)
        np.testing.assert_array_equal(ckpt.read("i64"), MIXED["i64"])


# ---------------------------------------------------------------------------------------
# single-file rejections (RELIABILITY.md, safetensors 1-5)


def test_rejects_short_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x02\x00\x00")
    rejects(path, "8")


def test_rejects_huge_header_length(tmp_path):
    rejects(write_raw(tmp_path / "huge.safetensors", b"{}", length=100_000_001), "100000000")


def test_rejects_header_past_end(tmp_path):
    rejects(write_raw(tmp_path / "past.safetensors", b"{}", length=4096), "4096")


@pytest.mark.parametrize("header, fragment", [
    (b'{"\xff\xfe": 1}', "UTF-8"),
    (b"[1, 2]", "JSON object"),
    (b' {"a": 1}', "JSON object"),
    (b"", "JSON object"),
    (b'{"a": }', "JSON"),
    (b"{}\x00\x00\x00", "padding"),
    (b"{}\n", "padding"),
    (b"{}  x ", "padding"),
    (b'{"a": NaN}', "JSON"),
    (b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "JSON"),
])
def test_rejects_bad_header_text(tmp_path, header, fragment):
    rejects(write_raw(tmp_path / "text.safetensors", header), fragment)


def test_rejects_duplicate_names(tmp_path):
    header = (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
              b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    rejects(write_raw(tmp_path / "dup.safetensors", header, bytes(8)), "'w'", "twice")


@pytest.mark.parametrize("info, fragment", [
    (entry("F12", [1], 0, 4), "unknown dtype"),
    (entry(32, [1], 0, 4), "unknown dtype"),
    (entry("F32", [-1], 0, 4), "shape"),
    (entry("F32", [1.0], 0, 4), "shape"),
    (entry("F32", [True], 0, 4), "shape"),
    (entry("F32", "1", 0, 4), "shape"),
    (entry("F32", [2], 0, 4), "needs 8 bytes"),
    (entry("F32", [2**62, 2**62], 0, 4), "data_offsets give 4"),  # overflow in int64
    ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "pair"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}, "pair"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}, "pair"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}, "pair"),
    ({"dtype": "F32", "shape": [1]}, "data_offsets"),
    ({**entry("F32", [1], 0, 4), "extra": 1}, "extra"),
    ([1, 2], "not a JSON object"),
])
def test_rejects_bad_entry(tmp_path, info, fragment):
    path = write_raw(tmp_path / "entry.safetensors", {"w": info}, bytes(4))
    msg = rejects(path, fragment)
    assert "'w'" in msg


def test_rejects_end_before_begin(tmp_path):
    header = {"a": entry("F32", [0], 4, 0), "b": entry("F32", [1], 0, 4)}
    rejects(write_raw(tmp_path / "back.safetensors", header, bytes(4)), "'a'", "end before")


def test_rejects_gap(tmp_path):
    header = {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}
    rejects(write_raw(tmp_path / "gap.safetensors", header, bytes(12)), "unclaimed", "'b'")


def test_rejects_overlap(tmp_path):
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)}
    rejects(write_raw(tmp_path / "overlap.safetensors", header, bytes(8)), "overlaps")


def test_rejects_data_past_end(tmp_path):
    header = {"a": entry("F32", [4], 0, 16)}
    rejects(write_raw(tmp_path / "trunc.safetensors", header, bytes(12)), "'a'", "past the end")


def test_rejects_trailing_bytes(tmp_path):
    header = {"a": entry("F32", [1], 0, 4)}
    rejects(write_raw(tmp_path / "trail.safetensors", header, bytes(6)), "2 trailing bytes")


def test_rejects_bad_metadata(tmp_path):
    header = {"__metadata__": {"k": 1}, "a": entry("F32", [1], 0, 4)}
    rejects(write_raw(tmp_path / "meta.safetensors", header, bytes(4)), "__metadata__")


# ---------------------------------------------------------------------------------------
# checkpoint rejections (RELIABILITY.md, safetensors 6-7)


def ckpt_rejects(source: Path, *fragments: str) -> str:
    with pytest.raises(FormatError) as info:
        Checkpoint.open(source)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, msg
    return msg


def edit_index(index: Path, **changes) -> None:
    doc = json.loads(index.read_text())
    doc["weight_map"].update(changes)
    index.write_text(json.dumps(doc))


@pytest.mark.parametrize("text, fragment", [
    ('{"weight_map": ', "JSON"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": []}', "weight_map"),
    ('{"weight_map": {}}', "no tensors"),
    ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "twice"),
])
def test_rejects_malformed_index(tmp_path, text, fragment):
    index = write_sharded(tmp_path / "m", SHARDS)
    index.write_text(text)
    ckpt_rejects(index, index.name, fragment)
    ckpt_rejects(tmp_path / "m", index.name, fragment)


def test_rejects_missing_shard(tmp_path):
    index = write_sharded(tmp_path / "m", SHARDS)
    (tmp_path / "m" / "model-00002-of-00003.safetensors").unlink()
    ckpt_rejects(tmp_path / "m", index.name, "model-00002-of-00003.safetensors", "missing")


def test_rejects_tensor_absent_from_shards(tmp_path):
    index = write_sharded(tmp_path / "m", SHARDS)
    edit_index(index, **{"ghost.weight": "model-00001-of-00003.safetensors"})
    ckpt_rejects(index, index.name, "'ghost.weight'", "no shard holds it")


def test_rejects_tensor_in_other_shard(tmp_path):
    index = write_sharded(tmp_path / "m", SHARDS)
    edit_index(index, **{"norm.weight": "model-00001-of-00003.safetensors"})
    ckpt_rejects(index, index.name, "'norm.weight'", "model-00003-of-00003.safetensors")


def test_rejects_shard_tensor_missing_from_index(tmp_path):
    index = write_sharded(tmp_path / "m", SHARDS)
    doc = json.loads(index.read_text())
    del doc["weight_map"]["norm.weight"]
    index.write_text(json.dumps(doc))
    ckpt_rejects(index, "model-00003-of-00003.safetensors", "'norm.weight'", "not listed")


@pytest.mark.parametrize("with_index", [True, False])
def test_rejects_tensor_in_two_shards(tmp_path, with_index):
    shards = [SHARDS[0], {**SHARDS[1], "embed.weight": f32(10, 4)}]
    write_sharded(tmp_path / "m", shards, index=with_index)
    ckpt_rejects(tmp_path / "m", "'embed.weight'", "two shards",
                 "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.mark.parametrize("shard, fragment", [
    ("../outside.safetensors", "escapes"),
    ("sub/../../outside.safetensors", "escapes"),
    ("/tmp/outside.safetensors", "absolute"),
    ("C:\\outside.safetensors", "absolute"),
    (7, "not a file name"),
])
def test_rejects_shard_escaping_folder(tmp_path, shard, fragment):
    save_file({"x": f32(2)}, tmp_path / "outside.safetensors")  # reachable if we were lax
    index = write_sharded(tmp_path / "m", SHARDS)
    edit_index(index, x=shard)
    ckpt_rejects(index, index.name, fragment)


class _Bomb:
    """Unpickling this creates a directory: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_refuses_pickle(tmp_path, name):
    marker = tmp_path / "pwned"
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / name).write_bytes(pickle.dumps(_Bomb(marker)))
    (folder / "config.json").write_text("{}")
    for source in (folder, folder / name):
        msg = ckpt_rejects(source, "pickle", "run arbitrary code", "safe_serialization=True")
        assert str(source) in msg
    assert not marker.exists()


def test_rejects_folder_without_safetensors(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    ckpt_rejects(tmp_path / "m", str(tmp_path / "m"), "no safetensors")


def test_rejects_missing_and_foreign_sources(tmp_path):
    ckpt_rejects(tmp_path / "nothing.safetensors", "nothing.safetensors", "no such")
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(20))
    ckpt_rejects(tmp_path / "model.gguf", "model.gguf", ".safetensors")


def test_bad_shard_is_named(tmp_path):
    write_sharded(tmp_path / "m", SHARDS)
    shard = tmp_path / "m" / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])  # truncated download
    ckpt_rejects(tmp_path / "m", shard.name, "past the end")
