"""Unicode as llama.cpp's tokenizer sees it: code point classes, UTF-8, GPT-2 byte chars.

llama.cpp does not use a Unicode regex library. It classifies each code point once, from a
table generated from UnicodeData.txt of Unicode 15.1, into one general-category class
(letter, number, punctuation, ...) plus a separate whitespace flag, and its pre-tokenizers
test those flags. We derive the same flags from Python's `unicodedata` and patch the
difference between the Python's Unicode version and 15.1:

- ADDED_IN_15: code points assigned in Unicode 15.0 / 15.1, unknown to Python 3.11's
  Unicode 14 (applied unconditionally; they are llama.cpp's values on any Python);
- NEWER_THAN_15_1: code points assigned after 15.1 (a newer Python knows them), which
  llama.cpp still calls undefined.

On Python 3.10 (Unicode 13) the characters new in Unicode 14 stay undefined, unlike llama.cpp.
"""
from __future__ import annotations

import bisect
import unicodedata

# llama.cpp's unicode_cpt_flags bits (category bits are exclusive; WHITESPACE is extra)
UNDEFINED, NUMBER, LETTER, SEPARATOR = 0x0001, 0x0002, 0x0004, 0x0008
MARK, PUNCTUATION, SYMBOL, CONTROL = 0x0010, 0x0020, 0x0040, 0x0080
WHITESPACE = 0x0100
CATEGORY_MASK = 0x00FF

_CATEGORY_FLAG = {
    "Cn": UNDEFINED, "Cc": CONTROL, "Cf": CONTROL, "Co": CONTROL, "Cs": CONTROL,
    "Lu": LETTER, "Ll": LETTER, "Lt": LETTER, "Lm": LETTER, "Lo": LETTER,
    "Mn": MARK, "Mc": MARK, "Me": MARK, "Nd": NUMBER, "Nl": NUMBER, "No": NUMBER,
    "Pc": PUNCTUATION, "Pd": PUNCTUATION, "Ps": PUNCTUATION, "Pe": PUNCTUATION,
    "Pi": PUNCTUATION, "Pf": PUNCTUATION, "Po": PUNCTUATION,
    "Sm": SYMBOL, "Sc": SYMBOL, "Sk": SYMBOL, "So": SYMBOL,
    "Zs": SEPARATOR, "Zl": SEPARATOR, "Zp": SEPARATOR,
}

# PropList.txt White_Space, as llama.cpp lists it
WHITESPACE_CPTS = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                             0x2028, 0x2029, 0x202F, 0x205F, 0x3000])

