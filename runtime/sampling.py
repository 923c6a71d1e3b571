"""Sampling as a chain of filters over the logits, then one draw (greedy at temperature 0).

The order is llama.cpp's common sampler: penalties (repetition, frequency, presence), top-k,
top-p, min-p, temperature, then the draw from a seeded generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SamplerSettings:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64          # the penalties look this far back; -1: the whole history
    frequency_penalty: float = 0.0   # llama.cpp's penalty_freq: minus count x this
    presence_penalty: float = 0.0    # llama.cpp's penalty_present: minus this once present
    seed: int | None = None


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float,
                         frequency: float = 0.0, presence: float = 0.0) -> np.ndarray:
    """llama.cpp's penalties sampler over the tokens of ``recent``: each one's positive logit
    divided by ``penalty``, a negative one multiplied, then ``count * frequency + presence``
    subtracted (OpenAI's frequency_penalty and presence_penalty)."""
    if (penalty == 1.0 and frequency == 0.0 and presence == 0.0) or not len(recent):
        return logits
    ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
    out = logits.copy()
    vals = out[ids]
    vals = np.where(vals > 0, vals / penalty, vals * penalty)
    out[ids] = vals - (counts * frequency + presence)
    return out


def _keep(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, logits, -np.inf)


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return _keep(logits, logits >= kth)


def _probs(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - np.max(logits))
    return z / z.sum()


def top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    probs = _probs(logits)
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    n_keep = int(np.searchsorted(cum, p) + 1)
    mask = np.zeros(logits.size, dtype=bool)
    mask[order[:n_keep]] = True
    return _keep(logits, mask)


def min_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep tokens at least p times as likely as the most likely one."""
    if p <= 0.0:
        return logits
    return _keep(logits, logits >= np.max(logits) + np.log(p))


class Sampler:
    """Chooses the next token from a (n_vocab,) logits vector."""

    def __init__(self, settings: SamplerSettings = SamplerSettings()):
        self.s = settings
        self.rng = np.random.default_rng(settings.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        s = self.s
        x = np.asarray(logits, dtype=np.float64)
        if s.repeat_last_n:
            recent = list(history)
            recent = recent[-s.repeat_last_n:] if s.repeat_last_n > 0 else recent
            x = apply_repeat_penalty(x, recent, s.repeat_penalty, s.frequency_penalty,
                                     s.presence_penalty)
        if s.temperature <= 0.0:
            return int(np.argmax(x))
        x = min_p(top_p(top_k(x, s.top_k), s.top_p), s.min_p)
        probs = _probs(x / s.temperature)
        return int(self.rng.choice(probs.size, p=probs))
