"""Streaming GGUF v3 writer.

The header (key/values and tensor infos) is written first, then tensor data one tensor at
a time in the declared order, so a converter holds only one tensor in memory.

    w = GGUFWriter(f)
    w.add_string("general.architecture", "llama")
    w.add_tensor_info("token_embd.weight", (32000, 4096), GGMLQuantizationType.Q8_0)
    w.write_header()
    w.write_tensor("token_embd.weight", q8_bytes)
    w.finish()
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ggforge.formats.errors import FormatError

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

# struct codes of the scalar value types (little-endian)
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_NUMPY = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.FLOAT64: "<f8",
    GGUFValueType.BOOL: "|b1",
}


@dataclass(frozen=True)
class KV:
    """One typed metadata entry. `elem` is the element type when vtype is ARRAY."""

    key: str
    vtype: GGUFValueType
    value: Any
    elem: GGUFValueType | None = None


def tensor_nbytes(shape: Sequence[int], ggml_type: int) -> int:
    """Bytes of a tensor of `shape` (numpy order, last dim = row) in `ggml_type`."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    n_per_row = int(shape[-1]) if len(shape) else 1
    if n_per_row % block:
        raise FormatError(f"row length {n_per_row} is not a multiple of the "
                          f"{GGMLQuantizationType(ggml_type).name} block size {block}")
    n = 1
    for d in shape:
        n *= int(d)
    return n // block * size


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _encode_value(vtype: GGUFValueType, value: Any, elem: GGUFValueType | None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value)
    if vtype in _SCALAR:
        return struct.pack(_SCALAR[vtype], value)
    if vtype == GGUFValueType.ARRAY:
        if elem is None or elem == GGUFValueType.ARRAY:
            raise FormatError("GGUF arrays need a scalar or string element type")
        values = list(value) if not isinstance(value, np.ndarray) else value
        head = struct.pack("<IQ", int(elem), len(values))
        if elem == GGUFValueType.STRING:
            return head + b"".join(_string(v) for v in values)
        return head + np.asarray(values, dtype=_NUMPY[elem]).tobytes()
    raise FormatError(f"unknown GGUF value type {vtype!r}")


