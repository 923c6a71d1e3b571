"""Pre-tokenizers: how a BPE vocabulary's text is cut into words before merging.

llama.cpp names a pre-tokenizer in `tokenizer.ggml.pre` and runs a list of regexes over the
text, each one splitting the pieces the previous one left. The common regexes (GPT-2,
Llama 3, Qwen 2) it runs as hand-written scanners over its own code point classes
(unicode.py); the rest go through std::regex on a "collapsed" text where every non-ASCII
code point stands for its class. The scanners below follow both, including where they
differ from a real regex engine; every stage maps a list of (start, end) character spans
to a finer list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ggforge.runtime.tokenizer.unicode import LETTER, NUMBER, PUNCTUATION, WHITESPACE, flags_of

Spans = list[tuple[int, int]]
Stage = Callable[[str, list[int], int, int, Spans], None]  # (text, flags, start, end, out)

_WLN = WHITESPACE | LETTER | NUMBER


def _gpt2(s: str, fl: list[int], a: int, b: int, out: Spans) -> None:
    """'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    pos = a
    while pos < b:
        c, flags = s[pos], fl[pos]
        end = 0
        if c == "'" and pos + 1 < b:
            c1 = s[pos + 1]
            if c1 in "stmd":
                end = pos + 2
            elif pos + 2 < b and c1 + s[pos + 2] in ("re", "ve", "ll"):
                end = pos + 3
        if not end:
            f2 = (fl[pos + 1] if pos + 1 < b else 0) if c == " " else flags
            for cls in (LETTER, NUMBER):
                if f2 & cls:  # ' ?\p{L}+' and ' ?\p{N}+'
                    end = pos + (c == " ")
                    while end < b and fl[end] & cls:
                        end += 1
                    break
            else:
                if f2 and not f2 & _WLN:  # ' ?[^\s\p{L}\p{N}]+'
                    end = pos + (c == " ")
                    while end < b and not fl[end] & _WLN:
                        end += 1
                else:
                    end = _whitespace(s, fl, pos, b, newline_rule=False)
        out.append((pos, end))
        pos = end


def _whitespace(s: str, fl: list[int], pos: int, b: int, newline_rule: bool) -> int:
    """End of the whitespace token at pos: '\\s*[\\r\\n]+' (Llama 3 / Qwen 2 only), then
    '\\s+(?!\\S)' (a run followed by more text leaves its last space to the next word), '\\s+'."""
    n, last_newline = 0, 0
    while pos + n < b and fl[pos + n] & WHITESPACE:
        if newline_rule and s[pos + n] in "\r\n":
            last_newline = pos + n + 1
        n += 1
    if last_newline:
        return last_newline
    if n > 1 and pos + n < b:
        return pos + n - 1
    return pos + max(n, 1)


def _llama3_like(max_digits: int) -> Stage:
    """(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,max_digits}
    | ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+  (Llama 3: 3 digits, Qwen 2: 1)"""

    def stage(s: str, fl: list[int], a: int, b: int, out: Spans) -> None:
        pos = a
        while pos < b:
            c, flags = s[pos], fl[pos]
            if c == "'" and pos + 1 < b:  # contractions, ASCII case-insensitive
                c1 = s[pos + 1].lower() if s[pos + 1] < "\x80" else ""
                if c1 and c1 in "stmd":
                    out.append((pos, pos + 2))
                    pos += 2
                    continue
                if c1 and pos + 2 < b and s[pos + 2] < "\x80" and c1 + s[pos + 2].lower() in ("re", "ve", "ll"):
                    out.append((pos, pos + 3))
                    pos += 3
                    continue
            if not (c in "\r\n" or flags & NUMBER) and (flags & LETTER or (pos + 1 < b and fl[pos + 1] & LETTER)):
                end = pos + 1
                while end < b and fl[end] & LETTER:
                    end += 1
                out.append((pos, end))
                pos = end
                continue
            if flags & NUMBER:
                end = pos
                while end < b and fl[end] & NUMBER and end - pos < max_digits:
                    end += 1
                out.append((pos, end))
                pos = end
                continue
            f2 = (fl[pos + 1] if pos + 1 < b else 0) if c == " " else flags
            if not f2 & _WLN:  # ' ?[^\s\p{L}\p{N}]+[\r\n]*' (also a lone final space, as llama.cpp)
                end = pos + (c == " ")
                while end < b and not fl[end] & _WLN:
                    end += 1
                while end < b and s[end] in "\r\n":
                    end += 1
            else:
                end = _whitespace(s, fl, pos, b, newline_rule=True)
            out.append((pos, end))
            pos = end

    return stage


