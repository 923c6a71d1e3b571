"""convert.rows (chunks of rows of a safetensors tensor as float32), formats.quants.widen (its
kernels) and plan.row_order (how an architecture's transform moves rows)."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from ggforge.convert.archs.base import permute_rotary
from ggforge.convert.plan import row_order
from ggforge.convert.rows import RowReader, RowSource
from ggforge.formats.errors import FormatError, QuantizationError
from ggforge.formats.quants import bf16_to_float32, float32_to_bf16, widen
from ggforge.formats.safetensors import SafetensorsFile

_ST = {"BF16": "<u2", "F16": "<f2", "F32": "<f4"}


def _write_safetensors(path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """tensors: name -> (dtype, array already in that dtype's storage)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, a) in tensors.items():
        b = np.ascontiguousarray(a, dtype=_ST[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))


def _source(path, name: str, order=None, n_rows=None) -> RowSource:
    with SafetensorsFile.open(path) as st:
        e = st.tensors[name]
    return RowSource(name, e.path, e.offset, e.dtype, e.shape[0] if n_rows is None else n_rows,
                     e.shape[1], order)


@pytest.fixture()
def checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, {"a.bf16": ("BF16", float32_to_bf16(w)), "a.f16": ("F16", w.astype(np.float16)),
                              "a.f32": ("F32", w)})
    expected = {"BF16": bf16_to_float32(float32_to_bf16(w)), "F16": w.astype(np.float16).astype(np.float32),
                "F32": w}
    return path, expected


# ---------------------------------------------------------------- widen kernels

def test_bf16_rows_widen_every_pattern_exactly():
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite = h[(h & 0x7F80) != 0x7F80].reshape(-1, 1)  # (n, 1): one value per row
    out = np.empty(finite.shape, np.float32)
    assert widen.bf16_rows(finite, np.arange(finite.shape[0]), out.view(np.uint32)) == -1
    assert np.array_equal(out.view(np.uint32), finite.astype(np.uint32) << 16)


@pytest.mark.parametrize("bad", [0x7F80, 0xFF80, 0x7FC1, 0xFFFF])  # +-Inf, NaNs
def test_bf16_rows_report_the_first_non_finite(bad):
    src = np.zeros((4, 40), np.uint16)
    src[2, 17] = bad
    src[3, 0] = 0x7F80
    rows = np.array([1, 2, 3, 0])
    out = np.empty((4, 40), np.float32)
    assert widen.bf16_rows(src, rows, out.view(np.uint32)) == 1 * 40 + 17  # row 2 is out row 1


def test_first_nonfinite_f32():
    x = np.ones((3, 33), np.float32)
    assert widen.first_nonfinite_f32(x.view(np.uint32)) == -1
    x[1, 32], x[2, 0] = np.inf, np.nan
    assert widen.first_nonfinite_f32(x.view(np.uint32)) == 33 + 32
    x[0, 5] = -np.inf
    assert widen.first_nonfinite_f32(x.view(np.uint32)) == 5


# ---------------------------------------------------------------- RowReader

@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("permuted", [False, True])
def test_read_chunks_in_order(checkpoint, dtype, permuted):
    path, expected = checkpoint
    order = np.random.default_rng(1).permutation(48) if permuted else None
    src = _source(path, f"a.{dtype.lower()}", order)
    want = expected[dtype] if order is None else expected[dtype][order]
    reader, buf = RowReader(), np.empty(48 * 64, np.float32)
    try:
        for r0, r1 in [(0, 48), (0, 7), (7, 30), (30, 48), (47, 48)]:
            got = reader.read(src, r0, r1, buf)
            assert got.shape == (r1 - r0, 64) and np.shares_memory(got, buf)
            assert np.array_equal(got.view(np.uint32), want[r0:r1].view(np.uint32))
    finally:
        reader.close()


def test_read_trimmed_rows(checkpoint):
    path, expected = checkpoint
    src = _source(path, "a.bf16", n_rows=10)
    reader = RowReader()
    got = reader.read(src, 0, 10, np.empty(640, np.float32))
    reader.close()
    assert np.array_equal(got, expected["BF16"][:10])


@pytest.mark.parametrize("dtype, value", [("BF16", np.nan), ("F16", np.inf), ("F32", -np.inf)])
def test_non_finite_names_tensor_and_source_index(tmp_path, dtype, value):
    w = np.zeros((16, 32), np.float32)
    w[11, 5] = value
    w[15, 0] = np.nan  # read after row 11 (the first bad value in reading order is named)
    stored = {"BF16": float32_to_bf16(w), "F16": w.astype(np.float16), "F32": w}[dtype]
    path = tmp_path / "m.safetensors"
    _write_safetensors(path, {"model.layers.0.self_attn.q_proj.weight": (dtype, stored)})
    order = permute_rotary(np.arange(16), 2)  # source row 11 lands elsewhere
    src = _source(path, "model.layers.0.self_attn.q_proj.weight", order)
    with pytest.raises(QuantizationError) as err:
        RowReader().read(src, 0, 16, np.empty(16 * 32, np.float32))
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj.weight" in msg and "(11, 5)" in msg
    assert str(np.float32(value)) in msg


def test_truncated_file_is_a_format_error(checkpoint):
    path, _ = checkpoint
    src = _source(path, "a.f32")
    with open(path, "r+b") as f:
        f.truncate(src.offset + 10 * 64 * 4)
    with pytest.raises(FormatError, match="a.f32"):
        RowReader().read(src, 0, 48, np.empty(48 * 64, np.float32))


# ---------------------------------------------------------------- row_order

def test_row_order_of_transforms():
    assert row_order(lambda d: d, 12) is None
    order = row_order(lambda d: permute_rotary(d, 3), 12)
    assert np.array_equal(order, permute_rotary(np.arange(12), 3))
    assert row_order(lambda d: d + np.float32(1.0), 12) is False  # changes values
    assert row_order(lambda d: d[:, ::-1], 12) is False           # moves columns
    assert row_order(lambda d: d[:6], 12) is False                # changes the shape
    assert row_order(lambda d: d[np.r_[0, 0, 2:12]], 12) is False  # not a permutation
