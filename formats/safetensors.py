"""A strict, torch-free reader for one safetensors file.

Layout of a safetensors file::

    u64 little-endian   N, the header length in bytes
    N bytes             UTF-8 JSON object, padded at the end with spaces (0x20)
                        {"name": {"dtype": "BF16", "shape": [r, c], "data_offsets": [b, e]},
                         ..., "__metadata__": {"key": "value"}}
    data                the tensors' bytes; offsets are relative to the start of this
                        section, and the tensors tile it exactly (no gaps, no overlaps,
                        nothing after the last one)

The file is untrusted input (RELIABILITY.md): every number in the header is checked, with
Python ints, before anything is mapped or allocated from it. Tensor data is read through a
read-only mmap and only the requested tensor is copied, so peak memory follows the largest
tensor rather than the file.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ggforge.formats.errors import FormatError, UnsupportedModelError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_HEADER_KEYS = frozenset({"dtype", "shape", "data_offsets"})
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class DtypeSpec:
    """One safetensors dtype: its width in bits and how read() returns it (None: cannot)."""

    bits: int
    numpy: str | None  # little-endian storage dtype; raw bits for types numpy lacks


# Every dtype the safetensors format defines, so `inspect` can list any file. BF16 and the
# float8 kinds have no numpy type: read() gives their raw bits as unsigned integers.
DTYPES: dict[str, DtypeSpec] = {
    "BOOL": DtypeSpec(8, "u1"),
    "U8": DtypeSpec(8, "u1"),
    "I8": DtypeSpec(8, "i1"),
    "U16": DtypeSpec(16, "<u2"),
    "I16": DtypeSpec(16, "<i2"),
    "U32": DtypeSpec(32, "<u4"),
    "I32": DtypeSpec(32, "<i4"),
    "U64": DtypeSpec(64, "<u8"),
    "I64": DtypeSpec(64, "<i8"),
    "F16": DtypeSpec(16, "<f2"),
    "BF16": DtypeSpec(16, "<u2"),
    "F32": DtypeSpec(32, "<f4"),
    "F64": DtypeSpec(64, "<f8"),
    "C64": DtypeSpec(64, "<c8"),
    "F8_E4M3": DtypeSpec(8, "u1"),
    "F8_E4M3FNUZ": DtypeSpec(8, "u1"),
    "F8_E5M2": DtypeSpec(8, "u1"),
    "F8_E5M2FNUZ": DtypeSpec(8, "u1"),
    "F8_E8M0": DtypeSpec(8, "u1"),
    # Sub-byte types pack several elements per byte; they can be listed, not read.
    "F4": DtypeSpec(4, None),
    "F6_E2M3": DtypeSpec(6, None),
    "F6_E3M2": DtypeSpec(6, None),
}


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widen the bits and shift them up."""
    bits = raw.astype(np.uint32)  # the only copy
    bits <<= 16
    return bits.view(np.float32)