class GGUFWriter:
    """Writes a GGUF v3 file to an open binary file object, streaming tensor data."""

    def __init__(self, fileobj: BinaryIO | None = None, *, alignment: int = DEFAULT_ALIGNMENT):
        if alignment <= 0 or alignment & (alignment - 1):
            raise FormatError(f"GGUF alignment must be a power of two, got {alignment}")
        self._f = fileobj
        self.alignment = alignment
        self._kv: dict[str, KV] = {}
        self._tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
        self._names: set[str] = set()
        self._next = 0  # index of the next tensor whose data is due
        self._header_written = False
        self._header: bytes | None = None  # encoded once; cleared when an entry is added
        if alignment != DEFAULT_ALIGNMENT:
            self.add_uint32("general.alignment", alignment)

    def attach(self, fileobj: BinaryIO) -> None:
        """Set the file to write to (a writer can be planned before the file exists)."""
        self._f = fileobj

    # -- metadata ---------------------------------------------------------------------
    def add(self, kv: KV) -> None:
        """Add (or replace, keeping its position) one typed entry."""
        if self._header_written:
            raise FormatError(f"metadata key {kv.key!r} added after the header was written")
        if not kv.key:
            raise FormatError("empty GGUF metadata key")
        self._kv[kv.key] = kv
        self._header = None

    def add_all(self, kvs: Iterable[KV]) -> None:
        for kv in kvs:
            self.add(kv)

    def add_value(self, key: str, value: Any, vtype: GGUFValueType,
                  elem: GGUFValueType | None = None) -> None:
        self.add(KV(key, vtype, value, elem))

    def add_string(self, key: str, value: str) -> None:
        self.add(KV(key, GGUFValueType.STRING, value))

    def add_uint32(self, key: str, value: int) -> None:
        self.add(KV(key, GGUFValueType.UINT32, int(value)))

    def add_int32(self, key: str, value: int) -> None:
        self.add(KV(key, GGUFValueType.INT32, int(value)))

    def add_float32(self, key: str, value: float) -> None:
        self.add(KV(key, GGUFValueType.FLOAT32, float(value)))

    def add_bool(self, key: str, value: bool) -> None:
        self.add(KV(key, GGUFValueType.BOOL, bool(value)))

    def add_array(self, key: str, values: Sequence[Any], elem: GGUFValueType) -> None:
        self.add(KV(key, GGUFValueType.ARRAY, values, elem))

    # -- tensors ----------------------------------------------------------------------
    def add_tensor_info(self, name: str, shape: Sequence[int], ggml_type: int) -> int:
        """Declare a tensor (shape in numpy order). Returns its size in bytes."""
        if self._header_written:
            raise FormatError(f"tensor {name!r} declared after the header was written")
        if not name or len(name.encode("utf-8")) >= 64:
            raise FormatError(f"GGUF tensor name {name!r} must be 1 to 63 bytes long")
        if name in self._names:
            raise FormatError(f"duplicate tensor name {name!r}")
        if not 1 <= len(shape) <= 4:
            raise FormatError(f"tensor {name!r} has {len(shape)} dimensions; GGUF allows 1 to 4")
        qtype = GGMLQuantizationType(ggml_type)
        try:
            nbytes = tensor_nbytes(shape, qtype)
        except FormatError as e:
            raise FormatError(f"tensor {name!r}: {e}") from None
        self._names.add(name)
        self._header = None
        self._tensors.append((name, tuple(int(d) for d in shape), qtype, nbytes))
        return nbytes

    def _pad(self, n: int) -> int:
        return (-n) % self.alignment

    def header_bytes(self) -> bytes:
        """The whole header: magic, counts, key/values, tensor infos, padding."""
        if self._header is not None:
            return self._header
        out = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(self._kv))]
        for kv in self._kv.values():
            out.append(_string(kv.key) + struct.pack("<I", int(kv.vtype))
                       + _encode_value(kv.vtype, kv.value, kv.elem))
        offset = 0
        for name, shape, qtype, nbytes in self._tensors:
            dims = shape[::-1]  # GGUF stores ne[0] (the row length) first
            out.append(_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                                                   int(qtype), offset))
            offset += nbytes + self._pad(nbytes)
        head = b"".join(out)
        self._header = head + b"\0" * self._pad(len(head))
        return self._header

    @property
    def planned_size(self) -> int:
        """Total file size in bytes once every tensor is written."""
        return len(self.header_bytes()) + sum(n + self._pad(n) for *_, n in self._tensors)

    def write_header(self) -> None:
        self._f.write(self.header_bytes())
        self._header_written = True

    def write_tensor(self, name: str, data: bytes | np.ndarray) -> None:
        """Write the next tensor's data; tensors must come in declaration order."""
        self.write_tensor_chunks(name, (data,))

    def write_tensor_chunks(self, name: str, chunks: Iterable[bytes | np.ndarray]) -> None:
        """Write the next tensor's data in consecutive pieces (rows of a large tensor)."""
        if not self._header_written:
            raise FormatError("write_header() must come before tensor data")
        if self._next >= len(self._tensors):
            raise FormatError(f"tensor {name!r} was never declared")
        want, _, _, nbytes = self._tensors[self._next]
        if name != want:
            raise FormatError(f"tensor data out of order: expected {want!r}, got {name!r}")
        written = 0
        for data in chunks:
            buf = memoryview(np.ascontiguousarray(data)).cast("B") \
                if isinstance(data, np.ndarray) else memoryview(data)
            written += buf.nbytes
            if written > nbytes:
                break
            self._f.write(buf)
        if written != nbytes:
            raise FormatError(f"tensor {name!r}: {written} bytes given, {nbytes} declared")
        self._f.write(b"\0" * self._pad(nbytes))
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._tensors):
            missing = self._tensors[self._next][0]
            raise FormatError(f"GGUF incomplete: tensor {missing!r} and later were not written")
        self._f.flush()
