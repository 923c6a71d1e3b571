"""Strict, mmap-based GGUF reader.

A GGUF file is untrusted input. `GGUFFile.open` validates every number the file states
(counts, lengths, types, shapes, offsets) against the bytes that are really there before
it reads, converts or allocates what the number asks for, and rejects a bad file with a
`FormatError` naming the file, the offset or key or tensor, and what is wrong
(docs: /work/shared/RELIABILITY.md, "GGUF reader must reject").

    with GGUFFile.open("model.gguf") as g:
        g.metadata["general.architecture"]      # 'llama'
        g.tensors["token_embd.weight"].shape     # (32000, 4096), numpy order
        g.array("blk.0.attn_norm.weight")         # float32 view into the mmap

Layout (little-endian): magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, the key/values,
the tensor infos, padding to `general.alignment`, then the data section; tensor offsets
are relative to the data section. Semantic checks (tokenizer, layer and head counts) live
in gguf_checks.py.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ggforge.formats.errors import FormatError
from ggforge.formats.gguf_values import MAX_KEY_BYTES, MIN_VALUE_BYTES, Cursor, read_value

GGUF_MAGIC = b"GGUF"
HEADER_SIZE = 4 + 4 + 8 + 8  # magic, version, n_tensors, n_kv
SUPPORTED_VERSIONS = (2, 3)  # v1 had u32 counts; llama.cpp dropped it too
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                 # GGML_MAX_DIMS
MAX_NAME_BYTES = 63          # GGML_MAX_NAME is 64 including the NUL
INT64_MAX = (1 << 63) - 1

# Smallest possible encodings, used to bound the counts before looping over them:
# a key/value is a u64 length, >= 1 key byte, a u32 type and a >= 1-byte value;
# a tensor info is a u64 length, >= 1 name byte, u32 n_dims, >= 1 u64 dim, u32 type, u64 offset.
MIN_KV_BYTES = 8 + 1 + 4 + MIN_VALUE_BYTES
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8

# ggml type ids that once existed and were removed from GGUF files (ggml.h comments);
# named here so the error says what the file is rather than "unknown".
REMOVED_TYPES = {4: "Q4_2", 5: "Q4_3", 31: "Q4_0_4_4", 32: "Q4_0_4_8", 33: "Q4_0_8_8",
                 36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8", 38: "IQ4_NL_8_8"}

# numpy dtypes of the element types; any other type is read as raw blocks (uint8 rows).
# BF16 has no numpy dtype: its raw 16-bit patterns come back as uint16.
_DTYPES = {
    GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F16: "<f2",
    GGMLQuantizationType.BF16: "<u2", GGMLQuantizationType.F64: "<f8",
    GGMLQuantizationType.I8: "<i1", GGMLQuantizationType.I16: "<i2",
    GGMLQuantizationType.I32: "<i4", GGMLQuantizationType.I64: "<i8",
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry. `dims` are in GGUF order: ne[0] (the row length) first."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int   # absolute offset of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order: the row length last."""
        return self.dims[::-1]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return self.dims[0] // block * size


