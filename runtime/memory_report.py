"""Resident memory of running a model, stage by stage, against issue 4's target:
resident memory at most about 1.2 x the file size plus the KV cache.

    python -m ggforge.runtime.memory_report MODEL.gguf [-p 128] [-n 64] [--json]
    ggforge memory MODEL.gguf                       # the same, from the command line

What counts as the model's memory is the growth over a **baseline**: this process after
its imports and after compiling (or loading from numba's disk cache) and running every
kernel the model needs, on a *different* tiny model, its "twin" (:func:`write_twin`: the
file's metadata and tensor types, two or a few layers, a 256-token vocabulary, zero
weights), which is then closed and its memory given back. The baseline is code (Python,
numba's compiled kernels, LLVM), not data. Then in the same process: ``ggforge.load`` (the
mapping, the tokenizer, the KV cache), a prefill of ``n_prompt`` tokens, ``n_gen`` greedy
decode steps. Linux only (/proc/self/smaps_rollup).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MiB = 2**20
TARGET = 1.2          # issue 4: RSS growth <= TARGET x file + KV cache
TWIN_VOCAB = 256


@dataclass
class Rss:
    """Resident bytes: all, anonymous (heap, copies) and file-backed (mapped files, code)."""
    rss: int
    anon: int

    @property
    def file(self) -> int:
        return self.rss - self.anon


def rss_now() -> Rss:
    """This process's resident set (from /proc/self/smaps_rollup)."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0] in ("Rss:", "Anonymous:"):
                fields[parts[0]] = int(parts[1]) * 1024
    return Rss(fields["Rss:"], fields["Anonymous:"])


def reset_peak() -> bool:
    """Start a new peak (VmHWM) from the current RSS; False where the kernel cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def give_back_memory() -> None:
    """Collect garbage and return freed heap pages to the system (glibc malloc_trim)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- the twin: the same code paths, (almost) no data ------------------------------------------
def _twin_layers(g, n_layer: int) -> list[int]:
    """Layers whose tensors show every (tensor, type) pair the file has, at least two."""
    kinds = {}
    for name, t in g.tensors.items():
        if name.startswith("blk."):
            layer, rest = name[4:].split(".", 1)
            kinds.setdefault(int(layer), set()).add((rest, int(t.ggml_type)))
    need = set().union(*kinds.values()) if kinds else set()
    chosen: list[int] = []
    while need:
        best = max(range(n_layer), key=lambda i: len(kinds.get(i, set()) & need))
        chosen.append(best)
        need -= kinds.get(best, set())
    for i in range(n_layer):
        if len(chosen) >= min(2, n_layer):
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def write_twin(path: str | Path, out: str | Path) -> Path:
    """A small GGUF that runs exactly the kernels ``path`` runs: the same metadata and
    tensor types, only the layers needed to show every tensor type (at least two), a
    vocabulary of 256 tokens and no tokenizer; all weights zero."""
    from ggforge.formats.gguf_reader import GGUFFile
    from ggforge.formats.gguf_writer import KV, GGUFWriter, tensor_nbytes

    out = Path(out)
    with GGUFFile.open(path) as g, open(out, "wb") as f:
        arch = g.get("general.architecture")
        n_layer = int(g.get(f"{arch}.block_count"))
        keep = _twin_layers(g, n_layer)
        w = GGUFWriter(f)
        for k, v in g.metadata.items():
            if k.startswith("tokenizer."):
                continue
            vt, el = g.value_types[k]
            v = v.tolist() if isinstance(v, np.ndarray) else v
            if k == f"{arch}.block_count":
                v = len(keep)
            elif k.startswith(arch + ".") and isinstance(v, list) and len(v) == n_layer:
                v = [v[i] for i in keep]   # per-layer arrays
            w.add(KV(k, vt, v, el))
        names, shapes = [], {}
        for name, t in g.tensors.items():
            shape = list(t.shape)
            if name.startswith("blk."):
                layer, rest = name[4:].split(".", 1)
                if int(layer) not in keep:
                    continue
                new = f"blk.{keep.index(int(layer))}.{rest}"
            else:
                new = name
                if name in ("token_embd.weight", "output.weight"):
                    shape[0] = TWIN_VOCAB
            names.append(new)
            shapes[new] = (shape, int(t.ggml_type))
            w.add_tensor_info(new, shape, int(t.ggml_type))
        w.write_header()
        for new in names:
            shape, ggml_type = shapes[new]
            w.write_tensor(new, np.zeros(tensor_nbytes(shape, ggml_type), np.uint8))
        w.finish()
    return out


