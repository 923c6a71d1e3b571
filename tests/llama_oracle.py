"""llama.cpp (through llama-cpp-python) as the oracle for files we write."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from require import require

llama_cpp = require("llama_cpp")


def load(path: Path, n_ctx: int = 256, cache: str = "f32", flash: bool = False):
    """A llama.cpp context over `path`, all logits kept, 2 threads, F32 KV cache (llama.cpp's
    default F16 cache would add its own rounding to every comparison; cache="f16" asks for
    it, without flash attention unless ``flash``: cache="f16", flash=True are llama.cpp's
    defaults on the CPU)."""
    t = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[cache]
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           n_threads=2, logits_all=True, verbose=False, seed=0,
                           type_k=t, type_v=t, flash_attn=flash)


def logits(path: Path, token_ids: list[int], cache: str = "f32") -> np.ndarray:
    """llama.cpp's logits (n_tokens, n_vocab) for one sequence."""
    llm = load(path, cache=cache)
    try:
        llm.eval(token_ids)
        return np.array(llm.scores[: len(token_ids)], dtype=np.float32)
    finally:
        llm.close()


def logits_stepwise(path: Path, token_ids: list[int], cache: str = "f32") -> np.ndarray:
    """llama.cpp's logits computed one token at a time (its decode path).

    llama.cpp's CPU batch path is not always consistent with itself: on a Q8_0 file a row of
    a batched evaluation can differ from the same token evaluated alone (seen here: the last
    row of a 40-token prompt, by 0.06), since a last-bit difference can flip a rounding in
    the next activation quantization. Generation runs the one-token path, so that is the
    oracle for token-level comparisons.
    """
    llm = load(path, cache=cache)
    try:
        rows = []
        for t in token_ids:
            llm.eval([t])
            rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
        return np.stack(rows)
    finally:
        llm.close()


def greedy(path: Path, token_ids: list[int], n: int, defaults: bool = False) -> list[int]:
    """llama.cpp's greedy continuation of ``token_ids`` (the prompt as one batch, then its
    one-token decode path), up to n tokens or an end-of-generation token; with an F32
    cache, or with ``defaults`` its default F16 cache and flash attention."""
    llm = load(path, cache="f16", flash=True) if defaults else load(path)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    try:
        llm.eval(token_ids)
        out = []
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            out.append(tok)
            llm.eval([tok])
        return out
    finally:
        llm.close()

