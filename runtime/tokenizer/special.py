"""Special tokens inside text: finding them, and the strip attributes that govern them.

Before a text is tokenized, llama.cpp cuts out every occurrence of a control, user-defined
or unknown token's text, longest tokens first, and tokenizes only the pieces between them.
A token with the LSTRIP (RSTRIP) attribute also swallows the whitespace before (after) it.
GGUF carries no strip attributes; llama.cpp sets them from a few model names (below).
"""
from __future__ import annotations

from typing import Any, Union

from ggforge.formats.errors import FormatError
from ggforge.runtime.tokenizer.vocab import CONTROL, LSTRIP, RSTRIP, UNKNOWN, USER_DEFINED, Vocab

Fragment = Union[int, tuple[int, int]]  # a token id, or a (start, end) byte span of raw text
_C_SPACE = frozenset(b" \t\n\v\f\r")  # isspace() in the C locale


def special_tokens(v: Vocab) -> list[int]:
    """Ids cut out of text before tokenizing, longest text first (ties: lower id first;
    llama.cpp's unstable sort leaves ties in no particular order)."""
    ids = [i for i, a in enumerate(v.attrs) if a & (CONTROL | USER_DEFINED | UNKNOWN)]
    return sorted(ids, key=lambda i: -len(v.tokens[i].encode("utf-8")))


def partition(raw: bytes, specials: list[tuple[int, bytes, int]], parse_special: bool) -> list[Fragment]:
    """Cut `raw` at special tokens. `specials`: (id, text, attr) in special_tokens order.
    Without parse_special, control and unknown tokens stay text; user-defined ones are still
    cut out (as Hugging Face tokenizers does)."""
    frags: list[Fragment] = [(0, len(raw))] if raw else []
    for tid, text, attr in specials:
        if not parse_special and attr & (CONTROL | UNKNOWN):
            continue
        if raw.find(text) < 0:  # most tokens are absent: skip the fragment walk
            continue
        out: list[Fragment] = []
        for frag in frags:
            if isinstance(frag, int):
                out.append(frag)
            else:
                _cut(raw, frag[0], frag[1], tid, text, attr, out)
        frags = out
    return frags


def _cut(raw: bytes, start: int, end: int, tid: int, text: bytes, attr: int, out: list[Fragment]) -> None:
    while True:
        at = raw.find(text, start, end)
        if at < 0:
            if start < end:
                out.append((start, end))
            return
        left = at
        if attr & LSTRIP:
            while left > start and raw[left - 1] in _C_SPACE:
                left -= 1
        if left > start:
            out.append((start, left))
        out.append(tid)
        start = at + len(text)
        if attr & RSTRIP:
            while start < end and raw[start] in _C_SPACE:
                start += 1


def set_strip_attributes(v: Vocab, md: dict[str, Any], specials: list[int]) -> None:
    """llama.cpp's per-model strip attributes, chosen by tokenizer.ggml.pre, general.architecture
    or general.name (the only place it keys on names; the file has no such attributes)."""
    pre = str(md.get("tokenizer.ggml.pre") or "")
    arch = str(md.get("general.architecture") or "")
    name = str(md.get("general.name") or "").encode("utf-8").lower().decode("utf-8")  # ASCII lowercase

    def set_attr(text: str, bit: int, on: bool, required: bool = True) -> None:
        i = v.token_to_id.get(text)
        if i is None:
            if required:
                raise FormatError(f"general.name {md.get('general.name')!r} makes llama.cpp treat this as a "
                                  f"Phi-3 vocabulary, which must have a {text!r} token; llama.cpp fails to load it")
            return
        v.attrs[i] = v.attrs[i] | bit if on else v.attrs[i] & ~bit

    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
            any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
        set_attr("<mask>", LSTRIP, True, required=False)
    elif "phi-3" in name or "phi3" in name:
        for i in specials:
            v.attrs[i] |= RSTRIP
        set_attr("</s>", RSTRIP, True)
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            set_attr(text, RSTRIP, False)
    elif "modern-bert" in name:
        set_attr("[MASK]", LSTRIP, True, required=False)
