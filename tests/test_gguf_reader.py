"""Tests for formats/gguf_reader.py, gguf_values.py and gguf_checks.py.

Oracles: gguf-py's GGUFReader reads the same valid files (fields and tensor bytes);
llama.cpp's own parser (gguf_init_from_buffer in libggml, through ctypes) must agree on
every hand-built bad file we reject, accept the valid ones, and writes a file we read back.
Every rejection is a hand-built file whose bad bytes we chose (RELIABILITY.md items 1-12).
"""
from __future__ import annotations

import ctypes
import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf import GGUFValueType as V

from ggforge.formats.errors import FormatError
from ggforge.formats.gguf_checks import check_model_metadata
from ggforge.formats.gguf_reader import GGUFFile, TensorInfo
from ggforge.formats.gguf_writer import GGUFWriter

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------
# helpers: valid files through GGUFWriter, bad files byte by byte


def write_gguf(path: Path, kvs=(), tensors=(), alignment: int = 32) -> Path:
    """kvs: (key, vtype, value[, elem]); tensors: (name, numpy array or (shape, qtype, bytes))."""
    with open(path, "wb") as f:
        w = GGUFWriter(f, alignment=alignment)
        for key, vtype, value, *elem in kvs:
            w.add_value(key, value, vtype, elem[0] if elem else None)
        datas = []
        for name, t in tensors:
            if isinstance(t, np.ndarray):
                qtype = {np.float32: Q.F32, np.float16: Q.F16, np.int32: Q.I32}[t.dtype.type]
                t = (t.shape, qtype, t.tobytes())
            w.add_tensor_info(name, t[0], t[1])
            datas.append((name, t[2]))
        w.write_header()
        for name, data in datas:
            w.write_tensor(name, data)
        w.finish()
    return path


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def u32kv(key: str, value: int) -> bytes:
    return kv(key, V.UINT32, struct.pack("<I", value))


def tinfo(name: str | bytes, dims, ttype: int = 0, offset: int = 0) -> bytes:
    return gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


def gguf_bytes(kvs=(), infos=(), data: bytes = b"", *, n_tensors=None, n_kv=None,
               version: int = 3, align: int = 32, pad: bool = True) -> bytes:
    n_t = len(infos) if n_tensors is None else n_tensors
    n_k = len(kvs) if n_kv is None else n_kv
    head = b"GGUF" + struct.pack("<IQQ", version, n_t, n_k) + b"".join(kvs) + b"".join(infos)
    return head + (b"\0" * ((-len(head)) % align) if pad else b"") + data


# ---------------------------------------------------------------------------------------
# llama.cpp's gguf parser through ctypes (libggml-base from llama-cpp-python)


class _GGUFParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p),
                ("no_alloc", ctypes.c_bool)]


def _libggml():
    from ggml_oracle import load_ggml
    from require import ON_CI

    g = load_ggml()   # errors in loading it are errors of the test, not a reason to skip
    if g is None:
        if ON_CI:
            raise RuntimeError("llama-cpp-python (the libggml oracle) is missing on CI")
        return None
    lib, P, S, I64 = g.lib, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64
    sigs = {
        "gguf_init_from_buffer": ([P, ctypes.c_size_t, _GGUFParams], P),
        "gguf_free": ([P], None), "gguf_init_empty": ([], P),
        "gguf_set_val_u32": ([P, S, ctypes.c_uint32], None),
        "gguf_set_val_f32": ([P, S, ctypes.c_float], None),
        "gguf_set_val_bool": ([P, S, ctypes.c_bool], None),
        "gguf_set_val_str": ([P, S, S], None),
        "gguf_set_arr_data": ([P, S, ctypes.c_int, P, ctypes.c_size_t], None),
        "gguf_set_arr_str": ([P, S, ctypes.POINTER(S), ctypes.c_size_t], None),
        "gguf_add_tensor": ([P, P], None),
        "gguf_write_to_file": ([P, S, ctypes.c_bool], ctypes.c_bool),
        "ggml_init": ([_InitParams], P), "ggml_free": ([P], None),
        "ggml_new_tensor_2d": ([P, ctypes.c_int, I64, I64], P),
        "ggml_set_name": ([P, S], P), "ggml_get_data": ([P], P),
    }
    for fn, (args, res) in sigs.items():
        getattr(lib, fn).argtypes, getattr(lib, fn).restype = args, res
    return lib


