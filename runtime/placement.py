"""Which layers run where: the offload plan, arithmetic a user can read.

Layers are counted as llama.cpp counts ``--n-gpu-layers``: N puts the *last* N repeating
layers on the GPU (``i_gpu_start = max(n_layer - N, 0)``); N > n_layer also puts the
output head there (so ``all`` is n_layer + 1). The token embedding stays on the CPU (the
lookup of a few rows needs no GPU), and only the hidden state crosses between the two.

Device memory for the GPU part is

    weights of its layers (+ the output head: output_norm and output.weight, or a copy of
    token_embd.weight when the output is tied)
  + KV cache: per layer, cells x n_head_kv x (head_dim_k x K bytes + head_dim_v x V bytes)
    (4 for float32, 2 for float16: --cache-type-k/v),
    cells = n_ctx for full-attention layers, min(n_ctx, sliding_window + UBATCH) for
    sliding-window layers (a ring)
  + scratch: activations of one UBATCH of prompt tokens and its attention scores
  + a margin (the CUDA context, allocator slack, captured decode graphs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ggforge.formats.units import human_bytes
from ggforge.runtime.config import ModelConfig
from ggforge.runtime.decoder import layer_windows
from ggforge.runtime.type_facts import FACTS

UBATCH = 512                     # prompt tokens per pass on the GPU (runtime/gpu/backend.py)
MARGIN = 512 * 1024 * 1024       # bytes kept free on the device beyond the plan


class PlanError(ValueError):
    """The requested layers do not fit the device; the message carries the plan."""


def parse_gpu_layers(value: str | int | None) -> int | str:
    """'all', 'auto', or a non-negative count."""
    if value is None:
        return 0
    s = str(value).strip().lower()
    if s in ("all", "auto"):
        return s
    try:
        n = int(s)
    except ValueError:
        raise ValueError(f"--gpu-layers must be a number, 'all' or 'auto', got {value!r}") from None
    if n < 0:
        raise ValueError(f"--gpu-layers must be at least 0, got {n}")
    return n


def parse_bytes(text: str) -> int:
    """'6GiB', '512MiB', '8GB', '1e9' -> bytes."""
    s = text.strip().replace(" ", "")
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 1 << 10, "m": 1 << 20,
             "g": 1 << 30, "t": 1 << 40, "b": 1}
    for u in sorted(units, key=len, reverse=True):
        if s.lower().endswith(u):
            num, mult = s[: -len(u)], units[u]
            break
    else:
        num, mult = s, 1
    try:
        n = float(num) * mult
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 6GiB, 512MiB)") from None
    if n < 0:
        raise ValueError(f"memory size must not be negative: {text!r}")
    return int(n)


@dataclass
class LayerPlan:
    index: int
    weights: int        # bytes
    swa: bool
    cells: int          # KV cells this layer holds where it runs
    kv: int             # bytes
    device: str         # "cpu" or "gpu"


@dataclass
class Plan:
    n_layer: int
    n_ctx: int
    gpu_layers: int                 # as llama.cpp counts them (0 .. n_layer + 1)
    layers: list[LayerPlan]
    embd_bytes: int                 # token_embd.weight, always on the CPU
    head_bytes: int                 # output_norm + output (or the tied embedding's copy)
    head_on_gpu: bool
    scratch: int
    margin: int
    device_free: int | None         # bytes free on the device, when known
    kv_formula: list[str] = field(default_factory=list)
    kv_types: str = "float32"       # the cache's element types, as the render names them

    @property
    def first_gpu_layer(self) -> int:
        return max(self.n_layer - self.gpu_layers, 0)

    @property
    def gpu_weights(self) -> int:
        return sum(L.weights for L in self.layers if L.device == "gpu") + \
            (self.head_bytes if self.head_on_gpu else 0)

    @property
    def gpu_kv(self) -> int:
        return sum(L.kv for L in self.layers if L.device == "gpu")

    @property
    def gpu_total(self) -> int:
        if self.gpu_layers == 0:
            return 0
        return self.gpu_weights + self.gpu_kv + self.scratch + self.margin

    @property
    def cpu_kv(self) -> int:
        return sum(L.kv for L in self.layers if L.device == "cpu")

    @property
    def fits(self) -> bool:
        return self.device_free is None or self.gpu_total <= self.device_free

    def summary(self) -> str:
        hb = human_bytes
        free = f", {hb(self.device_free)} free" if self.device_free is not None else ""
        return (f"{self.gpu_layers} GPU layers need {hb(self.gpu_total)} on the device "
                f"(weights {hb(self.gpu_weights)} + KV {hb(self.gpu_kv)} + scratch "
                f"{hb(self.scratch)} + margin {hb(self.margin)}){free}")


def device_bytes(info) -> int:
    """A tensor's bytes on the device: as in the file, except the types whose blocks are
    padded there (type_facts.TypeFacts.device_block)."""
    f = FACTS.get(int(info.ggml_type))
    return int(info.nbytes) if f is None else f.device_bytes(int(info.nbytes))


def _layer_weight_bytes(gguf, n_layer: int, on_device: bool) -> list[int]:
    """Each layer's weight bytes on the device, or as in the file (what the CPU maps)."""
    sizes = [0] * n_layer
    for name, info in gguf.tensors.items():
        if name.startswith("blk."):
            i = int(name.split(".")[1])
            if 0 <= i < n_layer:
                sizes[i] += device_bytes(info) if on_device else int(info.nbytes)
    return sizes