class GGUFFile:
    """A validated GGUF file, memory-mapped read-only. Use `GGUFFile.open(path)`."""

    def __init__(self, path: Path):
        self.path = path
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        self.file_size = 0
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._mm: mmap.mmap | None = None

    # -- public API ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GGUFFile:
        """Open and validate `path`; raises FormatError on any malformed content."""
        g = cls(Path(path))
        with open(g.path, "rb") as f:
            g.file_size = os.fstat(f.fileno()).st_size
            n_tensors, n_kv = g._check_fixed_header(f.read(HEADER_SIZE))
            # Only the real file size decides the mapping, never a number inside the file.
            g._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            g._parse(n_tensors, n_kv)
        except BaseException:
            g.close()
            raise
        g._drop_header_pages()
        return g

    def _drop_header_pages(self) -> None:
        """The header now lives as Python objects: let the kernel drop its mapped pages
        (a 262k-token vocabulary is megabytes). Read-only file pages: re-read if touched."""
        end = self.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        if end > 0 and hasattr(mmap, "MADV_DONTNEED") and hasattr(self._mm, "madvise"):
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, 0, end)
            except (OSError, ValueError):
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the file. Views from raw()/array() that are still alive keep it mapped."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views still export the buffer; it unmaps when they are freed

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a read-only uint8 view into the mapping."""
        t = self._tensor(name)
        if self._mm is None:
            raise FormatError(f"{self.path}: file is closed; cannot read tensor {name!r}")
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only array view: typed with `.shape` for float/int types,
        uint8 of shape (*shape[:-1], row_bytes) for block-quantized types."""
        t = self._tensor(name)
        raw = self.raw(name)
        dtype = _DTYPES.get(GGMLQuantizationType(t.ggml_type))
        if dtype is not None:
            return raw.view(dtype).reshape(t.shape)
        return raw.reshape(*t.shape[:-1], t.row_bytes)

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")

    # -- parsing ------------------------------------------------------------------------
    def _tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _fail(self, what: str, at: int | None = None) -> FormatError:
        where = "" if at is None else f" (at byte offset {at})"
        return FormatError(f"{self.path}: {what}{where}")

    def _check_fixed_header(self, head: bytes) -> tuple[int, int]:
        """Magic, version and counts, from the first 24 bytes, before anything is mapped."""
        if head[:4] != GGUF_MAGIC[:len(head)]:
            raise self._fail(f"not a GGUF file: magic is {head[:4]!r}, expected {GGUF_MAGIC!r}", 0)
        if len(head) < HEADER_SIZE:
            raise self._fail(f"file is {self.file_size} bytes, shorter than the "
                             f"{HEADER_SIZE}-byte GGUF header")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
        self.version = version
        if version != 0 and version & 0xFFFF == 0:
            # llama.cpp's test: a big-endian v3 file reads as 0x03000000 here
            raise self._fail(f"GGUF version field is {version:#010x}: a big-endian (byte-swapped) "
                             f"file, which ggforge does not read", 4)
        if version not in SUPPORTED_VERSIONS:
            raise self._fail(f"unsupported GGUF version {version}; supported: "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))}", 4)
        rest = self.file_size - HEADER_SIZE
        need = n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES
        if need > rest:
            raise self._fail(f"header claims {n_tensors} tensors and {n_kv} key/values, which "
                             f"need at least {need} bytes but only {rest} follow the header", 8)
        return n_tensors, n_kv

    def _parse(self, n_tensors: int, n_kv: int) -> None:
        cur = Cursor(self._mm, self.path, HEADER_SIZE)
        self._read_kvs(cur, n_kv)
        self.alignment = self._alignment()
        if n_tensors * MIN_TENSOR_INFO_BYTES > cur.remaining:
            raise cur.fail(f"{n_tensors} tensor infos need at least "
                           f"{n_tensors * MIN_TENSOR_INFO_BYTES} bytes but only "
                           f"{cur.remaining} remain")
        infos = [self._read_tensor_info(cur) for _ in range(n_tensors)]
        self.data_offset = cur.pos + (-cur.pos) % self.alignment
        if n_tensors and self.data_offset > self.file_size:
            raise self._fail(f"data section would start at byte {self.data_offset}, past the end "
                             f"of the {self.file_size}-byte file")
        self._place_tensors(infos)

    def _read_kvs(self, cur: Cursor, n_kv: int) -> None:
        for i in range(n_kv):
            at = cur.pos
            key = cur.string(f"key of key/value {i}", cap=MAX_KEY_BYTES)
            if not key:
                raise cur.fail(f"key/value {i} has an empty key", at)
            if key in self.metadata:
                raise cur.fail(f"duplicate key {key!r} (key/value {i})", at)
            value, vtype, elem = read_value(cur, key)
            self.metadata[key] = value
            self.value_types[key] = (vtype, elem)

    def _alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        vtype, _ = self.value_types["general.alignment"]
        value = self.metadata["general.alignment"]
        if vtype != GGUFValueType.UINT32:
            raise self._fail(f"key 'general.alignment' must be a UINT32, not {vtype.name}")
        if value == 0 or value & (value - 1):
            raise self._fail(f"key 'general.alignment' is {value}, not a power of two")
        return value

    def _read_tensor_info(self, cur: Cursor) -> tuple[TensorInfo, int]:
        """One tensor info. Returns it with its offset relative to the data section
        (TensorInfo.offset is filled in by _place_tensors)."""
        at = cur.pos
        n = cur.u64("tensor name length")
        if n == 0 or n > MAX_NAME_BYTES:
            shown = bytes(cur.buf[cur.pos:cur.pos + min(n, MAX_NAME_BYTES + 1, cur.remaining)])
            raise cur.fail(f"tensor name {shown!r}... is {n} bytes long; GGUF allows 1 to "
                           f"{MAX_NAME_BYTES}", at)
        cur.pos = at
        name = cur.string("tensor name", cap=MAX_NAME_BYTES)
        if name in self.tensors:
            raise cur.fail(f"duplicate tensor name {name!r}", at)
        n_dims = cur.u32(f"n_dims of tensor {name!r}")
        # n_dims 0 is stricter than llama.cpp (which reads it as a 1-element scalar):
        # no writer emits it, and every consumer here expects a row length ne[0].
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        dims = tuple(cur.u64(f"dimension {j} of tensor {name!r}") for j in range(n_dims))
        if any(d > INT64_MAX for d in dims):
            signed = tuple(d - (1 << 64) if d > INT64_MAX else d for d in dims)
            raise cur.fail(f"tensor {name!r} has a negative dimension {signed}")
        ggml_type = self._tensor_type(cur, name)
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        # Zero dimensions are allowed, as in llama.cpp: a zero-element tensor has 0 bytes.
        # The other dims must still be sane: the product of the non-zero dims, in bytes,
        # must fit int64, or numpy (and any loop over rows) would choke on (0, 2**62).
        n_elements, span = 1, 1
        for d in dims:
            n_elements *= d
            span *= max(d, 1)
        if span > INT64_MAX or span * size // block > INT64_MAX:
            raise cur.fail(f"tensor {name!r} dims {dims} multiply to {span} elements, which "
                           f"overflows int64 as a size")
        if dims[0] % block:
            raise cur.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
                           f"{GGMLQuantizationType(ggml_type).name} block size {block}")
        nbytes = n_elements // block * size
        rel = cur.u64(f"data offset of tensor {name!r}")
        info = TensorInfo(name, dims, ggml_type, 0, nbytes)
        self.tensors[name] = info
        return info, rel

    def _tensor_type(self, cur: Cursor, name: str) -> int:
        at = cur.pos
        t = cur.u32(f"type of tensor {name!r}")
        if t in REMOVED_TYPES:
            raise cur.fail(f"tensor {name!r} has type {t} ({REMOVED_TYPES[t]}), which was "
                           f"removed from GGUF; re-quantize the model", at)
        try:
            qtype = GGMLQuantizationType(t)
        except ValueError:
            raise cur.fail(f"tensor {name!r} has unknown ggml type id {t}", at) from None
        if qtype not in GGML_QUANT_SIZES:
            raise cur.fail(f"tensor {name!r} has ggml type {qtype.name} of unknown size", at)
        return t

    def _place_tensors(self, infos: list[tuple[TensorInfo, int]]) -> None:
        """Resolve offsets; check alignment, bounds and overlaps.

        llama.cpp is stricter still: it wants the tensors contiguous in file order. Gaps
        are harmless, so we only refuse what would make two tensors share bytes or read
        past the end of the file."""
        spans: list[tuple[int, int, str]] = []
        for info, rel in infos:
            name = info.name
            if rel % self.alignment:
                raise self._fail(f"tensor {name!r} data offset {rel} is not a multiple of the "
                                 f"alignment {self.alignment}")
            start = self.data_offset + rel
            if start + info.nbytes > self.file_size:
                raise self._fail(f"tensor {name!r} ({info.nbytes} bytes at offset {start}) "
                                 f"extends past the end of the {self.file_size}-byte file")
            self.tensors[name] = TensorInfo(name, info.dims, info.ggml_type, start, info.nbytes)
            if info.nbytes:
                spans.append((start, start + info.nbytes, name))
        spans.sort()
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise self._fail(f"tensors {a!r} and {b!r} overlap (bytes {start_b} to "
                                 f"{end_a})")