LIB = _libggml()


def llama_accepts(data: bytes) -> bool:
    buf = ctypes.create_string_buffer(data, len(data))
    ctx = LIB.gguf_init_from_buffer(buf, len(data), _GGUFParams(True, None))
    if ctx:
        LIB.gguf_free(ctx)
    return bool(ctx)


# ---------------------------------------------------------------------------------------
# valid files


ALL_KVS = [
    ("general.architecture", V.STRING, "llama"),
    ("u8", V.UINT8, 255), ("i8", V.INT8, -128), ("u16", V.UINT16, 65535),
    ("i16", V.INT16, -32768), ("u32", V.UINT32, 2**32 - 1), ("i32", V.INT32, -2**31),
    ("u64", V.UINT64, 2**64 - 1), ("i64", V.INT64, -2**63), ("f32", V.FLOAT32, 1.5),
    ("f64", V.FLOAT64, -2.25e300), ("yes", V.BOOL, True), ("no", V.BOOL, False),
    ("unicode", V.STRING, "héllo ✓ 🦙"), ("empty", V.STRING, ""),
    ("arr.str", V.ARRAY, ["a", "", "ü", "<s>"], V.STRING),
    ("arr.bool", V.ARRAY, [True, False, True], V.BOOL),
    ("arr.empty", V.ARRAY, [], V.INT32),
] + [(f"arr.{t.name}", V.ARRAY, [0, 1, 2, 100], t) for t in
     (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64)] + [
    ("arr.f32", V.ARRAY, [0.5, -1.0, 3.25], V.FLOAT32),
    ("arr.f64", V.ARRAY, [1e-300, 2.0], V.FLOAT64),
]


def all_tensors():
    q8 = RNG.integers(0, 256, size=3 * 2 * 34, dtype=np.uint8).tobytes()
    bf16 = RNG.integers(0, 2**16, size=(3, 5), dtype=np.uint16)
    return [
        ("f32.vec", RNG.standard_normal(7).astype(np.float32)),
        ("f32.mat", RNG.standard_normal((3, 5)).astype(np.float32)),
        ("f16.3d", RNG.standard_normal((2, 3, 4)).astype(np.float16)),
        ("i32.4d", RNG.integers(-9, 9, size=(2, 1, 3, 2), dtype=np.int32)),
        ("q8.mat", ((3, 64), Q.Q8_0, q8)),
        ("bf16.mat", ((3, 5), Q.BF16, bf16.tobytes())),
        ("empty.zero", np.zeros((0, 4), np.float32)),   # zero elements: llama.cpp allows it
    ]


