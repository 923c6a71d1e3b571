"""Where the GPU and CPU backends part on a real model: each device layer fed the CPU's
input for that layer (one step) and the layers chained (cumulative), prompt and decode.

    python3 scripts/device/layer_check.py MODEL.gguf
"""
import sys

import numpy as np
import torch

from ggforge.runtime.model import Model

PROMPT = [2, 4077, 3355, 496, 990, 236764, 528, 496, 1944, 13610, 236764]


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def cpu_states(path, toks):
    """Hidden state entering each layer, the last layer's output, and the logits (CPU)."""
    m = Model(path)
    states = []

    def rec(il, x):
        states.append(x.copy())

    cache = m.new_cache(64)
    logits = m.forward(np.asarray(toks), cache, all_logits=True, observe=rec)
    step = m.forward(np.asarray([toks[-1]]), cache, observe=rec)   # one decode step after the prompt
    n_layer = m.config.n_layer
    dec_states = states[n_layer:]
    m.close()
    return states[:n_layer], logits, dec_states, step


def main(path):
    toks = PROMPT
    states, logits, dec_states, step = cpu_states(path, toks)
    m = Model(path)
    c = m.config
    m.offload(c.n_layer + 1)
    g = m.gpu
    pos = torch.arange(len(toks), device=g.device)
    print(f"{c.n_layer} layers, prompt of {len(toks)} tokens: one-step rel diff per layer (prefill path)")
    for i, L in enumerate(g.layers):
        cache = g.new_cache(64)
        x = torch.from_numpy(states[i]).to(g.device)
        y = g.run_layer(i, x, pos, cache, len(toks)).cpu().numpy()
        want = states[i + 1] if i + 1 < c.n_layer else None
        if want is not None:
            print(f"  layer {i:2d}: {rel(y, want):.2e}  (input rms {np.sqrt((states[i]**2).mean()):.3g})")
    cache = m.new_cache(64)
    got = m.forward(np.asarray(toks), cache, all_logits=True)
    print(f"all layers chained, prompt logits: rel {rel(got, logits):.2e}; same argmax "
          f"{(got.argmax(1) == logits.argmax(1)).mean():.0%}")
    got_step = m.forward(np.asarray([toks[-1]]), cache)
    print(f"decode step (graph, fused): rel {rel(got_step, step):.2e}; top cpu {step.argmax()} gpu {got_step.argmax()}")
    # decode path per layer, eager (no graph), fed the CPU's decode-step inputs
    g.use_graphs = False
    cache = m.new_cache(64)
    m.forward(np.asarray(toks), cache, all_logits=True)
    p = torch.tensor([len(toks)], device=g.device)
    print("decode path, one step per layer (eager, fused kernels where the layer allows):")
    for i, L in enumerate(g.layers[:-1]):
        x = torch.from_numpy(dec_states[i]).to(g.device)
        hi = cache.gpu.hi
        y = g.run_layer(i, x, p, cache.gpu, len(toks) + 1).cpu().numpy()
        cache.gpu.hi = hi
        print(f"  layer {i:2d}: {rel(y, dec_states[i + 1]):.2e}  fused={L.fused}")
    m.close()


if __name__ == "__main__":
    main(sys.argv[1])