def make_plan(gguf, config: ModelConfig, n_ctx: int, gpu_layers: int | str,
              device_free: int | None = None, margin: int = MARGIN,
              kv_bytes: tuple[int, int] = (4, 4)) -> Plan:
    """The plan for ``gpu_layers`` (a count, 'all' or 'auto'); 'auto' needs device_free.
    ``kv_bytes``: bytes of a key and of a value element (4 float32, 2 float16)."""
    c = config
    per_layer = {on: _layer_weight_bytes(gguf, c.n_layer, on) for on in (True, False)}
    t = gguf.tensors
    embd = int(t["token_embd.weight"].nbytes)
    tied = "output.weight" not in t
    norm = int(t["output_norm.weight"].nbytes)
    head_w = t["token_embd.weight"] if tied else t["output.weight"]
    head = norm + device_bytes(head_w)
    kb, vb = kv_bytes
    cell = c.n_head_kv * (c.head_dim * kb + c.head_dim_v * vb)
    names = {4: "float32", 2: "float16"}
    kv_types = names[kb] if kb == vb else f"K {names[kb]}, V {names[vb]}"
    per_cell = f"({c.head_dim} + {c.head_dim_v}) x {kb} B" if kb == vb else \
        f"({c.head_dim} x {kb} B + {c.head_dim_v} x {vb} B)"
    swa_cells = min(n_ctx, c.sliding_window + UBATCH) if c.sliding_window else n_ctx
    q_out = c.n_head * c.head_dim
    scratch = (UBATCH * (4 * c.n_embd + 2 * q_out + 4 * c.n_head_kv * c.head_dim + 3 * c.n_ff) * 4
               + 2 * c.n_head * UBATCH * n_ctx * 4 + c.n_vocab * 4)

    windows = layer_windows(c)

    def build(n_gpu: int) -> Plan:
        first = max(c.n_layer - n_gpu, 0)
        layers = []
        for i in range(c.n_layer):
            gpu = i >= first and n_gpu > 0
            swa = windows[i] > 0
            cells = swa_cells if (swa and gpu) else n_ctx   # the CPU cache holds every position
            layers.append(LayerPlan(i, per_layer[gpu][i], swa, cells, cells * cell, "gpu" if gpu else "cpu"))
        n_swa = sum(w > 0 for w in windows)
        formula = [f"{c.n_layer - n_swa} full layers x {n_ctx} cells x {c.n_head_kv} kv heads x {per_cell}"]
        if n_swa:
            formula.append(f"{n_swa} sliding-window layers x min({n_ctx}, {c.sliding_window} + {UBATCH}) "
                           f"= {swa_cells} cells on the GPU ({n_ctx} on the CPU) x {c.n_head_kv} x {per_cell}")
        head_gpu = n_gpu > c.n_layer
        # a tied head on the CPU reads token_embd itself; on the GPU it is a copy
        head_bytes = head if head_gpu else norm + int(head_w.nbytes) if not tied else norm
        return Plan(c.n_layer, n_ctx, n_gpu, layers, embd, head_bytes, head_gpu, scratch, margin,
                    device_free, formula, kv_types)

    if gpu_layers == "auto":
        if device_free is None:
            raise ValueError("--gpu-layers auto needs the free device memory (a CUDA device, or --gpu-memory)")
        best = build(0)
        for n in range(1, c.n_layer + 2):
            p = build(n)
            if not p.fits:
                break
            best = p
        return best
    n = c.n_layer + 1 if gpu_layers == "all" else min(int(gpu_layers), c.n_layer + 1)
    return build(n)


def check_fits(plan: Plan) -> None:
    if not plan.fits:
        raise PlanError(f"does not fit: {plan.summary()}; use fewer --gpu-layers, "
                        f"a smaller --ctx-size, or --gpu-layers auto")