def warm_up(path: str | Path, n_prompt: int, cache_types: tuple[str, str] = ("f32", "f32"),
            flash_attn: str = "auto") -> None:
    """Compile and run every kernel ``path`` needs, on its twin (then closed)."""
    from ggforge.runtime.generate import resolve_flash_attn
    from ggforge.runtime.kv_cache import cache_dtype
    from ggforge.runtime.model import Model

    flash = resolve_flash_attn(flash_attn, [cache_dtype(t) for t in cache_types])

    with tempfile.TemporaryDirectory() as tmp:
        m = Model(write_twin(path, Path(tmp) / "twin.gguf"))
        try:
            ids = np.arange(n_prompt) % TWIN_VOCAB
            cache = m.new_cache(n_prompt + 2, *cache_types, flash)
            m.forward(ids, cache)                   # prefill kernels
            for i in range(2):                      # decode kernels
                m.forward(ids[i:i + 1], cache)
            del cache
        finally:
            m.close()
    give_back_memory()


# -- the measurement ----------------------------------------------------------------------------
@dataclass
class MemoryReport:
    path: str
    file_bytes: int
    kv_bytes: int
    n_prompt: int
    n_gen: int
    kv_types: str = "f32/f32"   # keys/values
    stages: dict[str, dict[str, int]] = field(default_factory=dict)   # name -> Rss as bytes
    peak: int = 0                # VmHWM since the baseline (0: unknown)

    def add(self, name: str, r: Rss) -> None:
        self.stages[name] = {"rss": r.rss, "anon": r.anon, "file": r.file}

    @property
    def baseline(self) -> int:
        return self.stages["baseline"]["rss"]

    @property
    def growth(self) -> int:
        """RSS after generation minus the baseline: the model's memory."""
        return self.stages["generate"]["rss"] - self.baseline

    def ratio(self, grown: int) -> float:
        """``grown`` = ratio x file + KV cache."""
        return (grown - self.kv_bytes) / self.file_bytes


def prime_kernel_cache(path: str | Path, n_prompt: int,
                       cache_types: tuple[str, str] = ("f32", "f32"), flash_attn: str = "auto") -> None:
    """Run :func:`warm_up` in a child process, so that numba's disk cache holds every
    kernel before :func:`measure` runs: compiling in the measuring process would leave
    LLVM's memory in its baseline, and freed compiler memory for the model to reuse."""
    code = ("import sys; from ggforge.runtime.memory_report import warm_up; "
            "warm_up(sys.argv[1], int(sys.argv[2]), tuple(sys.argv[3:5]), sys.argv[5])")
    subprocess.run([sys.executable, "-c", code, str(path), str(n_prompt), *cache_types, flash_attn],
                   check=True)