def _cast_to_f32(raw: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # F64 beyond float32's range becomes +-inf
        return raw.astype(np.float32)


# dtype -> converter from the (uncopied) little-endian view to a new float32 array
_TO_FLOAT32: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _cast_to_f32,
    "F16": _cast_to_f32,
    "F64": _cast_to_f32,
    "BF16": _bf16_to_f32,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its dtype, numpy-order shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: str
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# ---------------------------------------------------------------------------------------
# header parsing and validation


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: json.loads would silently keep the last of two equal keys."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _reject_constant(token: str) -> None:
    raise ValueError(f"non-standard JSON constant {token}")


def load_json_object(path: str | Path, text_bytes: bytes, what: str) -> dict:
    """Parse strict JSON (UTF-8, no duplicate keys, no NaN/Infinity) whose top is an object.

    Shared with the sharded-index reader; `what` names the document in messages.
    """
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: {what} is not valid UTF-8 (byte {e.start})") from None
    if not text.lstrip(" \t\r\n").startswith("{"):  # the header's own check is stricter
        raise FormatError(f"{path}: {what} is not a JSON object (it must start with '{{')")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as e:
        raise FormatError(f"{path}: {what} has the key {e.key!r} twice") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise FormatError(f"{path}: {what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: {what} is not a JSON object")
    if _SURROGATE_ESCAPE.search(text):
        bad = _lone_surrogate(obj)
        if bad is not None:  # the safetensors library (serde_json) refuses these too
            raise FormatError(f"{path}: {what} holds the string {bad[:80]!r}, whose \\u escape "
                              "is a lone UTF-16 surrogate: not valid Unicode")
    return obj


# A \uD800-\uDFFF escape: json.loads turns a lone one into a str that cannot be encoded
# (printing the name would fail later); a pair is a valid character.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj: object) -> str | None:
    """The first string (key or value) that is not valid Unicode, or None."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return x
        elif isinstance(x, dict):
            stack.extend(x)
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _count_elements(shape: list[int], cap: int) -> int:
    """Product of `shape`, stopping once it passes `cap` (any such value is wrong anyway)."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > cap:
            return n
    return n


def _parse_entry(path: str, name: str, info: object, data_start: int, data_len: int) -> TensorEntry:
    """Validate one header entry against the data section [0, data_len)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise FormatError(f"{where}: header entry is not a JSON object")
    if set(info) != _HEADER_KEYS:
        missing = sorted(_HEADER_KEYS - set(info))
        extra = sorted(set(info) - _HEADER_KEYS)
        raise FormatError(f"{where}: header entry must hold exactly dtype, shape and data_offsets"
                          f" (missing {missing}, unknown {extra})")
    dtype = info["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = info["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise FormatError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise FormatError(f"{where}: data_offsets [{begin}, {end}] are negative or end before they begin")
    if end > data_len:
        raise FormatError(f"{where}: data [{begin}, {end}) runs past the end of the file"
                          f" (the data section holds {data_len} bytes; truncated download?)")
    bits = DTYPES[dtype].bits
    n = _count_elements(shape, cap=8 * data_len)
    if n * bits != 8 * (end - begin):
        raise FormatError(f"{where}: shape {shape} of {dtype} needs {n * bits / 8:g} bytes"
                          f" but data_offsets give {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _check_tiling(path: str, entries: list[TensorEntry], data_start: int, data_len: int) -> None:
    """Sorted by offset, the tensors must cover [0, data_len) exactly once."""
    pos, prev = 0, None
    for e in sorted(entries, key=lambda e: (e.offset, e.offset + e.nbytes)):
        begin = e.offset - data_start
        if begin > pos:
            raise FormatError(f"{path}: {begin - pos} unclaimed bytes at data offset {pos},"
                              f" before tensor {e.name!r}")
        if begin < pos:
            raise FormatError(f"{path}: tensor {e.name!r} at data offset {begin} overlaps"
                              f" tensor {prev!r} (which ends at {pos})")
        pos, prev = begin + e.nbytes, e.name
    if pos != data_len:
        raise FormatError(f"{path}: {data_len - pos} trailing bytes after the last tensor"
                          f" (data section is {data_len} bytes, tensors end at {pos})")


def _read_header(path: str, f, size: int) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Read and validate the header; returns (tensors in header order, metadata, data start)."""
    if size < 8:
        raise FormatError(f"{path}: file is {size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: header length {n} is over the {MAX_HEADER_BYTES}-byte limit"
                          " (not a safetensors file?)")
    if 8 + n > size:
        raise FormatError(f"{path}: header length {n} runs past the end of the {size}-byte file")
    raw = f.read(n)  # (n,) bytes, bounded above
    if not raw.startswith(b"{"):
        raise FormatError(f"{path}: header is not a JSON object (it must start with '{{')")
    body = raw.rstrip(b" ")
    if not body.endswith(b"}"):
        raise FormatError(f"{path}: header must end with '}}' followed only by space padding"
                          f" (found {raw[len(body) - 1:len(body)]!r} at byte {8 + len(body) - 1})")
    header = load_json_object(path, body, "header")
    data_start, data_len = 8 + n, size - 8 - n

    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: {METADATA_KEY} must be a JSON object of string values")
    tensors = {name: _parse_entry(path, name, info, data_start, data_len)
               for name, info in header.items()}
    _check_tiling(path, list(tensors.values()), data_start, data_len)
    return tensors, metadata, data_start


# ---------------------------------------------------------------------------------------
# the reader


class SafetensorsFile:
    """One validated safetensors file; tensors are copied out of a lazily created mmap.

    Use ``SafetensorsFile.open(path)``, as a context manager or with ``close()``.
    """

    def __init__(self, path: str, tensors: dict[str, TensorEntry], metadata: dict[str, str],
                 size: int):
        self.path = path
        self.tensors = tensors  # name -> entry, in header order
        self.metadata = metadata  # the "__metadata__" object
        self._size = size
        self._file = None
        self._mm: mmap.mmap | None = None
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike) -> SafetensorsFile:
        """Read and validate the header; the data is only mapped on the first read."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                tensors, metadata, _ = _read_header(path, f, size)
        except OSError as e:
            raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
        return cls(path, tensors, metadata, size)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self.tensors)} tensors)"

    def close(self) -> None:
        """Unmap and close the file; reads afterwards raise ValueError."""
        self._closed = True
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the GC unmaps it later
                log.debug("%s: mmap still exported at close", self.path)
            self._mm = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _map(self) -> mmap.mmap:
        if self._closed:
            raise ValueError(f"{self.path}: read from a closed SafetensorsFile")
        if self._mm is None:
            self._file = open(self.path, "rb")
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        # A file truncated under a live mapping would crash the process (SIGBUS) on access.
        size = os.fstat(self._file.fileno()).st_size
        if size != self._size or len(self._mm) != self._size:
            raise FormatError(f"{self.path}: file changed size since it was opened"
                              f" ({self._size} -> {size} bytes)")
        return self._mm

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _view(self, entry: TensorEntry, storage: str) -> np.ndarray:
        """An uncopied little-endian view of the tensor's bytes, flat: (n_elements,)."""
        if entry.nbytes == 0:
            return np.empty(0, dtype=storage)
        return np.frombuffer(self._map(), dtype=storage, count=entry.n_elements,
                             offset=entry.offset)

    def read(self, name: str) -> np.ndarray:
        """A copy of the tensor in its own dtype, shape = entry.shape.

        F32/F16/F64 -> float32/float16/float64, integers -> same-width numpy integers,
        BOOL -> bool, BF16 -> uint16 raw bits, F8_* -> uint8 raw bits, C64 -> complex64.
        """
        entry = self._entry(name)
        storage = DTYPES[entry.dtype].numpy
        if storage is None:
            raise UnsupportedModelError(f"{self.path}: tensor {name!r} has sub-byte dtype"
                                        f" {entry.dtype}, which ggforge cannot read")
        view = self._view(entry, storage)
        native = np.dtype(storage).newbyteorder("=")
        out = view != 0 if entry.dtype == "BOOL" else view.astype(native)  # copies
        del view  # drop the mmap export so close() can unmap
        self._release(entry)
        return out.reshape(entry.shape)

    def read_float32(self, name: str) -> np.ndarray:
        """A new float32 array of the tensor (F32, F16, BF16 or F64), shape = entry.shape."""
        entry = self._entry(name)
        convert = _TO_FLOAT32.get(entry.dtype)
        if convert is None:
            raise UnsupportedModelError(f"{self.path}: tensor {name!r} has dtype {entry.dtype};"
                                        f" only {', '.join(_TO_FLOAT32)} convert to float32")
        view = self._view(entry, DTYPES[entry.dtype].numpy)
        out = convert(view)
        del view
        self._release(entry)
        return out.reshape(entry.shape)

    def _release(self, entry: TensorEntry) -> None:
        """Drop the tensor's mapped pages from this process once copied.

        Pages of a file mapping that were read count in the resident set until unmapped;
        without this, converting a whole checkpoint would grow RSS to the checkpoint's size.
        """
        if self._mm is None or entry.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = entry.offset - entry.offset % mmap.PAGESIZE
        self._mm.madvise(mmap.MADV_DONTNEED, start, entry.offset + entry.nbytes - start)