@pytest.mark.parametrize("alignment", [32, 1, 64, 4096])
def test_roundtrip_matches_writer_and_gguf_py(tmp_path, alignment):
    tensors = all_tensors()
    path = write_gguf(tmp_path / "ok.gguf", ALL_KVS, tensors, alignment)
    oracle = GGUFReader(path)
    with GGUFFile.open(path) as g:
        assert (g.version, g.alignment, g.file_size) == (3, alignment, path.stat().st_size)
        assert g.data_offset == oracle.data_offset and g.data_offset % alignment == 0
        keys = [k[0] for k in ALL_KVS]
        if alignment != 32:
            keys.insert(0, "general.alignment")
        # gguf-py adds pseudo-fields GGUF.version, GGUF.tensor_count, GGUF.kv_count
        assert list(g.metadata) == keys == [k for k in oracle.fields if not k.startswith("GGUF.")]
        for key, vtype, value, *elem in ALL_KVS:
            got = g.metadata[key]
            assert g.value_types[key] == (vtype, elem[0] if elem else None)
            want = oracle.fields[key].contents()
            if vtype == V.ARRAY and elem[0] != V.STRING:
                assert isinstance(got, np.ndarray) and not got.flags.writeable
                got = got.tolist()
            elif vtype in (V.FLOAT32, V.FLOAT64, V.STRING):
                assert type(got) is type(value)
            assert got == want, key
            assert got == pytest.approx(value) if vtype in (V.FLOAT32,) else got == value
        assert list(g.tensors) == [name for name, _ in tensors]
        for (name, t), rt in zip(tensors, oracle.tensors):
            info = g.tensors[name]
            assert isinstance(info, TensorInfo)
            assert (info.name, info.dims, info.ggml_type, info.nbytes) == \
                   (rt.name, tuple(int(d) for d in rt.shape), int(rt.tensor_type), int(rt.n_bytes))
            assert info.offset == rt.data_offset and info.offset % alignment == 0
            raw = g.raw(name)
            assert raw.dtype == np.uint8 and not raw.flags.writeable
            assert raw.tobytes() == np.asarray(rt.data).tobytes()
            arr = g.array(name)
            if isinstance(t, np.ndarray):
                assert arr.dtype == t.dtype and arr.shape == info.shape == t.shape
                np.testing.assert_array_equal(arr, t)
            elif t[1] == Q.BF16:
                assert arr.dtype == np.uint16 and arr.shape == t[0]
                assert arr.tobytes() == t[2]
            else:
                assert arr.dtype == np.uint8 and arr.tobytes() == t[2]
                assert arr.shape == (*t[0][:-1], info.row_bytes)
        q8 = g.tensors["q8.mat"]
        assert (q8.type_name, q8.shape, q8.n_elements, q8.nbytes) == ("Q8_0", (3, 64), 192, 204)
        assert g.get("u8") == 255 and g.get("missing", 7) == 7
        if LIB is not None:
            assert llama_accepts(path.read_bytes())
        view = g.array("f32.mat")
    # a view outliving close() stays valid: close() did not raise BufferError or unmap it
    np.testing.assert_array_equal(view, dict(tensors)["f32.mat"])


def test_version_2_is_read(tmp_path):
    path = tmp_path / "v2.gguf"
    path.write_bytes(gguf_bytes([u32kv("a", 1)], version=2))
    with GGUFFile.open(path) as g:
        assert g.version == 2 and g.metadata == {"a": 1} and g.tensors == {}


def test_no_tensors_and_no_padding_is_read(tmp_path):
    # llama.cpp pads to the data section only when there are tensors
    data = gguf_bytes([u32kv("a", 1)], pad=False)
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    with GGUFFile.open(path) as g:
        assert g.metadata == {"a": 1}
    if LIB is not None:
        assert llama_accepts(data)


def test_reads_file_written_by_llama_cpp(tmp_path):
    if LIB is None:
        pytest.skip("llama-cpp-python (libggml) is not installed")
    path = tmp_path / "lcpp.gguf"
    ctx = LIB.ggml_init(_InitParams(1 << 20, None, False))
    gctx = LIB.gguf_init_empty()
    try:
        LIB.gguf_set_val_str(gctx, b"general.architecture", b"llama")
        LIB.gguf_set_val_u32(gctx, b"llama.block_count", 2)
        LIB.gguf_set_val_f32(gctx, b"f", 0.25)
        LIB.gguf_set_val_bool(gctx, b"b", True)
        ints = np.array([3, -1, 7], dtype=np.int32)
        LIB.gguf_set_arr_data(gctx, b"ints", int(V.INT32), ints.ctypes.data, 3)
        words = [b"<s>", "é".encode(), b""]
        LIB.gguf_set_arr_str(gctx, b"words", (ctypes.c_char_p * 3)(*words), 3)
        want = {}
        for name, qtype, ne0, ne1, nbytes in (("a.f32", Q.F32, 5, 3, 60),
                                              ("b.q8", Q.Q8_0, 64, 2, 136),
                                              ("c.f16", Q.F16, 3, 1, 6)):  # n_dims 1
            t = LIB.ggml_new_tensor_2d(ctx, int(qtype), ne0, ne1)
            LIB.ggml_set_name(t, name.encode())
            data = RNG.integers(0, 256, nbytes, dtype=np.uint8).tobytes()
            ctypes.memmove(LIB.ggml_get_data(t), data, nbytes)
            LIB.gguf_add_tensor(gctx, t)
            # llama.cpp writes n_dims without trailing 1s (ggml_n_dims)
            want[name] = ((ne0, ne1) if ne1 > 1 else (ne0,), int(qtype), data)
        assert LIB.gguf_write_to_file(gctx, str(path).encode(), False)
    finally:
        LIB.gguf_free(gctx)
        LIB.ggml_free(ctx)
    with GGUFFile.open(path) as g:
        assert g.metadata["general.architecture"] == "llama"
        assert g.metadata["llama.block_count"] == 2 and g.metadata["f"] == 0.25
        assert g.metadata["b"] is True and g.metadata["words"] == ["<s>", "é", ""]
        assert g.metadata["ints"].tolist() == [3, -1, 7]
        for name, (dims, qtype, data) in want.items():
            t = g.tensors[name]
            assert (t.dims, t.ggml_type, g.raw(name).tobytes()) == (dims, qtype, data)
        np.testing.assert_array_equal(
            g.array("a.f32"), np.frombuffer(want["a.f32"][2], np.float32).reshape(3, 5))


