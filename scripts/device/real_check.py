"""A real model on the GPU against the CPU backend: greedy continuations of 64 tokens and
prompt logits at 0, half and all layers offloaded.

    python3 scripts/device/real_check.py MODEL.gguf
"""
import sys
import time

import numpy as np

from ggforge.runtime.generate import load
from ggforge.runtime.sampling import SamplerSettings

GREEDY = SamplerSettings(temperature=0.0, repeat_last_n=0)
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at a temperature of"]


def run(path: str, ngl) -> tuple[list[list[int]], np.ndarray, float]:
    with load(path, n_ctx=512, gpu_layers=ngl) as m:
        t0 = time.perf_counter()
        toks = [list(m.generate_tokens(p, max_tokens=64, settings=GREEDY)) for p in PROMPTS]
        dt = time.perf_counter() - t0
        logits = m.eval(m.tokenize(PROMPTS[2]))
        return toks, logits, dt


def main(path: str) -> None:
    with load(path, n_ctx=512) as m:
        n_layer = m.model.config.n_layer
    base, base_logits, dt = run(path, 0)
    print(f"{path}: {n_layer} layers; CPU {dt:.1f} s for {sum(map(len, base))} tokens", flush=True)
    for ngl in (n_layer // 2, "all"):
        toks, logits, dt = run(path, ngl)
        rel = np.abs(logits - base_logits).max() / np.abs(base_logits).max()
        same_top = float((logits.argmax(1) == base_logits.argmax(1)).mean())
        print(f"gpu_layers={ngl}: logits max rel diff {rel:.2e}, same argmax at {same_top:.0%} of "
              f"{len(logits)} positions; {dt:.1f} s", flush=True)
        for p, a, b in zip(PROMPTS, base, toks):
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            status = "EQUAL" if a == b else f"DIFFER at token {n}"
            print(f"  {p[:28]!r:32s} cpu {len(a)} gpu {len(b)} tokens: {status}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