def _isolate(match: Callable[[str, int], bool], runs: bool) -> Stage:
    """A std::regex stage: matches of a character class (each character, or maximal runs)
    become pieces of their own, the text between them stays one piece."""

    def stage(s: str, fl: list[int], a: int, b: int, out: Spans) -> None:
        gap = a
        pos = a
        while pos < b:
            if not match(s[pos], fl[pos]):
                pos += 1
                continue
            if gap < pos:
                out.append((gap, pos))
            end = pos + 1
            while runs and end < b and match(s[end], fl[end]):
                end += 1
            out.append((pos, end))
            gap = pos = end
        if gap < b:
            out.append((gap, b))

    return stage


def _ascii_digit_triples(s: str, fl: list[int], a: int, b: int, out: Spans) -> None:
    """'[0-9][0-9][0-9]': leftmost non-overlapping runs of exactly three ASCII digits."""
    gap = pos = a
    while pos + 3 <= b:
        if all("0" <= s[i] <= "9" for i in range(pos, pos + 3)):
            if gap < pos:
                out.append((gap, pos))
            out.append((pos, pos + 3))
            gap = pos = pos + 3
        else:
            pos += 1
    if gap < b:
        out.append((gap, b))


# '\p{P}' of the collapsed text: ASCII punctuation by llama.cpp's own list, else the class
_ASCII_PUNCT = frozenset("!\"#%&'()*,-./:;?@[\\]_{}")
_DEFAULT_PUNCT = _ASCII_PUNCT | frozenset("$+<=>^~|")


def _number(ch: str, flags: int) -> bool:
    return bool(flags & NUMBER)


def _default_punct(ch: str, flags: int) -> bool:
    if ch < "\x80":
        return ch in _DEFAULT_PUNCT
    return bool(flags & PUNCTUATION) and not flags & WHITESPACE


@dataclass(frozen=True)
class PreTokenizer:
    """One `tokenizer.ggml.pre` value: its split stages and the vocabulary flags llama.cpp
    ties to the name (clean_up_tokenization_spaces, ignore_merges, add_bos default)."""
    stages: tuple[Stage, ...]
    clean_spaces: bool = True
    ignore_merges: bool = False
    add_bos: bool = False

    def split(self, text: str) -> list[str]:
        """The words of `text` (a piece between special tokens), in order."""
        if not text:
            return []
        fl = flags_of(text)
        spans: Spans = [(0, len(text))]
        for stage in self.stages:
            out: Spans = []
            for a, b in spans:
                stage(text, fl, a, b, out)
            spans = out
        return [text[a:b] for a, b in spans]


_GPT2 = PreTokenizer((_gpt2,))
_LLAMA3 = PreTokenizer((_llama3_like(3),), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer((_llama3_like(1),), clean_spaces=False)
_DIGITS_GPT2 = (_isolate(_number, runs=False), _gpt2)  # '\p{N}', then GPT-2's
DEFAULT = PreTokenizer((_isolate(_default_punct, runs=True), _gpt2, _isolate(_number, runs=True),
                        _ascii_digit_triples))

# name -> pre-tokenizer; several names share one in llama.cpp, with their own clean_spaces
PRETOKENIZERS: dict[str, PreTokenizer] = {
    "default": DEFAULT,
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "falcon3": _LLAMA3, "pixtral": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
    "smollm": PreTokenizer(_DIGITS_GPT2, clean_spaces=False),
    "command-r": PreTokenizer(_DIGITS_GPT2, clean_spaces=False),
    "starcoder": PreTokenizer(_DIGITS_GPT2), "refact": PreTokenizer(_DIGITS_GPT2),
    "gpt-2": _GPT2, "phi-2": _GPT2, "mpt": _GPT2,
}
