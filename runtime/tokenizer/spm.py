"""SentencePiece-style tokenization ("llama" vocabularies: Llama 2, Mistral, Gemma).

llama.cpp does not run SentencePiece itself. It escapes spaces as U+2581 ("▁"), starts from
one symbol per UTF-8 character and keeps merging the adjacent pair whose concatenation is
in the vocabulary with the highest score (ties: leftmost), over the whole text piece; no
pre-splitting. A finished symbol that is not a token is spelled with byte tokens <0xXX>.
"""
from __future__ import annotations

import heapq

from ggforge.formats.errors import FormatError
from ggforge.runtime.tokenizer.unicode import utf8_len

SPACE = "\u2581".encode()


class SpmModel:
    """Scores and vocabulary of one SentencePiece-style tokenizer.

    The symbols of invalid UTF-8 input are byte runs, not characters; they are held as
    str with each undecodable byte as a lone surrogate (errors="surrogateescape"), so the
    vocabulary's own str -> id map serves for lookups (a second map keyed by bytes would
    cost ~30 MiB for a 262k-token vocabulary). A symbol holding a surrogate, and any
    concatenation containing it, is invalid UTF-8 as bytes too: neither matches a token."""

    def __init__(self, token_to_id: dict[str, int], scores):
        self.token_to_id = token_to_id   # shared with the Vocab
        self.scores = scores
        self._byte_ids: dict[int, int] = {}

    def encode(self, text: bytes) -> list[int]:
        """Token ids of one piece of raw text, spaces already escaped by the caller."""
        sym = _symbols(text)
        n = len(sym)
        if not n:
            return []
        vocab, scores = self.token_to_id, self.scores
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, merged length)

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                merged = sym[left] + sym[right]
                tid = vocab.get(merged)
                if tid is not None:
                    heapq.heappush(heap, (-scores[tid], left, right, len(merged)))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = sym[left], sym[right]
            # stale: a side was merged away, or grew (then the total length differs)
            if not a or not b or len(a) + len(b) != size:
                continue
            sym[left], sym[right] = a + b, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])

        out: list[int] = []
        for s in sym:
            if s:
                tid = vocab.get(s)
                if tid is not None:
                    out.append(tid)
                else:
                    out.extend(self.byte_token(b) for b in s.encode("utf-8", "surrogateescape"))
        return out

    def byte_token(self, byte: int) -> int:
        """<0xXX>, else the one-byte token text (llama_vocab::byte_to_token)."""
        tid = self._byte_ids.get(byte)
        if tid is None:
            tid = self.token_to_id.get(f"<0x{byte:02X}>")
            if tid is None and byte < 0x80:   # a token whose text is that one byte
                tid = self.token_to_id.get(chr(byte))
            if tid is None:
                raise FormatError(f"tokenizer.ggml.tokens has no byte token <0x{byte:02X}> (nor the byte "
                                  "itself) to spell text the vocabulary cannot; the vocabulary is incomplete")
            self._byte_ids[byte] = tid
        return tid


def _symbols(text: bytes) -> list[str]:
    """One symbol per UTF-8 sequence, its length read from the lead byte alone (bytes
    that do not decode as lone surrogates)."""
    try:
        return list(text.decode("utf-8"))
    except UnicodeDecodeError:
        pass
    out, i, n = [], 0, len(text)
    while i < n:
        k = min(utf8_len(text[i]), n - i)
        out.append(text[i:i + k].decode("utf-8", "surrogateescape"))
        i += k
    return out
