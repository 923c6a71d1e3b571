"""Token ids back to bytes: llama_token_to_piece and llama_detokenize.

A piece is what one token contributes to the text: control, unknown and user-defined tokens
their raw text; byte tokens <0xXX> their byte; ordinary tokens their text with "▁" turned
back into spaces (SentencePiece) or GPT-2's byte alphabet decoded (BPE). Pieces are bytes
because a byte token may be a fragment of a UTF-8 sequence.
"""
from __future__ import annotations

from ggforge.runtime.tokenizer.unicode import CHAR_TO_BYTE
from ggforge.runtime.tokenizer.vocab import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED

SPECIAL = UNKNOWN | CONTROL


def piece(text: str, attr: int, byte_level: bool) -> bytes:
    """The piece of one token as llama.cpp renders it with special=true."""
    if attr & (SPECIAL | USER_DEFINED):
        return text.encode("utf-8")
    if attr & NORMAL:
        return _unbyte(text) if byte_level else text.replace("\u2581", " ").encode("utf-8")
    if attr & BYTE:
        return bytes([_strtol_hex(text.encode("utf-8")[3:5]) & 0xFF])
    return b""  # unused and untyped tokens render as nothing


def _unbyte(text: str) -> bytes:
    """GPT-2 byte-level text -> bytes; a character outside the alphabet becomes llama.cpp's
    marker "[UNK_BYTE_0x<its UTF-8 in hex><the whole token text>]"."""
    out = bytearray()
    for ch in text:
        b = CHAR_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)


def _strtol_hex(s: bytes) -> int:
    """C strtol(s, NULL, 16) on the two characters after "<0x" of a byte token's text."""
    s = s.lstrip(b" \t\n\v\f\r")
    sign = -1 if s[:1] == b"-" else 1
    s = s[1:] if s[:1] in (b"-", b"+") else s
    if s[:2].lower() == b"0x" and len(s) > 2 and chr(s[2]) in "0123456789abcdefABCDEF":
        s = s[2:]
    digits = b""
    for c in s:
        if chr(c) not in "0123456789abcdefABCDEF":
            break
        digits += bytes([c])
    return sign * int(digits, 16) if digits else 0


def clean_spaces(text: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces, three passes over the bytes: drop the space
    before ? ! . , ; turn " ' " into "'"; drop the space before 's 'm 're 've."""
    buf = bytearray(text)
    n = _pass(buf, len(buf), _punct)
    n = _pass_quote(buf, n)
    n = _pass(buf, n, _contraction)
    return bytes(buf[:n])


def _pass(buf: bytearray, total: int, drop_space_before) -> int:
    if not total:
        return 0
    out = 1
    for i in range(1, total):
        x = buf[i]
        if buf[i - 1] == 0x20 and drop_space_before(buf, i, total):
            out -= 1
        buf[out] = x
        out += 1
    return out


def _punct(buf: bytearray, i: int, total: int) -> bool:
    return buf[i] in b"?!.,"


def _contraction(buf: bytearray, i: int, total: int) -> bool:
    if buf[i] != 0x27 or i + 1 >= total:
        return False
    if buf[i + 1] in b"sm":
        return True
    return i + 2 < total and bytes(buf[i + 1:i + 3]) in (b"re", b"ve")


def _pass_quote(buf: bytearray, total: int) -> int:
    """Second pass, in place like llama.cpp's: the space after the quote is overwritten with
    NUL and skipped, so the next character sees NUL (not a space) before it."""
    if not total:
        return 0
    out, i = 1, 1
    while i < total:
        x = buf[i]
        if x == 0x27 and i + 1 < total and buf[i - 1] == 0x20 and buf[i + 1] == 0x20:
            out -= 1
            i += 1
            buf[i] = 0
        buf[out] = x
        out += 1
        i += 1
    return out
