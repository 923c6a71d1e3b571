"""Bounded decoding of GGUF primitives and metadata values.

Every read checks its length against the bytes that are really there *before* it reads,
converts, or allocates, so a truncated or hostile file ends in a `FormatError` naming the
file, the offset and the key, never in struct.error, IndexError, UnicodeDecodeError,
MemoryError or a multi-gigabyte list. `Cursor` is the only thing that touches the buffer.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from ggforge.formats.errors import FormatError

# Caps on what one value may claim. llama.cpp's gguf.cpp uses 1 GiB for strings and
# 2^30 for array elements; we follow it, and cap keys and string arrays tighter because
# real keys are short and each Python str costs ~50 bytes on top of its text: 2^23 strings
# is ~0.5 GB of Python objects at worst, while the largest real vocabularies and merge
# lists are well under 2^21 entries.
MAX_STRING_BYTES = 1 << 30
MAX_KEY_BYTES = 65535
MAX_ARRAY_ELEMENTS = 1 << 30
MAX_STRING_ARRAY_ELEMENTS = 1 << 23

# Fixed size in bytes of each scalar type (strings and arrays have none).
SCALAR_SIZE: dict[GGUFValueType, int] = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
_STRUCT: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"), GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.BOOL: struct.Struct("<B"),
    GGUFValueType.UINT16: struct.Struct("<H"), GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"), GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.UINT64: struct.Struct("<Q"), GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_NUMPY: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
# The smallest encoding of any value: one byte (u8, i8, bool). Used to bound counts.
MIN_VALUE_BYTES = 1
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Cursor:
    """A read position in a buffer (bytes or mmap) that refuses to read past its end."""

    def __init__(self, buf: Any, path: Path, pos: int = 0):
        self.buf = buf
        self.path = path
        self.pos = pos
        self.end = len(buf)

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def fail(self, what: str, at: int | None = None) -> FormatError:
        """The error to raise: file, offset, what is wrong."""
        return FormatError(f"{self.path}: {what} (at byte offset {self.pos if at is None else at})")

    def need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise self.fail(f"{what} needs {n} bytes but only {self.remaining} remain "
                            f"(file truncated or corrupt)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def scalar(self, vtype: GGUFValueType, what: str) -> int | float | bool:
        self.need(SCALAR_SIZE[vtype], what)
        (v,) = _STRUCT[vtype].unpack_from(self.buf, self.pos)
        self.pos += SCALAR_SIZE[vtype]
        # llama.cpp reads a bool as an int8 and treats any non-zero byte as true
        return bool(v) if vtype == GGUFValueType.BOOL else v

    def string(self, what: str, cap: int = MAX_STRING_BYTES) -> str:
        """A u64 length then that many UTF-8 bytes; length checked before anything is read."""
        start = self.pos
        n = self.u64(f"length of {what}")
        if n > cap:
            raise self.fail(f"{what} claims {n} bytes, over the limit of {cap}", start)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})",
                            self.pos) from None
        self.pos += n
        return s


def value_type(cur: Cursor, key: str, what: str = "value type") -> GGUFValueType:
    at = cur.pos
    t = cur.u32(f"{what} of key {key!r}")
    try:
        return GGUFValueType(t)
    except ValueError:
        raise cur.fail(f"key {key!r} has unknown {what} {t}", at) from None


def read_value(cur: Cursor, key: str) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """Decode one metadata value after its key. Returns (value, type, element type)."""
    vtype = value_type(cur, key)
    if vtype == GGUFValueType.STRING:
        return cur.string(f"string value of key {key!r}"), vtype, None
    if vtype != GGUFValueType.ARRAY:
        return cur.scalar(vtype, f"value of key {key!r}"), vtype, None
    elem = value_type(cur, key, "array element type")
    if elem == GGUFValueType.ARRAY:
        raise cur.fail(f"key {key!r} is an array of arrays, which GGUF does not allow")
    at = cur.pos
    count = cur.u64(f"array length of key {key!r}")
    if count > MAX_ARRAY_ELEMENTS:
        raise cur.fail(f"key {key!r}: array of {count} elements, over the limit of "
                       f"{MAX_ARRAY_ELEMENTS}", at)
    if elem == GGUFValueType.STRING:
        return _string_array(cur, key, count, at), vtype, elem
    nbytes = count * SCALAR_SIZE[elem]  # Python int: cannot overflow
    if nbytes > cur.remaining:
        raise cur.fail(f"key {key!r}: array of {count} {elem.name} needs {nbytes} bytes but only "
                       f"{cur.remaining} remain", at)
    # A copy (bounded by the file's own bytes) so that the metadata does not pin the mmap
    # and close() can unmap the file.
    arr = np.frombuffer(cur.buf, dtype=_NUMPY[elem], count=count, offset=cur.pos).copy()
    if elem == GGUFValueType.BOOL:
        arr = arr != 0
    arr.setflags(write=False)
    cur.pos += nbytes
    return arr, vtype, elem


class _Bad(Exception):
    """Internal: (index, offset, what) of a bad string inside a string array."""


def _string_array(cur: Cursor, key: str, count: int, at: int) -> list[str]:
    # Each string carries at least its 8-byte length: bound the count before the loop.
    if count * 8 > cur.remaining:
        raise cur.fail(f"key {key!r}: array of {count} strings needs at least {count * 8} "
                       f"bytes but only {cur.remaining} remain", at)
    if count > MAX_STRING_ARRAY_ELEMENTS:
        raise cur.fail(f"key {key!r}: array of {count} strings, over the limit of "
                       f"{MAX_STRING_ARRAY_ELEMENTS}", at)
    # The same checks as Cursor.string, inlined: vocabularies and merge lists hold
    # hundreds of thousands of strings and the method-call overhead would dominate.
    buf, pos, end, unpack = cur.buf, cur.pos, cur.end, _U64.unpack_from
    out: list[str] = []
    append = out.append
    try:
        for i in range(count):
            if end - pos < 8:
                raise _Bad(i, pos, "length is truncated")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos or n > MAX_STRING_BYTES:
                raise _Bad(i, pos - 8, f"claims {n} bytes but only {end - pos} remain")
            append(str(buf[pos:pos + n], "utf-8"))
            pos += n
    except UnicodeDecodeError as e:
        raise cur.fail(f"string {len(out)} of key {key!r} is not valid UTF-8 ({e.reason})",
                       pos) from None
    except _Bad as e:
        raise cur.fail(f"string {e.args[0]} of key {key!r}: {e.args[2]}", e.args[1]) from None
    cur.pos = pos
    return out

