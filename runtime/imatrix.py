"""The importance matrix, computed as llama.cpp's llama-imatrix computes it.

    tokens = text_tokens(tokenizer, read_text("calibration.txt"))
    chunks = make_chunks(tokens, 512, bos=tokenizer.bos_id)         # (n_chunk, 512)
    result = compute_imatrix(model, chunks, dataset="calibration.txt")
    write_imatrix(result.data, "imatrix.gguf")                        # formats/imatrix_writer.py

What is collected follows tools/imatrix/imatrix.cpp (llama.cpp bundled with llama-cpp-python
0.3.36), collect_imatrix and compute_imatrix:

- the text is tokenized whole, with the special tokens the vocabulary adds (BOS), special
  token text not parsed unless asked (--parse-special); one trailing newline of the file is
  dropped, as common's -f does;
- it must give at least two chunks of n_ctx tokens; chunk i is tokens[i*n_ctx:(i+1)*n_ctx]
  with its first token replaced by BOS where the vocabulary adds one, evaluated from an
  empty KV cache with every position's logits asked for (so the last layer's FFN sees all
  rows);
- a dense product (GGML_OP_MUL_MAT) is collected when its weight's name starts with "blk."
  (or is output.weight with process_output; a tied head multiplies token_embd.weight, which
  is never collected) and it has at least 16 rows; every row adds x*x to the sums, in row
  order in float32, and one to the count;
- an expert product (GGML_OP_MUL_MAT_ID) is always collected: each (token, slot) adds its
  row to the expert it was routed to (``Collector.collect_experts``; no MoE model runs
  here yet);
- a non-finite sum stops the run; chunk_count is the largest count over chunk_size.

The perplexity llama-imatrix prints (--ppl, its default) is over the second half of each
chunk, from the same logits.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ggforge.formats.errors import FormatError, UnsupportedModelError
from ggforge.formats.imatrix_writer import ImatrixData, ImatrixEntry

log = logging.getLogger(__name__)

F32 = np.float32
MIN_ROWS = 16  # collect_imatrix: "why are small batches ignored (<16 tokens)?"


def read_text(path: str | Path) -> bytes:
    """The calibration text's bytes, one trailing newline dropped (common's -f)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read the text file: {e.strerror or e}") from None
    return raw[:-1] if raw.endswith(b"\n") else raw


def text_tokens(tokenizer, text: bytes | str, *, parse_special: bool = False) -> list[int]:
    """common_tokenize(ctx, text, add_special=true, parse_special): the whole text's ids."""
    if tokenizer.add_eos:   # llama-imatrix asserts that the vocabulary adds no EOS
        raise UnsupportedModelError("the model's tokenizer adds an EOS token to every text; "
                                    "llama-imatrix refuses such models (tokenizer.ggml.add_eos_token)")
    return tokenizer.encode(text, add_special=True, parse_special=parse_special)


def make_chunks(tokens, n_ctx: int, *, n_chunks: int = -1, from_chunk: int = 0,
                bos: int | None = None, what: str = "the text") -> np.ndarray:
    """The chunks llama-imatrix evaluates: (n_chunk, n_ctx) int64, each chunk's first token
    set to ``bos`` (None: the vocabulary adds no BOS). ``n_chunks`` < 0: all whole chunks;
    ``from_chunk``: skip that many chunks first (--chunk)."""
    if n_ctx < MIN_ROWS:
        raise ValueError(f"context size {n_ctx} is below {MIN_ROWS}: llama-imatrix collects no "
                         f"product of fewer than {MIN_ROWS} rows; use -c {MIN_ROWS} or more")
    tokens = np.asarray(tokens, dtype=np.int64)
    if from_chunk > 0:
        if (from_chunk + 2) * n_ctx >= tokens.size:
            raise ValueError(f"{what}: {tokens.size} tokens; there will be not enough left after "
                             f"skipping {from_chunk} chunks of {n_ctx}")
        tokens = tokens[from_chunk * n_ctx:]
    if tokens.size < 2 * n_ctx:
        raise ValueError(f"{what} tokenizes to only {tokens.size} tokens; a context of {n_ctx} "
                         f"needs at least {2 * n_ctx} (two chunks, as llama-imatrix); give more "
                         "text or a smaller -c")
    n_max = tokens.size // n_ctx
    n = n_max if n_chunks < 0 else min(n_chunks, n_max)
    if n == 0:
        raise ValueError(f"{what}: --chunks 0 leaves no chunk to process (-1: all of them)")
    chunks = tokens[: n * n_ctx].reshape(n, n_ctx).copy()           # (n_chunk, n_ctx)
    if bos is not None:
        chunks[:, 0] = bos
    return chunks


