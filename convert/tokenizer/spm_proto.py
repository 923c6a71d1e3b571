"""The pieces of a SentencePiece `tokenizer.model`, read as data.

tokenizer.model is a protobuf `ModelProto`; the only part a GGUF needs is its repeated
`pieces` field (piece text, score, type). Reading that by hand keeps the converter free of
the sentencepiece and protobuf packages, and lets us reject a malformed file with a
`FormatError` instead of trusting a C++ parser with untrusted bytes.

    ModelProto      { repeated SentencePiece pieces = 1; ...other fields skipped... }
    SentencePiece   { string piece = 1; float score = 2; Type type = 3 [default = NORMAL]; }
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

from ggforge.formats.errors import FormatError

# SentencePiece's piece types; the same numbers as gguf.TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_MAX_MODEL_BYTES = 1 << 30  # the largest real tokenizer.model files are a few MB


class Piece(NamedTuple):
    text: str
    score: float
    type: int


class _Reader:
    def __init__(self, data: bytes | memoryview, path: Path):
        self.data, self.pos, self.path = memoryview(data), 0, path

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: not a SentencePiece model ({what} at byte {self.pos})")

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise self.fail("truncated or overlong varint")
            b = self.data[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    def take(self, n: int) -> memoryview:
        if n > len(self.data) - self.pos:
            raise self.fail(f"field of {n} bytes past the end")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def fields(self):
        """Yield (field number, wire type, value); value is an int or a memoryview."""
        while self.pos < len(self.data):
            key = self.varint()
            number, wire = key >> 3, key & 7
            if wire == 0:
                value = self.varint()
            elif wire == 1:
                value = self.take(8)
            elif wire == 2:
                value = self.take(self.varint())
            elif wire == 5:
                value = self.take(4)
            else:  # 3/4 are deprecated groups, 6/7 do not exist
                raise self.fail(f"unsupported protobuf wire type {wire}")
            if number == 0:
                raise self.fail("field number 0")
            yield number, wire, value


def _piece(raw: memoryview, path: Path, index: int) -> Piece:
    text, score, ptype = None, 0.0, NORMAL
    for number, wire, value in _Reader(raw, path).fields():
        if number == 1 and wire == 2:
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"{path}: piece {index} is not valid UTF-8") from None
        elif number == 2 and wire == 5:
            score = struct.unpack("<f", value)[0]
        elif number == 3 and wire == 0:
            ptype = value
    if text is None:
        raise FormatError(f"{path}: piece {index} has no text")
    if ptype not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
        raise FormatError(f"{path}: piece {index} ({text!r}) has unknown type {ptype}")
    return Piece(text, score, ptype)


def _fast_piece(data: bytes, pos: int, end: int) -> Piece | None:
    """The piece encoded in data[pos:end] when it has the layout SentencePiece writes
    (text, then score, then an optional one-byte type; each at most once, short lengths);
    None for anything else, which the general reader then takes (and judges)."""
    text, score, ptype = None, 0.0, NORMAL
    while pos < end:
        key = data[pos]
        if key == 0x0A and text is None:                 # field 1, length-delimited
            n = data[pos + 1] if pos + 1 < end else 0x80
            if n & 0x80 or pos + 2 + n > end:
                return None
            try:
                text = data[pos + 2:pos + 2 + n].decode("utf-8")
            except UnicodeDecodeError:
                return None
            pos += 2 + n
        elif key == 0x15 and pos + 5 <= end:             # field 2, fixed32
            score = _F32.unpack_from(data, pos + 1)[0]
            pos += 5
        elif key == 0x18 and pos + 2 <= end and data[pos + 1] < 0x80:   # field 3, varint
            ptype = data[pos + 1]
            pos += 2
        else:
            return None
    if text is None or ptype not in _TYPES:
        return None
    return Piece(text, score, ptype)


_F32 = struct.Struct("<f")
_TYPES = frozenset((NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE))


def read_pieces(path: Path) -> list[Piece]:
    """Every piece of the SentencePiece model at `path`, in id order.

    The usual layout of a piece is read by a tight loop over the bytes (_fast_piece: a
    262k-piece model in a fraction of a second); any other piece goes through the
    general protobuf reader, which gives the same piece or names what is wrong."""
    size = path.stat().st_size
    if size > _MAX_MODEL_BYTES:
        raise FormatError(f"{path}: {size} bytes is too large for a SentencePiece model")
    data = path.read_bytes()
    pieces: list[Piece] = []
    reader = _Reader(data, path)
    pos, size = 0, len(data)
    while pos < size:
        if data[pos] == 0x0A:                   # ModelProto field 1 (pieces), length-delimited
            q, length, shift = pos + 1, 0, 0
            while q < size and data[q] & 0x80 and shift < 28:
                length |= (data[q] & 0x7F) << shift
                q, shift = q + 1, shift + 7
            if q < size and not data[q] & 0x80 and q + 1 + (length | data[q] << shift) <= size:
                length |= data[q] << shift
                start, pos = q + 1, q + 1 + length
                piece = _fast_piece(data, start, pos)
                if piece is None:
                    piece = _piece(memoryview(data)[start:pos], path, len(pieces))
                pieces.append(piece)
                continue
        reader.pos = pos                        # any other field, or a malformed one
        number, wire, value = next(reader.fields())
        if number == 1 and wire == 2:
            pieces.append(_piece(value, path, len(pieces)))
        pos = reader.pos
    if not pieces:
        raise FormatError(f"{path}: SentencePiece model without pieces")
    return pieces


def read_pieces_general(path: Path) -> list[Piece]:
    """read_pieces through the general reader alone (the reference for the fast path)."""
    data = path.read_bytes()
    pieces: list[Piece] = []
    for number, wire, value in _Reader(data, path).fields():
        if number == 1 and wire == 2:
            pieces.append(_piece(value, path, len(pieces)))
    if not pieces:
        raise FormatError(f"{path}: SentencePiece model without pieces")
    return pieces
