"""What the runtime knows about each weight type it computes with: one table.

    f = type_facts(ggml_type)      # UnsupportedModelError for a type the runtime lacks
    f.qk, f.block_bytes            # block geometry (formats/quants' registry)
    f.vec_dot_type                 # what the activations are rounded to before the dots
    f.device_block_bytes           # one block as the GPU holds it (word-aligned)

Both backends (the CPU's kernels/dispatch.py ROUTES, the GPU's gpu/ops.py GPU_ROUTES) and
the offload planner (placement.py) read these facts; nothing else in the runtime states
them. The block geometry is the quantizers' (formats/quants registry), which a test holds
to gguf-py's GGML_QUANT_SIZES.

- ``vec_dot_type``: ggml-cpu.c's ``type_traits_cpu[type].vec_dot_type`` (x86 build): the
  activations are rounded to it once per product, and each block's dot product is taken
  against the rounded values. Our CPU and GPU kernels round them the same way.
- ``device_block``: Q4_0, Q5_0 and Q6_K blocks (18, 22 and 210 bytes) are not a whole
  number of 4-byte words; the GPU holds them padded so that its integer decode kernels
  load aligned words (gpu/k4_kernels.py, gpu/q8_kernels.py). Q6_K pads after the block
  (after its d); Q4_0 and Q5_0 before it (``pad_front``), which puts d in the high half of
  word 0 and the rest of the block on word boundaries. The planner counts padded bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

from ggforge.formats.errors import UnsupportedModelError
from ggforge.formats.quants import get_type


@dataclass(frozen=True)
class TypeFacts:
    """One weight type as the runtime computes with it."""

    ggml_type: T
    vec_dot_type: str                # "f32", "f16", "bf16", "q8_0", "q8_1", "q8_K"
    device_block: int | None = None  # bytes of a block on the GPU when not the file's
    pad_front: bool = False          # the device padding goes before the block's bytes

    @property
    def name(self) -> str:
        return self.ggml_type.name

    @property
    def qk(self) -> int:
        """Elements per block."""
        return get_type(self.ggml_type).block_size

    @property
    def block_bytes(self) -> int:
        return get_type(self.ggml_type).type_size

    @property
    def device_block_bytes(self) -> int:
        return self.device_block or self.block_bytes

    def device_bytes(self, nbytes: int) -> int:
        """Bytes on the GPU of a tensor of ``nbytes`` in the file."""
        return nbytes // self.block_bytes * self.device_block_bytes


FACTS: dict[int, TypeFacts] = {int(f.ggml_type): f for f in (
    TypeFacts(T.F32, "f32"),
    TypeFacts(T.F16, "f16"),
    TypeFacts(T.BF16, "bf16"),
    TypeFacts(T.Q8_0, "q8_0"),
    TypeFacts(T.Q4_0, "q8_0", device_block=20, pad_front=True),
    TypeFacts(T.Q5_0, "q8_0", device_block=24, pad_front=True),
    TypeFacts(T.IQ4_NL, "q8_0"),
    TypeFacts(T.Q4_1, "q8_1"),
    TypeFacts(T.Q5_1, "q8_1"),
    TypeFacts(T.Q2_K, "q8_K"),
    TypeFacts(T.Q3_K, "q8_K"),
    TypeFacts(T.Q4_K, "q8_K"),
    TypeFacts(T.Q5_K, "q8_K"),
    TypeFacts(T.Q6_K, "q8_K", device_block=212),
    TypeFacts(T.IQ4_XS, "q8_K"),
)}


def type_name(ggml_type: int) -> str:
    try:
        return T(int(ggml_type)).name
    except ValueError:
        return f"id {int(ggml_type)}"


def type_facts(ggml_type: int, backend: str = "the runtime") -> TypeFacts:
    """The facts of a weight type; UnsupportedModelError naming the supported ones if the
    runtime cannot compute with it."""
    f = FACTS.get(int(ggml_type))
    if f is None:
        raise UnsupportedModelError(
            f"{backend} has no kernel for weight type {type_name(ggml_type)}; supported: "
            + ", ".join(f.name for f in FACTS.values()) + " (requantize the model to one of them)")
    return f