N, L, M, P, S, C = NUMBER, LETTER, MARK, PUNCTUATION, SYMBOL, CONTROL
# (first, last, class) assigned in Unicode 15.0 and 15.1
ADDED_IN_15 = (
    (0x00CF3, 0x00CF3, M), (0x00ECE, 0x00ECE, M), (0x02FFC, 0x02FFF, S), (0x031EF, 0x031EF, S),
    (0x10EFD, 0x10EFF, M), (0x1123F, 0x11240, L), (0x11241, 0x11241, M), (0x11B00, 0x11B09, P),
    (0x11F00, 0x11F01, M), (0x11F02, 0x11F02, L), (0x11F03, 0x11F03, M), (0x11F04, 0x11F10, L),
    (0x11F12, 0x11F33, L), (0x11F34, 0x11F3A, M), (0x11F3E, 0x11F42, M), (0x11F43, 0x11F4F, P),
    (0x11F50, 0x11F59, N), (0x1342F, 0x1342F, L), (0x13439, 0x1343F, C), (0x13440, 0x13440, M),
    (0x13441, 0x13446, L), (0x13447, 0x13455, M), (0x1B132, 0x1B132, L), (0x1B155, 0x1B155, L),
    (0x1D2C0, 0x1D2D3, N), (0x1DF25, 0x1DF2A, L), (0x1E030, 0x1E06D, L), (0x1E08F, 0x1E08F, M),
    (0x1E4D0, 0x1E4EB, L), (0x1E4EC, 0x1E4EF, M), (0x1E4F0, 0x1E4F9, N), (0x1F6DC, 0x1F6DC, S),
    (0x1F774, 0x1F776, S), (0x1F77B, 0x1F77F, S), (0x1F7D9, 0x1F7D9, S), (0x1FA75, 0x1FA77, S),
    (0x1FA87, 0x1FA88, S), (0x1FAAD, 0x1FAAF, S), (0x1FABB, 0x1FABD, S), (0x1FABF, 0x1FABF, S),
    (0x1FACE, 0x1FACF, S), (0x1FADA, 0x1FADB, S), (0x1FAE8, 0x1FAE8, S), (0x1FAF7, 0x1FAF8, S),
    (0x2B739, 0x2B739, L), (0x2EBF0, 0x2EE5D, L), (0x31350, 0x323AF, L),
)
# (first, last) assigned in Unicode 16 and 17: undefined for llama.cpp
NEWER_THAN_15_1 = (
    (0x0088F, 0x0088F), (0x00897, 0x00897), (0x00C5C, 0x00C5C), (0x00CDC, 0x00CDC),
    (0x01ACF, 0x01ADD), (0x01AE0, 0x01AEB), (0x01B4E, 0x01B4F), (0x01B7F, 0x01B7F),
    (0x01C89, 0x01C8A), (0x020C1, 0x020C1), (0x02427, 0x02429), (0x02B96, 0x02B96),
    (0x031E4, 0x031E5), (0x0A7CB, 0x0A7CF), (0x0A7D2, 0x0A7D2), (0x0A7D4, 0x0A7D4),
    (0x0A7DA, 0x0A7DC), (0x0A7F1, 0x0A7F1), (0x0FBC3, 0x0FBD2), (0x0FD90, 0x0FD91),
    (0x0FDC8, 0x0FDCE), (0x105C0, 0x105F3), (0x10940, 0x10959), (0x10D40, 0x10D65),
    (0x10D69, 0x10D85), (0x10D8E, 0x10D8F), (0x10EC2, 0x10EC7), (0x10ED0, 0x10ED8),
    (0x10EFA, 0x10EFC), (0x11380, 0x11389), (0x1138B, 0x1138B), (0x1138E, 0x1138E),
    (0x11390, 0x113B5), (0x113B7, 0x113C0), (0x113C2, 0x113C2), (0x113C5, 0x113C5),
    (0x113C7, 0x113CA), (0x113CC, 0x113D5), (0x113D7, 0x113D8), (0x113E1, 0x113E2),
    (0x116D0, 0x116E3), (0x11B60, 0x11B67), (0x11BC0, 0x11BE1), (0x11BF0, 0x11BF9),
    (0x11DB0, 0x11DDB), (0x11DE0, 0x11DE9), (0x11F5A, 0x11F5A), (0x13460, 0x143FA),
    (0x16100, 0x16139), (0x16D40, 0x16D79), (0x16EA0, 0x16EB8), (0x16EBB, 0x16ED3),
    (0x16FF2, 0x16FF6), (0x187F8, 0x187FF), (0x18CFF, 0x18CFF), (0x18D09, 0x18D1E),
    (0x18D80, 0x18DF2), (0x1CC00, 0x1CCFC), (0x1CD00, 0x1CEB3), (0x1CEBA, 0x1CED0),
    (0x1CEE0, 0x1CEF0), (0x1E5D0, 0x1E5FA), (0x1E5FF, 0x1E5FF), (0x1E6C0, 0x1E6DE),
    (0x1E6E0, 0x1E6F5), (0x1E6FE, 0x1E6FF), (0x1F6D8, 0x1F6D8), (0x1F777, 0x1F77A),
    (0x1F8B2, 0x1F8BB), (0x1F8C0, 0x1F8C1), (0x1F8D0, 0x1F8D8), (0x1FA54, 0x1FA57),
    (0x1FA89, 0x1FA8A), (0x1FA8E, 0x1FA8F), (0x1FABE, 0x1FABE), (0x1FAC6, 0x1FAC6),
    (0x1FAC8, 0x1FAC8), (0x1FACD, 0x1FACD), (0x1FADC, 0x1FADC), (0x1FADF, 0x1FADF),
    (0x1FAE9, 0x1FAEA), (0x1FAEF, 0x1FAEF), (0x1FBCB, 0x1FBEF), (0x1FBFA, 0x1FBFA),
    (0x2B73A, 0x2B73F), (0x2CEA2, 0x2CEAD), (0x323B0, 0x33479),
)
_OVERRIDES = sorted([*ADDED_IN_15, *((a, b, UNDEFINED) for a, b in NEWER_THAN_15_1)])
_OVERRIDE_STARTS = [r[0] for r in _OVERRIDES]

