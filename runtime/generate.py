"""Loading a model and generating text: `ggforge.load(path).generate(prompt)`.

    m = ggforge.load("model.gguf")
    for piece in m.generate("Once upon a time", max_tokens=64):
        print(piece, end="")
    logits = m.eval(token_ids)          # (n_tokens, n_vocab) float32

The KV cache lives as long as the model; a prompt that extends the previous one (the next
turn of a chat) reuses the cached prefix and evaluates only the new tokens. A full context
raises ContextFullError (no silent context shift).
"""
from __future__ import annotations

import codecs
import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ggforge.runtime.kv_cache import ContextFullError, cache_dtype
from ggforge.runtime.model import Model
from ggforge.runtime.sampling import Sampler, SamplerSettings
from ggforge.runtime.tokenizer import Tokenizer

DEFAULT_CTX_CAP = 4096


class LoadedModel:
    """A model, its tokenizer and one KV cache."""

    def __init__(self, path: str | Path, *, n_ctx: int | None = None,
                 gpu_layers: int | str = 0, gpu_memory: int | None = None, device=None,
                 cache_type_k: str = "f16", cache_type_v: str = "f16", flash_attn: str = "auto"):
        self.cache_types = (cache_dtype(cache_type_k), cache_dtype(cache_type_v))  # checked first
        self.flash_attn = resolve_flash_attn(flash_attn, self.cache_types)
        self.model = Model(path)  # checks the metadata before building anything on it
        try:
            self.tokenizer = Tokenizer.from_metadata(self.model.gguf.metadata)
            c = self.model.config
            self.n_ctx = int(n_ctx or min(c.n_ctx_train, DEFAULT_CTX_CAP))
            if self.n_ctx < 1:
                where = "" if n_ctx else f" ({c.arch}.context_length in the file; pass --ctx-size)"
                raise ValueError(f"context size must be at least 1, got {self.n_ctx}{where}")
            self.model.n_ctx_seq = self.n_ctx   # what rope factors follow (Phi-3 longrope)
            self.plan = None
            if gpu_layers not in (0, "0"):
                self.plan = plan_offload(self.model, self.n_ctx, gpu_layers, gpu_memory, device,
                                         tuple(t.itemsize for t in self.cache_types))
                self.model.offload(self.plan.gpu_layers, device)
            self.cache = self.model.new_cache(self.n_ctx, *self.cache_types, self.flash_attn)
        except BaseException:
            self.model.close()
            raise
        self._cached: list[int] = []  # the tokens whose keys and values the cache holds
        self._template = None          # the file's chat template, compiled at first chat()

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> "LoadedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def metadata(self) -> dict:
        return self.model.gguf.metadata

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=True)

    def eval(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits (n_tokens, n_vocab) of a whole sequence, from an empty cache."""
        ids = self._check_ids(token_ids)
        cache = self.model.new_cache(len(ids), *self.cache_types, self.flash_attn)
        return self.model.forward(np.asarray(ids), cache, all_logits=True)

    def _check_ids(self, token_ids: Sequence[int]) -> list[int]:
        ids = list(token_ids)
        if not ids:
            raise ValueError("empty prompt: nothing to evaluate (give some text or token ids)")
        n_vocab = self.model.config.n_vocab
        for t in ids:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"token id {t!r} is not an integer")
            if not 0 <= t < n_vocab:
                raise ValueError(f"token id {t} is outside the vocabulary (0..{n_vocab - 1})")
        ids = [int(t) for t in ids]
        if len(ids) > self.n_ctx:
            raise ContextFullError(f"prompt of {len(ids)} tokens does not fit the context size "
                                   f"{self.n_ctx}; use a larger --ctx-size")
        return ids

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Bring the cache to hold `ids`, reusing the common prefix; logits of the last token."""
        common = 0
        for a, b in zip(self._cached, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always evaluate at least the last token
        common = self.cache.reusable(common)
        self.cache.truncate(common)
        self._cached = ids[:common]
        logits = self.model.forward(np.asarray(ids[common:]), self.cache)
        self._cached = list(ids)
        return logits[-1]

    def generate_tokens(self, prompt: str | Sequence[int], *, max_tokens: int = 128,
                        settings: SamplerSettings | None = None, **sampling) -> Iterator[int]:
        """Token ids, one at a time, until an end-of-generation token or max_tokens.
        Sampling as in generate()."""
        settings = sampler_settings(settings, **sampling)
        ids = self.tokenize(prompt) if isinstance(prompt, str) else prompt
        if isinstance(prompt, str) and not ids:
            # llama.cpp evaluates a lone BOS for an empty prompt, or fails: "input is empty"
            raise ValueError("empty prompt: this model's tokenizer adds no BOS token "
                             "(tokenizer.ggml.add_bos_token), so there is nothing to evaluate; "
                             "give some text")
        ids = self._check_ids(ids)
        sampler = Sampler(settings)
        logits = self._prefill(ids)
        history = list(ids)
        for _ in range(max_tokens):
            tok = sampler(logits, history)
            if self.tokenizer.is_eog(tok):
                return
            yield tok
            history.append(tok)
            if self.cache.n_past >= self.n_ctx:
                raise ContextFullError(f"context full after {self.cache.n_past} tokens "
                                       f"(--ctx-size {self.n_ctx}); generation stopped")
            logits = self.model.forward(np.asarray([tok]), self.cache)[-1]
            self._cached.append(tok)

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 128,
                 settings: SamplerSettings | None = None, stop: Sequence[str] | str = (),
                 **sampling) -> Iterator[str]:
        """Text pieces as they are generated; stops at end-of-generation, max_tokens or a
        stop string (not included in the text).

        Sampling as llama.cpp's (its defaults): ``temperature=0.8`` (0: greedy),
        ``top_k=40``, ``top_p=0.95``, ``min_p=0.05``, ``repeat_penalty=1.0``,
        ``repeat_last_n=64``, ``seed=None`` (a fixed seed repeats a run); or a
        SamplerSettings as ``settings``, the keywords overriding its fields."""
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        settings = sampler_settings(settings, **sampling)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""  # text held back while it could still be the start of a stop string
        for tok in self.generate_tokens(prompt, max_tokens=max_tokens, settings=settings):
            pending += decoder.decode(self.tokenizer.token_to_piece(tok, special=False))
            hit = min((i for i in (pending.find(s) for s in stop if s) if i >= 0), default=-1)
            if hit >= 0:
                if pending[:hit]:
                    yield pending[:hit]
                return
            keep = max((len(s) - 1 for s in stop if s), default=0)
            safe = len(pending) - held_back(pending, stop, keep)
            if safe > 0:
                yield pending[:safe]
                pending = pending[safe:]
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending


    @property
    def chat_template(self):
        """The file's chat template (ChatTemplateError if it has none or it does not compile)."""
        from ggforge.runtime.chat import ChatTemplate

        if self._template is None:
            self._template = ChatTemplate.from_metadata(self.metadata)
        return self._template

    def chat_prompt(self, messages: Sequence[dict]) -> list[int]:
        """The token ids of ``messages`` rendered with the file's chat template (sandboxed),
        ready for the assistant's reply; BOS added where the tokenizer wants one and the
        template did not write it."""
        text = self.chat_template.render(list(messages), add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special=False, parse_special=True)
        if self.tokenizer.add_bos and (not ids or ids[0] != self.tokenizer.bos_id):
            ids = [self.tokenizer.bos_id] + ids
        return ids

    def chat(self, messages: Sequence[dict], *, max_tokens: int = 512, **kw) -> Iterator[str]:
        """The assistant's reply to ``messages`` ([{"role": "user", "content": "..."}, ...]),
        as text pieces; keywords as generate(). The KV cache keeps the conversation, so
        the next turn evaluates only its new tokens."""
        return self.generate(self.chat_prompt(messages), max_tokens=max_tokens, **kw)


def sampler_settings(settings: SamplerSettings | None = None, **fields) -> SamplerSettings:
    """``settings`` (default: llama.cpp's defaults) with the given fields replaced; an
    unknown name is a TypeError naming it and the known ones."""
    settings = SamplerSettings() if settings is None else settings
    known = {f.name for f in dataclasses.fields(SamplerSettings)}
    bad = sorted(set(fields) - known)
    if bad:
        raise TypeError(f"unknown sampling argument {bad[0]!r}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(settings, **fields) if fields else settings


def held_back(text: str, stop: Sequence[str], keep: int) -> int:
    """How many trailing characters could begin a stop string."""
    for n in range(min(keep, len(text)), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stop if s):
            return n
    return 0


def plan_offload(model: Model, n_ctx: int, gpu_layers: int | str, gpu_memory: int | None = None,
                 device=None, kv_bytes: tuple[int, int] = (4, 4)):
    """The placement plan for ``gpu_layers`` (a count, 'all', 'auto'), checked against the
    device's free memory (or ``gpu_memory``) before anything is uploaded."""
    from ggforge.runtime import placement
    from ggforge.runtime.gpu import cuda_free_memory, resolve_device

    n = placement.parse_gpu_layers(gpu_layers)
    dev = resolve_device(device)     # says how to install torch, or that there is no GPU
    free = gpu_memory if gpu_memory is not None else (
        cuda_free_memory() if dev.type == "cuda" else None)
    plan = placement.make_plan(model.gguf, model.config, n_ctx, n, free, kv_bytes=kv_bytes)
    placement.check_fits(plan)
    return plan


def resolve_flash_attn(flash_attn: str | bool, cache_types) -> bool:
    """'on', 'off' or 'auto' (or a bool) -> whether the CPU layers attend as llama.cpp's
    flash attention. 'auto' is on where llama.cpp's -fa auto turns it on and ggforge has
    its arithmetic: an F16 key and value cache."""
    f16 = all(np.dtype(t) == np.float16 for t in cache_types)
    if isinstance(flash_attn, bool):
        mode = "on" if flash_attn else "off"
    else:
        mode = str(flash_attn).lower()
    if mode not in ("on", "off", "auto"):
        raise ValueError(f"flash_attn must be 'on', 'off' or 'auto', got {flash_attn!r}")
    if mode == "on" and not f16:
        raise ValueError("flash attention (--flash-attn on) needs an F16 KV cache: "
                         "--cache-type-k f16 --cache-type-v f16")
    return mode == "on" or (mode == "auto" and f16)


def load(path: str | Path, *, n_ctx: int | None = None, gpu_layers: int | str = 0,
         gpu_memory: int | None = None, device=None, cache_type_k: str = "f16",
         cache_type_v: str = "f16", flash_attn: str = "auto") -> LoadedModel:
    """Map a GGUF model and its tokenizer, ready to generate.

    ``gpu_layers`` (a count as llama.cpp's --n-gpu-layers, 'all' or 'auto') offloads the
    last layers to a CUDA device (needs ``pip install 'ggforge[gpu]'``); ``gpu_memory``
    overrides the free device memory the plan assumes. ``cache_type_k`` / ``cache_type_v``:
    'f16' (the default, as llama.cpp's) or 'f32' for the KV cache. ``flash_attn`` ('auto',
    'on', 'off'): with an F16 cache the CPU layers compute attention as llama.cpp's CPU
    flash attention does, which its default (-fa auto) picks; 'off' computes it as
    llama.cpp without flash attention. An F32 cache gives llama.cpp's logits with -fa off
    and an F32 cache.
    """
    return LoadedModel(path, n_ctx=n_ctx, gpu_layers=gpu_layers, gpu_memory=gpu_memory, device=device,
                       cache_type_k=cache_type_k, cache_type_v=cache_type_v, flash_attn=flash_attn)