# ---------------------------------------------------------------------------------------
# rejections: one hand-built file per item of RELIABILITY.md "GGUF reader must reject"

BIG = 2**64 - 1
GOOD_T = tinfo("w", (4,), Q.F32, 0)
F32x4 = b"\0" * 16
STR_ARR = struct.pack("<IQ", V.STRING, 3) + gstr("a" * 9) + gstr("b" * 9)  # claims 3, holds 2

# id -> (file bytes, fragments the message must contain, does llama.cpp reject it too?)
BAD = {
    # 1. magic, short file
    "bad_magic": (b"GGML" + gguf_bytes()[4:], ["magic"], True),
    "empty_file": (b"", ["shorter than the 24-byte"], True),
    "short_magic": (b"GGU", ["shorter than the 24-byte"], True),
    "short_header": (gguf_bytes()[:20], ["shorter than the 24-byte"], True),
    "short_header_bad_magic": (b"GGxx", ["magic"], True),
    # 2. versions
    "version_0": (gguf_bytes(version=0), ["version 0"], True),
    "version_1": (gguf_bytes(version=1), ["version 1"], True),
    "version_4": (gguf_bytes(version=4), ["version 4"], True),
    "big_endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), ["big-endian", "0x03000000"], True),
    # 3. counts larger than the remaining bytes could hold
    "n_kv_huge": (gguf_bytes(n_kv=2**63), ["key/values", "offset 8"], True),
    "n_tensors_huge": (gguf_bytes(n_tensors=BIG), ["tensors"], True),
    "n_kv_too_many": (gguf_bytes([u32kv("a", 1)], n_kv=3), ["3 key/values"], True),
    "n_tensors_after_kvs": (gguf_bytes([kv("k", V.STRING, gstr("x" * 200))], n_tensors=5),
                            ["5 tensor infos"], True),
    # 4. string lengths
    "key_len_past_end": (gguf_bytes([struct.pack("<Q", 100) + b"abc"] + [b"\0" * 11]),
                         ["key of key/value 0", "only"], True),
    "key_len_cap": (gguf_bytes([struct.pack("<Q", 2**40) + b"k" * 20]), ["over the limit"], True),
    "value_len_past_end": (gguf_bytes([kv("k", V.STRING, struct.pack("<Q", 10**6) + b"ab")]),
                           ["'k'", "needs 1000000 bytes"], True),
    "value_len_huge": (gguf_bytes([kv("k", V.STRING, struct.pack("<Q", BIG))]),
                       ["'k'", "over the limit"], True),
    "key_not_utf8": (gguf_bytes([kv(b"k\xff\xfe", V.UINT8, b"\1")]), ["UTF-8"], False),
    "value_not_utf8": (gguf_bytes([kv("k", V.STRING, gstr(b"\xc3\x28"))]), ["'k'", "UTF-8"],
                       False),
    # 5. keys
    "empty_key": (gguf_bytes([kv("", V.UINT8, b"\1")]), ["empty key"], True),
    "duplicate_key": (gguf_bytes([u32kv("a.b", 1), u32kv("a.b", 2)]), ["duplicate", "'a.b'"],
                      True),
    # 6. value types and array sizes
    "unknown_value_type": (gguf_bytes([kv("k", 13, b"\0" * 8)]), ["'k'", "unknown value type 13"],
                           True),
    "value_type_ffff": (gguf_bytes([kv("k", 0xFFFFFFFF, b"\0" * 8)]), ["'k'", "unknown"], True),
    "array_of_arrays": (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) + b"\0" * 20)]),
                        ["'k'", "array of arrays"], True),
    "array_unknown_elem": (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", 99, 1) + b"\0" * 8)]),
                           ["'k'", "unknown array element type 99"], True),
    "array_past_end": (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.UINT64, 10**6))]),
                       ["'k'", "8000000 bytes"], True),
    "array_count_overflow": (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.INT32, 2**62))]),
                             ["'k'", "over the limit"], True),
    "string_array_past_end": (gguf_bytes([kv("k", V.ARRAY, STR_ARR)], pad=False),
                              ["string 2 of key 'k'"], True),
    "string_array_count": (gguf_bytes([kv("k", V.ARRAY, struct.pack("<IQ", V.STRING, 10**5))]),
                           ["'k'", "800000"], True),
    "truncated_scalar": (gguf_bytes([kv("k", V.FLOAT64, b"\0\0")], pad=False),
                         ["value of key 'k'"], True),
    # 7. general.alignment
    "alignment_u64": (gguf_bytes([kv("general.alignment", V.UINT64, struct.pack("<Q", 32))]),
                      ["general.alignment", "UINT32", "UINT64"], True),
    "alignment_string": (gguf_bytes([kv("general.alignment", V.STRING, gstr("32"))]),
                         ["general.alignment", "UINT32"], True),
    "alignment_zero": (gguf_bytes([u32kv("general.alignment", 0)]), ["general.alignment", "0"],
                       True),
    "alignment_not_pow2": (gguf_bytes([u32kv("general.alignment", 48)], align=48),
                           ["general.alignment", "48", "power of two"], True),
    # 8. tensor names
    "name_empty": (gguf_bytes(infos=[tinfo("", (4,))], data=F32x4), ["tensor name", "0 bytes"],
                   False),
    "name_64_bytes": (gguf_bytes(infos=[tinfo("n" * 64, (4,))], data=F32x4), ["64 bytes"], True),
    "name_huge_len": (gguf_bytes(infos=[struct.pack("<Q", BIG) + b"\0" * 40]), ["tensor name"],
                      True),
    "name_duplicate": (gguf_bytes(infos=[GOOD_T, tinfo("w", (4,), 0, 32)], data=F32x4 * 4),
                       ["duplicate tensor name 'w'"], True),
    "name_not_utf8": (gguf_bytes(infos=[tinfo(b"\xff", (4,))], data=F32x4), ["UTF-8"], False),
    # 9. dimensions and sizes
    "n_dims_0": (gguf_bytes(infos=[tinfo("w", ())], data=F32x4), ["'w'", "0 dimensions"], False),
    "n_dims_5": (gguf_bytes(infos=[tinfo("w", (1, 1, 1, 1, 1))], data=F32x4),
                 ["'w'", "5 dimensions"], True),
    "negative_dim": (gguf_bytes(infos=[tinfo("w", (4, BIG))], data=F32x4), ["'w'", "negative",
                                                                            "-1"], True),
    "dim_2_63": (gguf_bytes(infos=[tinfo("w", (2**63,))]), ["'w'", "negative"], True),
    "elements_overflow": (gguf_bytes(infos=[tinfo("w", (2**32, 2**32))]), ["'w'", "overflows"],
                          True),
    "elements_overflow_4d": (gguf_bytes(infos=[tinfo("w", (2**16,) * 4)]), ["'w'", "overflows"],
                             True),
    # (False: llama.cpp checks data bounds only when it loads the data, in
    # llama-model-loader, not in gguf_init_from_buffer with no_alloc)
    "zero_elements_huge_dims": (gguf_bytes(infos=[tinfo("w", (0, 2**62, 4))]), ["'w'", "overflows"],
                                False),  # llama.cpp skips 0 and 1 in its product check
    "bytes_past_file": (gguf_bytes(infos=[tinfo("w", (2**40,))]), ["'w'", "past the end"], False),
    # 10. type ids
    "type_unknown": (gguf_bytes(infos=[tinfo("w", (4,), 99)], data=F32x4),
                     ["'w'", "unknown ggml type id 99"], True),
    "type_huge": (gguf_bytes(infos=[tinfo("w", (4,), 0xFFFFFFFF)], data=F32x4), ["'w'", "unknown"],
                  True),
    "type_removed_q4_2": (gguf_bytes(infos=[tinfo("w", (32,), 4)], data=F32x4),
                          ["'w'", "Q4_2", "removed"], True),
    "type_removed_q4_0_4_4": (gguf_bytes(infos=[tinfo("w", (32,), 31)], data=F32x4),
                              ["'w'", "Q4_0_4_4", "removed"], True),
    "row_not_block_multiple": (gguf_bytes(infos=[tinfo("w", (33, 2), Q.Q8_0)], data=b"\0" * 96),
                               ["'w'", "row length 33", "block size 32"], True),
    # 11. offsets
    "offset_unaligned": (gguf_bytes(infos=[tinfo("w", (4,), 0, 4)], data=F32x4 * 2),
                         ["'w'", "offset 4", "alignment 32"], True),
    "offset_past_end": (gguf_bytes(infos=[tinfo("w", (4,), 0, 64)], data=F32x4),
                        ["'w'", "past the end"], True),
    "data_truncated": (gguf_bytes(infos=[tinfo("w", (8,))], data=F32x4), ["'w'", "past the end"],
                       False),  # (as bytes_past_file)
    "data_section_past_end": (gguf_bytes(infos=[tinfo("w", (0,))], pad=False),
                              ["data section"], True),
    "overlap": (gguf_bytes(infos=[tinfo("a", (16,)), tinfo("b", (4,), 0, 32)], data=F32x4 * 6),
                ["'a'", "'b'", "overlap"], True),
}