_flag_cache: dict[str, int] = {}


def _compute_flags(ch: str) -> int:
    cp = ord(ch)
    i = bisect.bisect_right(_OVERRIDE_STARTS, cp) - 1
    if i >= 0 and cp <= _OVERRIDES[i][1]:
        flags = _OVERRIDES[i][2]
    else:
        flags = _CATEGORY_FLAG[unicodedata.category(ch)]
    return flags | (WHITESPACE if cp in WHITESPACE_CPTS else 0)


def char_flags(ch: str) -> int:
    """llama.cpp's unicode_cpt_flags of one character (category bit | WHITESPACE)."""
    f = _flag_cache.get(ch)
    if f is None:
        f = _flag_cache[ch] = _compute_flags(ch)
    return f


def flags_of(text: str) -> list[int]:
    """char_flags for every character of `text`, cached per character."""
    get = _flag_cache.get
    out = [get(ch) for ch in text]
    if None in out:
        out = [char_flags(ch) for ch in text]
    return out


# -- UTF-8 as llama.cpp reads it ----------------------------------------------------------------
def utf8_len(lead: int) -> int:
    """Bytes in the UTF-8 sequence a lead byte announces (continuation bytes count as 1)."""
    return (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[lead >> 4]


def decode_lenient(data: bytes) -> str:
    """unicode_cpts_from_utf8: each undecodable byte becomes U+FFFD; surrogates and overlong
    forms are accepted as decoded (they come back out through encode_lenient)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out, i, n = [], 0, len(data)
    while i < n:
        b0 = data[i]
        if b0 < 0x80:
            out.append(chr(b0))
            i += 1
            continue
        # a continuation byte as lead, or 0xF8-0xFF, is invalid; else 1-3 continuation bytes
        need = 0 if b0 & 0x40 == 0 else 1 if b0 & 0x20 == 0 else 2 if b0 & 0x10 == 0 else \
            3 if b0 & 0x08 == 0 else 0
        tail = data[i + 1:i + 1 + need]
        if need == 0 or len(tail) < need or any(t & 0xC0 != 0x80 for t in tail):
            out.append("\ufffd")
            i += 1
            continue
        cp = b0 & (0, 0x1F, 0x0F, 0x07)[need]
        for t in tail:
            cp = (cp << 6) | (t & 0x3F)
        if cp > 0x10FFFF:
            raise ValueError(f"text holds a UTF-8 sequence for code point {cp:#x}, past U+10FFFF")
        out.append(chr(cp))
        i += 1 + need
    return "".join(out)


def encode_lenient(text: str) -> bytes:
    """UTF-8 of text from decode_lenient (lone surrogates encoded as llama.cpp does)."""
    return text.encode("utf-8", "surrogatepass")


# -- GPT-2 byte-level alphabet ------------------------------------------------------------------
def _byte_chars() -> list[str]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, n = {}, 0
    for b in printable:
        chars[b] = chr(b)
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


BYTE_TO_CHAR = _byte_chars()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# latin-1 char of a byte -> its byte-level char, for str.translate
_BYTE_LEVEL_TABLE = {b: c for b, c in enumerate(BYTE_TO_CHAR)}


def byte_level(data: bytes) -> str:
    """GPT-2's reversible byte -> printable-character encoding of `data`."""
    return data.decode("latin-1").translate(_BYTE_LEVEL_TABLE)