def measure(path: str | Path, n_prompt: int = 128, n_gen: int = 64, n_ctx: int | None = None,
            cache_types: tuple[str, str] = ("f32", "f32"), flash_attn: str = "auto") -> MemoryReport:
    """RSS after imports, the baseline (kernels warmed up on the twin), load, prefill of
    ``n_prompt`` tokens and ``n_gen`` greedy decode steps, in this process. The KV cache
    holds ``n_ctx`` tokens (default n_prompt + n_gen: all of it written), keys and values
    of ``cache_types`` ('f32' or 'f16')."""
    from ggforge.runtime.generate import load   # numba and the kernels too: code

    path = Path(path)
    imports = rss_now()
    warm_up(path, n_prompt, cache_types, flash_attn)
    base = rss_now()
    peak_known = reset_peak()   # else VmHWM would include the warm-up's
    m = load(path, n_ctx=n_ctx or n_prompt + n_gen, cache_type_k=cache_types[0],
             cache_type_v=cache_types[1], flash_attn=flash_attn)
    try:
        rep = MemoryReport(str(path), path.stat().st_size, m.cache.nbytes, n_prompt, n_gen,
                           f"{m.cache.k.dtype.name}/{m.cache.v.dtype.name}".replace("float", "f"))
        rep.add("imports", imports)
        rep.add("baseline", base)
        rep.add("load", rss_now())
        ids = np.random.default_rng(0).integers(0, m.model.config.n_vocab, n_prompt)
        logits = m.model.forward(ids, m.cache)          # (1, n_vocab): the last token's
        rep.add("prefill", rss_now())
        for _ in range(n_gen):
            logits = m.model.forward(np.array([int(np.argmax(logits[-1]))]), m.cache)
        rep.add("generate", rss_now())
        rep.peak = peak_rss() if peak_known else 0
    finally:
        m.close()
    return rep


def format_report(rep: MemoryReport) -> str:
    """The stages as a table (MiB), then the ratio line."""
    labels = {"imports": "after imports",
              "baseline": "baseline: kernels run on the twin",
              "load": "ggforge.load",
              "prefill": f"prefill {rep.n_prompt} tokens",
              "generate": f"generate {rep.n_gen} tokens"}
    lines = [f"{rep.path}: file {rep.file_bytes / MiB:.1f} MiB, KV cache "
             f"{rep.kv_bytes / MiB:.1f} MiB ({rep.n_prompt + rep.n_gen} tokens, {rep.kv_types})",
             f"{'stage':36s}{'RSS':>8s}{'anon':>8s}{'file':>8s}{'- base':>8s}   (MiB)"]
    for name, s in rep.stages.items():
        lines.append(f"{labels[name]:36s}{s['rss'] / MiB:8.1f}{s['anon'] / MiB:8.1f}"
                     f"{s['file'] / MiB:8.1f}{(s['rss'] - rep.baseline) / MiB:8.1f}")
    if rep.peak:
        lines.append(f"{'peak since the baseline':36s}{rep.peak / MiB:8.1f}{'':16s}"
                     f"{(rep.peak - rep.baseline) / MiB:8.1f}")
    lines.append("baseline = this process after imports and after compiling and running every "
                 "kernel the model needs on a different, tiny model (the file's metadata and "
                 "tensor types, a few layers, zero weights), closed again: code, not data")
    g = rep.growth
    lines.append(f"RSS - baseline = {g / MiB:.1f} MiB = {rep.ratio(g):.2f} x file + KV "
                 f"({rep.kv_bytes / MiB:.1f} MiB)   [target: <= {TARGET} x file + KV]")
    if rep.peak:
        p = rep.peak - rep.baseline
        lines.append(f"peak - baseline = {p / MiB:.1f} MiB = {rep.ratio(p):.2f} x file + KV")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ggforge.runtime.memory_report",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-c", "--ctx-size", type=int, default=None)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-ctk", "--cache-type-k", default="f32", choices=["f32", "f16"])
    ap.add_argument("-ctv", "--cache-type-v", default="f32", choices=["f32", "f16"])
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    ap.add_argument("--no-prime", action="store_true",
                    help="measure without first filling numba's cache in a child process")
    a = ap.parse_args(argv)
    if a.threads:
        from ggforge.runtime import kernels
        kernels.set_threads(a.threads)
    if not a.no_prime:
        prime_kernel_cache(a.model, a.n_prompt, (a.cache_type_k, a.cache_type_v))
    rep = measure(a.model, a.n_prompt, a.n_gen, a.ctx_size, (a.cache_type_k, a.cache_type_v))
    if a.json:
        print(json.dumps({**asdict(rep), "growth": rep.growth, "ratio": rep.ratio(rep.growth)}))
    else:
        print(format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