class Collector:
    """Sums of squared activations per weight: ``Model.forward(collect=collector)``."""

    def __init__(self, process_output: bool = False):
        self.process_output = process_output
        self.entries: dict[str, ImatrixEntry] = {}

    def wants(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def __call__(self, name: str, x: np.ndarray) -> None:
        """A dense product's input x (rows, n_in) float32."""
        if x.ndim != 2 or x.shape[0] < MIN_ROWS or not self.wants(name):
            return
        n_in = x.shape[1]
        e = self.entries.get(name)
        if e is None:
            e = self.entries[name] = ImatrixEntry.empty(n_in)
        elif e.sums.shape != (1, n_in):
            raise ValueError(f"imatrix: inconsistent size for {name}: {e.sums.size} sums, the "
                             f"product has {n_in} columns")
        sq = x.astype(F32) * x.astype(F32)                              # (rows, n_in)
        sq[0] += e.sums[0]          # acc += x*x row by row: the same order, the same roundings
        e.sums[0] = sq.sum(axis=0)  # a reduction over the outer axis adds the rows in order
        e.counts += x.shape[0]
        self._check(name, e.sums)

    def collect_experts(self, name: str, x: np.ndarray, ids: np.ndarray, n_expert: int) -> None:
        """An expert product's input: x (n_tokens, n_x, n_in) float32 with n_x 1 (the same
        row for every slot) or n_used; ids (n_tokens, n_used) the experts each token was
        routed to. Each (token, slot) adds its row to its expert's sums and count."""
        n_tokens, n_x, n_in = x.shape
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] != n_tokens:
            raise ValueError(f"imatrix: {name}: ids of shape {ids.shape} for {n_tokens} tokens")
        if ids.size and (ids.min() < 0 or ids.max() >= n_expert):
            raise ValueError(f"imatrix: {name}: an expert id outside 0..{n_expert - 1}")
        e = self.entries.get(name)
        if e is not None and e.counts.size == 1 and n_expert > 1:    # an old dense entry
            e.counts = np.full(n_expert, e.counts[0], np.int64)
        if e is None:
            e = self.entries[name] = ImatrixEntry.empty(n_in, n_expert)
        elif e.sums.shape != (n_expert, n_in):
            raise ValueError(f"imatrix: inconsistent size for {name}: {e.sums.shape} sums, the "
                             f"product has {n_expert} experts of {n_in} columns")
        touched = np.zeros(n_expert, bool)
        for slot in range(ids.shape[1]):          # slot-major, then tokens: C's loop order
            ex = ids[:, slot]                                           # (n_tokens,)
            rows = x[:, slot % n_x].astype(F32)                         # (n_tokens, n_in)
            np.add.at(e.sums, ex, rows * rows)    # unbuffered: one row after another
            e.counts += np.bincount(ex, minlength=n_expert)
            touched[ex] = True
        self._check(name, e.sums[touched])

    @staticmethod
    def _check(name: str, sums: np.ndarray) -> None:
        if not np.all(np.isfinite(sums)):
            raise ValueError(f"imatrix: non-finite values detected in {name} (the model's "
                             "activations overflow float32)")

    def data(self, chunk_size: int, datasets: list[str]) -> ImatrixData:
        """The collected statistics as a file's contents."""
        top = max((int(e.counts.max()) for e in self.entries.values() if e.counts.size), default=0)
        return ImatrixData(dict(self.entries), list(datasets), top // chunk_size, chunk_size)


@dataclass
class ImatrixResult:
    """An importance matrix and the perplexity over the chunks' second halves."""

    data: ImatrixData
    n_chunks: int
    ppl: float | None = None
    ppl_error: float | None = None


class _Perplexity:
    """llama-imatrix's estimate: -log p of tokens first+1..n_ctx-1 of each chunk from the
    logits at first..n_ctx-2, first = n_ctx // 2; float64 sums."""

    def __init__(self):
        self.nll = self.nll2 = 0.0
        self.count = 0

    def add(self, logits: np.ndarray, targets: np.ndarray) -> None:
        lg = logits.astype(np.float64)                                  # (k, n_vocab)
        top = lg.max(axis=1, keepdims=True)
        logp = lg[np.arange(len(targets)), targets] - top[:, 0] - np.log(np.exp(lg - top).sum(axis=1))
        self.nll += float(-logp.sum())
        self.nll2 += float((logp * logp).sum())
        self.count += len(targets)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count)

    def error(self) -> float | None:
        mean, mean2 = self.nll / self.count, self.nll2 / self.count
        var = mean2 - mean * mean
        return math.sqrt(var / (self.count - 1)) * self.ppl if var > 0 and self.count > 1 else None


def compute_imatrix(model, chunks: np.ndarray, *, dataset: str, process_output: bool = False,
                    compute_ppl: bool = True, cache_types: tuple[str, str] = ("f32", "f32"),
                    flash_attn: bool = False,
                    progress: Callable[[int, float | None], None] | None = None) -> ImatrixResult:
    """Evaluate each chunk (n_chunk, n_ctx) of ``model`` (runtime/model.py, every layer on
    the CPU) from an empty cache and collect the inputs of its matrix products.

    The perplexity scores the chunks' own tokens: llama-imatrix scores the text's, which
    differ only at position 0 (BOS), never scored. ``progress(i, ppl)`` is called after
    each chunk. ``cache_types``: the KV cache's key and value types ('f32', 'f16': what
    llama.cpp uses by default)."""
    if model.gpu is not None:
        raise ValueError("imatrix runs every layer on the CPU: the GPU backend's matrix "
                         "products are not observable yet; use --gpu-layers 0")
    chunks = np.asarray(chunks, dtype=np.int64)
    n_chunk, n_ctx = chunks.shape
    collector = Collector(process_output)
    ppl = _Perplexity() if compute_ppl else None
    cache = model.new_cache(n_ctx, *cache_types, flash_attn)
    first = n_ctx // 2
    for i, chunk in enumerate(chunks):
        cache.truncate(0)
        logits = model.forward(chunk, cache, all_logits=compute_ppl or process_output,
                               collect=collector)                      # (n_ctx, n_vocab)
        if ppl is not None:
            ppl.add(logits[first:n_ctx - 1], chunk[first + 1:])
        if progress is not None:
            progress(i, None if ppl is None else ppl.ppl)
    result = ImatrixResult(collector.data(n_ctx, [dataset]), n_chunk)
    if ppl is not None:
        result.ppl, result.ppl_error = ppl.ppl, ppl.error()
        log.info("imatrix: %d chunks of %d, PPL = %.4f", n_chunk, n_ctx, result.ppl)
    return result


__all__ = ["Collector", "ImatrixResult", "MIN_ROWS", "compute_imatrix", "make_chunks",
           "read_text", "text_tokens"]
