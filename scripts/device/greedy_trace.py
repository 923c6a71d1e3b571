"""Where a greedy continuation parts between the device and the CPU backend: the CPU's
greedy tokens fed to both (teacher forcing), logits compared at each step, and at the first
step that differs, each layer's output.

    python3 scripts/device/greedy_trace.py MODEL.gguf ["prompt" | ALL] [gpu_layers]

ALL: real_check.py's five prompts. TRACE_N: greedy tokens (64).
"""
import os
import sys

import numpy as np
import torch

from ggforge.runtime.gpu import backend
from ggforge.runtime.model import Model

PROMPT = "Once upon a time, in a small village,"


def run(path, prompt_ids, toks, ngl, graphs=True):
    """Logits of the prompt's last token and of each teacher-forced step, and the hidden
    state after each layer at every forward (CPU layers: entering the next layer)."""
    m = Model(path)
    if ngl:
        m.offload(m.config.n_layer + 1 if ngl == "all" else int(ngl),
                  device=None if torch.cuda.is_available() else "cpu")
    states = []
    orig = m._layer
    m._layer = lambda il, L, x, *a, **k: states.append(("cpu", il, x.copy())) or orig(il, L, x, *a, **k)
    g = m.gpu
    if g is not None:
        g.use_graphs = graphs and g.use_graphs
        glayer = g._layer

        def rec(il, L, x, pend, *a):
            y, p = glayer(il, L, x, pend, *a)
            f, w = p
            out = y + (f if w is None else backend._rms_norm(f, w, m.config.eps))
            states.append(("gpu", il + 1, out[-1:].cpu().numpy().copy()))
            return y, p
        if not g.use_graphs:
            g._layer = rec
    cache = m.new_cache(512)
    logits = [m.forward(np.asarray(prompt_ids), cache)[-1]]
    per_step = [list(states)]
    for t in toks:
        states.clear()
        logits.append(m.forward(np.asarray([t]), cache)[-1])
        per_step.append(list(states))
    m.close()
    return logits, per_step


def main(path, prompt=PROMPT, ngl="all"):
    if prompt == "ALL":
        from real_check import PROMPTS
        for p in PROMPTS:
            print(repr(p))
            main(path, p, ngl)
        return
    from ggforge.runtime.generate import load
    from ggforge.runtime.sampling import SamplerSettings
    with load(path, n_ctx=512) as lm:
        ids = lm.tokenize(prompt)
        toks = list(lm.generate_tokens(ids, max_tokens=int(os.environ.get("TRACE_N", 64)),
                                       settings=SamplerSettings(temperature=0.0, repeat_last_n=0)))
    print(f"prompt {len(ids)} tokens, {len(toks)} greedy tokens (CPU)", flush=True)
    ref, ref_states = run(path, ids, toks, 0)
    assert [int(r.argmax()) for r in ref[:-1]] == toks, "teacher forcing does not reproduce the CPU run"
    for graphs in (True, False):
        got, got_states = run(path, ids, toks, ngl, graphs)
        diffs = [int(np.sum(a != b)) for a, b in zip(got, ref)]
        first = next((i for i, d in enumerate(diffs) if d), None)
        print(f"gpu_layers={ngl} graphs={graphs}: steps with differing logits "
              f"{sum(d > 0 for d in diffs)} of {len(diffs)}; first {first}", flush=True)
        if first is None:
            continue
        a, b = got[first], ref[first]
        top = np.sort(b)[::-1]
        print(f"  step {first}: {diffs[first]} logits differ, max abs {np.abs(a - b).max():.3g}; "
              f"argmax cpu {b.argmax()} gpu {a.argmax()}, cpu top-2 gap {top[0] - top[1]:.3g}")
        cpu = {il: x[-1:] for _, il, x in ref_states[first]}
        for _, il, x in got_states[first]:
            if il in cpu:
                d = int(np.sum(x != cpu[il]))
                print(f"    after layer {il - 1:2d}: {d} of {x.size} differ, max abs "
                      f"{np.abs(x - cpu[il]).max():.3g}")


if __name__ == "__main__":
    main(*sys.argv[1:])
