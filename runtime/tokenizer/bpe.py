"""Byte-level BPE ("gpt2" vocabularies): pre-tokenize, byte-encode, merge by rank.

Each word of the pre-tokenizer is UTF-8 encoded and mapped byte by byte to GPT-2's
printable alphabet, split into characters, and then the adjacent pair with the lowest merge
rank is merged, leftmost first, until no ranked pair is left (llama.cpp's priority queue of
bigrams; a heap with stale entries skipped keeps it O(n log n) in the word length).
Finished symbols that are not in the vocabulary fall back to their single-byte tokens.
"""
from __future__ import annotations

import heapq

from ggforge.runtime.tokenizer.pretokenize import PreTokenizer
from ggforge.runtime.tokenizer.unicode import byte_level, decode_lenient, encode_lenient

_CACHE_LIMIT = 1 << 16  # words; cleared when full (a bounded memo, not an LRU)


def parse_merges(merges: list[str]) -> dict[str, int]:
    """Merge rank by its "left right" string; the first of duplicates keeps its rank.

    llama.cpp splits each merge at its first space after the first character and looks up
    (left, right) pairs. Symbols of byte-level text never contain a space (the byte-level
    alphabet spells it "Ġ"), so looking up left + " " + right in the unsplit strings finds
    exactly the same merges, without splitting 300k strings at load."""
    return dict(zip(reversed(merges), range(len(merges) - 1, -1, -1)))


class BpeModel:
    """Merges and vocabulary of one byte-level BPE tokenizer, with a per-word memo."""

    def __init__(self, token_to_id: dict[str, int], ranks: dict[str, int], pre: PreTokenizer):
        self.token_to_id = token_to_id
        self.ranks = ranks
        self.pre = pre
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: bytes) -> list[int]:
        """Token ids of one piece of raw text (no special tokens in it)."""
        out: list[int] = []
        cache = self._cache
        for word in self.pre.split(decode_lenient(text)):
            ids = cache.get(word)
            if ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                ids = cache[word] = self._word(byte_level(encode_lenient(word)))
            out.extend(ids)
        return out

    def _word(self, word: str) -> list[int]:
        vocab = self.token_to_id
        if self.pre.ignore_merges and word in vocab:
            return [vocab[word]]
        return [i for sym in self._merge(word) for i in self._symbol_ids(sym)]

    def _merge(self, word: str) -> list[str]:
        """Symbols of `word` after all ranked merges."""
        n = len(word)
        if n < 2:
            return [word] if word else []
        ranks = self.ranks
        sym = list(word)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[int, int, int, str]] = []  # (rank, left, right, merged text)

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                rank = ranks.get(sym[left] + " " + sym[right])
                if rank is not None:
                    heapq.heappush(heap, (rank, left, right, sym[left] + sym[right]))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, text = heapq.heappop(heap)
            # stale: one side was merged away or grew since this pair was queued
            if not sym[left] or not sym[right] or sym[left] + sym[right] != text:
                continue
            sym[left], sym[right] = text, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        return [s for s in sym if s]

    def _symbol_ids(self, sym: str) -> list[int]:
        tid = self.token_to_id.get(sym)
        if tid is not None:
            return [tid]
        # llama.cpp looks each UTF-8 byte of the symbol up as a one-byte token text; only
        # ASCII bytes can be one, so the rest of an unknown symbol is dropped
        found = (self.token_to_id.get(chr(b)) for b in sym.encode("utf-8") if b < 0x80)
        return [t for t in found if t is not None]