@pytest.mark.parametrize("case", list(BAD))
def test_rejects_bad_file(tmp_path, case):
    data, fragments, llama_rejects = BAD[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(data)
    with pytest.raises(FormatError) as e:
        GGUFFile.open(path)
    msg = str(e.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    if LIB is not None and llama_rejects:
        assert not llama_accepts(data), f"llama.cpp accepts {case}: the file is not bad"


def test_bad_file_cases_are_otherwise_valid(tmp_path):
    """The hand-built helpers make valid files when nothing is broken (so each case above
    fails for the reason it names)."""
    two_strings = STR_ARR[:4] + struct.pack("<Q", 2) + STR_ARR[12:]
    data = gguf_bytes([u32kv("a", 1), kv("k", V.ARRAY, two_strings)],
                      [GOOD_T, tinfo("v", (4, 2), 0, 32)], F32x4 * 4)
    path = tmp_path / "ok.gguf"
    path.write_bytes(data)
    with GGUFFile.open(path) as g:
        assert g.metadata["k"] == ["a" * 9, "b" * 9] and g.tensors["v"].shape == (2, 4)
    if LIB is not None:
        assert llama_accepts(data)


# ---------------------------------------------------------------------------------------
# mutation smoke test: only FormatError escapes, fast


def test_mutations_raise_only_format_error(tmp_path):
    kvs = ALL_KVS[:6] + [("tokenizer.ggml.tokens", V.ARRAY, ["a", "b", "c"], V.STRING),
                         ("tokenizer.ggml.bos_token_id", V.UINT32, 1),
                         ("llama.block_count", V.UINT32, 1)]
    base = write_gguf(tmp_path / "base.gguf", kvs, all_tensors()[:5]).read_bytes()
    header_end = GGUFFile.open(tmp_path / "base.gguf").data_offset
    rnd = random.Random(1234)
    huge = [2**63, BIG, 2**32, 2**31, len(base) + 1, 2**40, 0]
    outcomes = {"ok": 0, "rejected": 0}
    for i in range(400):
        data = bytearray(base)
        kind = i % 4
        if kind == 0:
            for _ in range(rnd.randint(1, 8)):
                data[rnd.randrange(header_end)] ^= 1 << rnd.randrange(8)
        elif kind == 1:
            del data[rnd.randrange(len(data)):]
        elif kind == 2:
            at = rnd.choice([8, 16]) if i % 8 == 2 else rnd.randrange(24, header_end - 8)
            data[at:at + 8] = struct.pack("<Q", rnd.choice(huge))
        else:
            at = rnd.randrange(header_end - 4)
            data[at:at + 4] = struct.pack("<I", rnd.choice([0, 13, 9, 0xFFFFFFFF, 64, 99]))
        path = tmp_path / "m.gguf"
        path.write_bytes(bytes(data))
        t0 = time.thread_time()
        try:
            with GGUFFile.open(path) as g:
                for name in g.tensors:
                    g.array(name).tobytes()
                check_model_metadata(g)
            outcomes["ok"] += 1
        except FormatError as e:
            assert str(path) in str(e)
            outcomes["rejected"] += 1
        assert time.thread_time() - t0 < 1.0, f"mutation {i} took too long"
    assert outcomes["rejected"] > 100 and outcomes["ok"] > 0


# ---------------------------------------------------------------------------------------
# item 12: semantic checks (gguf_checks.py)

VOCAB = ["<unk>", "<s>", "</s>", "a", "b", "ab"]
N_EMBD, N_HEAD, N_KV, HD = 64, 4, 2, 16


def model_kvs(**override):
    kvs = {
        "general.architecture": (V.STRING, "llama"),
        "llama.block_count": (V.UINT32, 2),
        "llama.embedding_length": (V.UINT32, N_EMBD),
        "llama.attention.head_count": (V.UINT32, N_HEAD),
        "llama.attention.head_count_kv": (V.UINT32, N_KV),
        "tokenizer.ggml.tokens": (V.ARRAY, VOCAB, V.STRING),
        "tokenizer.ggml.scores": (V.ARRAY, [0.0] * len(VOCAB), V.FLOAT32),
        "tokenizer.ggml.token_type": (V.ARRAY, [2, 3, 3, 1, 1, 1], V.INT32),
        "tokenizer.ggml.merges": (V.ARRAY, ["a b"], V.STRING),
        "tokenizer.ggml.bos_token_id": (V.UINT32, 1),
        "tokenizer.ggml.eos_token_id": (V.UINT32, 2),
        "tokenizer.ggml.seperator_token_id": (V.UINT32, 5),
    }
    kvs.update(override)
    return [(k, *v) for k, v in kvs.items() if v is not None]


def model_tensors(n_layers=2, q_rows=N_HEAD * HD, k_rows=N_KV * HD, v_rows=N_KV * HD,
                  n_vocab=len(VOCAB)):
    z = np.zeros
    ts = [("token_embd.weight", z((n_vocab, N_EMBD), np.float32))]
    for i in range(n_layers):
        ts += [(f"blk.{i}.attn_q.weight", z((q_rows, N_EMBD), np.float32)),
               (f"blk.{i}.attn_k.weight", z((k_rows, N_EMBD), np.float32)),
               (f"blk.{i}.attn_v.weight", z((v_rows, N_EMBD), np.float32))]
    return ts


def check(tmp_path, kvs, tensors) -> None:
    path = write_gguf(tmp_path / "m.gguf", kvs, tensors)
    with GGUFFile.open(path) as g:
        check_model_metadata(g)


def test_consistent_model_passes(tmp_path):
    check(tmp_path, model_kvs(), model_tensors())
    # vocab-only file: no tensors to contradict block_count
    check(tmp_path, model_kvs(), [])
    # explicit head sizes; per-layer head count array
    check(tmp_path, model_kvs(**{"llama.attention.key_length": (V.UINT32, 32),
                                 "llama.attention.value_length": (V.UINT32, 8),
                                 "llama.attention.head_count": (V.ARRAY, [4, 4], V.INT32)}),
          model_tensors(q_rows=128, k_rows=64, v_rows=16))


BAD_MODELS = {
    "scores_length": ({"tokenizer.ggml.scores": (V.ARRAY, [0.0] * 5, V.FLOAT32)}, {},
                      ["tokenizer.ggml.scores", "5 entries", "6"]),
    "token_type_length": ({"tokenizer.ggml.token_type": (V.ARRAY, [1] * 7, V.INT32)}, {},
                          ["tokenizer.ggml.token_type", "7 entries"]),
    "token_type_elem": ({"tokenizer.ggml.token_type": (V.ARRAY, [1.0] * 6, V.FLOAT32)}, {},
                        ["tokenizer.ggml.token_type", "INT32", "FLOAT32"]),
    "tokens_not_array": ({"tokenizer.ggml.tokens": (V.STRING, "abc")}, {},
                         ["tokenizer.ggml.tokens", "ARRAY of STRING"]),
    "tokens_elem": ({"tokenizer.ggml.tokens": (V.ARRAY, [1] * 6, V.INT32)}, {},
                    ["tokenizer.ggml.tokens", "INT32"]),
    "merges_elem": ({"tokenizer.ggml.merges": (V.ARRAY, [1], V.UINT8)}, {},
                    ["tokenizer.ggml.merges", "UINT8"]),
    "scores_without_tokens": ({"tokenizer.ggml.tokens": None}, {},
                              ["tokenizer.ggml.scores", "missing"]),
    "bos_out_of_vocab": ({"tokenizer.ggml.bos_token_id": (V.UINT32, 6)}, {},
                         ["tokenizer.ggml.bos_token_id", "6", "outside"]),
    "pad_out_of_vocab": ({"tokenizer.ggml.padding_token_id": (V.UINT32, 2**32 - 1)}, {},
                         ["tokenizer.ggml.padding_token_id", "outside"]),
    "eot_negative": ({"tokenizer.ggml.eot_token_id": (V.INT32, -5)}, {},
                     ["tokenizer.ggml.eot_token_id", "-5"]),
    "eos_not_int": ({"tokenizer.ggml.eos_token_id": (V.STRING, "2")}, {},
                    ["tokenizer.ggml.eos_token_id", "integer"]),
    "embd_rows": ({}, {"n_vocab": 8}, ["token_embd.weight", "8 rows", "6 tokens"]),
    "block_count_low": ({"llama.block_count": (V.UINT32, 1)}, {},
                        ["blk.1", "llama.block_count", "1"]),
    "block_count_high": ({"llama.block_count": (V.UINT32, 3)}, {},
                         ["llama.block_count", "blk.2"]),
    "block_count_type": ({"llama.block_count": (V.STRING, "2")}, {},
                         ["llama.block_count", "integer"]),
    "head_count_q": ({}, {"q_rows": 128},
                     ["blk.0.attn_q.weight", "128 rows", "head_count = 4", "[16]"]),
    "head_count_kv": ({"llama.attention.head_count_kv": (V.UINT32, 1)}, {},
                      ["blk.0.attn_k.weight", "32 rows", "head_count_kv = 1"]),
    "key_length": ({"llama.attention.key_length": (V.UINT32, 32)}, {},
                   ["blk.0.attn_q.weight", "[32]"]),
    "value_length": ({"llama.attention.value_length": (V.UINT32, 8)}, {},
                     ["blk.0.attn_v.weight", "[8]"]),
    "head_count_not_divisor": ({"llama.attention.head_count": (V.UINT32, 3),
                                "llama.attention.head_count_kv": (V.UINT32, 3)}, {},
                               ["not divisible", "head_count = 3"]),
    "gqa_not_multiple": ({"llama.attention.head_count_kv": (V.UINT32, 3)}, {},
                         ["not a multiple", "head_count_kv = 3"]),
    "head_count_zero": ({"llama.attention.head_count": (V.UINT32, 0)}, {},
                        ["layer 0", "head_count = 0"]),
    "head_array_length": ({"llama.attention.head_count": (V.ARRAY, [4, 4, 4], V.UINT32)}, {},
                          ["llama.attention.head_count", "3 entries for 2 layers"]),
    "arch_not_string": ({"general.architecture": (V.UINT32, 1)}, {}, ["general.architecture"]),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_model_metadata_contradictions(tmp_path, case):
    override, tensor_args, fragments = BAD_MODELS[case]
    path = write_gguf(tmp_path / f"{case}.gguf", model_kvs(**override),
                      model_tensors(**tensor_args))
    with GGUFFile.open(path) as g, pytest.raises(FormatError) as e:
        check_model_metadata(g)
    msg = str(e.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
