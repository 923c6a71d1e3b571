"""llama.cpp's own GPU against its own CPU: 64 greedy tokens from real_check.py's five
prompts with llama-completion at -ngl 0 (device none), half and all layers; and ggforge's
CPU continuation against llama.cpp's CPU one. Text is compared (same tokenizer).

    python3 scripts/device/lcpp_greedy.py LLAMA_COMPLETION MODEL.gguf
"""
import subprocess
import sys

from real_check import GREEDY, PROMPTS

from ggforge.runtime.generate import load


def lcpp(binary: str, model: str, prompt: str, ngl: str) -> str:
    cmd = [binary, "-m", model, "-p", prompt, "-n", "64", "--temp", "0", "-ngl", ngl, "-c", "512",
           "--repeat-penalty", "1.0", "-no-cnv", "--no-display-prompt", "--simple-io", "-s", "0"]
    if ngl == "0":
        cmd += ["-dev", "none"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    return out.stdout


def first_diff(a: str, b: str) -> str:
    if a == b:
        return "EQUAL"
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"DIFFER at char {n}: {a[n:n + 20]!r} vs {b[n:n + 20]!r}"


def main(binary: str, model: str) -> None:
    with load(model, n_ctx=512) as m:
        n_layer = m.model.config.n_layer
        ours = ["".join(m.generate(p, max_tokens=64, settings=GREEDY)) for p in PROMPTS]
    for p, mine in zip(PROMPTS, ours):
        cpu = lcpp(binary, model, p, "0")
        print(f"{p[:28]!r:32s} llama.cpp CPU {len(cpu)} chars; ggforge CPU vs it: {first_diff(mine, cpu)}")
        for ngl in (str(n_layer // 2), "99"):
            print(f"    llama.cpp -ngl {ngl:>2} vs its CPU: {first_diff(lcpp(binary, model, p, ngl), cpu)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
