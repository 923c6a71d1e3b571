"""File types and llama.cpp's per-tensor mixes: which tensor gets which ggml type.

The rules are those of llama_tensor_get_type in src/llama-quant.cpp of the llama.cpp bundled
with llama-cpp-python 0.3.36, for dense (non-MoE) models and the file types ggforge writes.
They walk the tensors in llama.cpp's order (outside-block tensors first, then blocks in
numeric order, names sorted), counting attn_v and ffn_down tensors to pick the layers that
get more bits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import gguf

from ggforge.formats.errors import QuantizationError

F = gguf.LlamaFileType


@dataclass(frozen=True)
class FileType:
    """A requested file type: its name, llama_ftype (general.file_type) and default tensor type."""

    name: str
    ftype: gguf.LlamaFileType
    default: str

    @property
    def quantized(self) -> bool:
        return self.default not in ("F32", "F16", "BF16")


FILE_TYPES: dict[str, FileType] = {ft.name: ft for ft in [
    FileType("F32", F.ALL_F32, "F32"), FileType("F16", F.MOSTLY_F16, "F16"),
    FileType("BF16", F.MOSTLY_BF16, "BF16"), FileType("Q8_0", F.MOSTLY_Q8_0, "Q8_0"),
    FileType("Q4_0", F.MOSTLY_Q4_0, "Q4_0"), FileType("Q4_1", F.MOSTLY_Q4_1, "Q4_1"),
    FileType("Q5_0", F.MOSTLY_Q5_0, "Q5_0"), FileType("Q5_1", F.MOSTLY_Q5_1, "Q5_1"),
    FileType("Q2_K", F.MOSTLY_Q2_K, "Q2_K"),
    FileType("Q3_K_S", F.MOSTLY_Q3_K_S, "Q3_K"), FileType("Q3_K_M", F.MOSTLY_Q3_K_M, "Q3_K"),
    FileType("Q3_K_L", F.MOSTLY_Q3_K_L, "Q3_K"),
    FileType("Q4_K_S", F.MOSTLY_Q4_K_S, "Q4_K"), FileType("Q4_K_M", F.MOSTLY_Q4_K_M, "Q4_K"),
    FileType("Q5_K_S", F.MOSTLY_Q5_K_S, "Q5_K"), FileType("Q5_K_M", F.MOSTLY_Q5_K_M, "Q5_K"),
    FileType("Q6_K", F.MOSTLY_Q6_K, "Q6_K"),
    FileType("IQ4_NL", F.MOSTLY_IQ4_NL, "IQ4_NL"), FileType("IQ4_XS", F.MOSTLY_IQ4_XS, "IQ4_XS"),
]}
ALIASES = {"q2": "Q2_K", "q3": "Q3_K_M", "q4": "Q4_K_M", "q5": "Q5_K_M", "q6": "Q6_K",
           "q8": "Q8_0", "q3_k": "Q3_K_M", "q4_k": "Q4_K_M", "q5_k": "Q5_K_M",
           "fp16": "F16", "fp32": "F32"}
# ggml block size per tensor type (for fall-backs); K-quants and IQ4_XS use 256
_BLOCK = {"Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256,
          "F32": 1, "F16": 1, "BF16": 1}
# a 256-block type whose rows do not divide falls back to a 32-block type (tensor_type_fallback)
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             "IQ4_XS": "IQ4_NL"}


def parse_file_type(text: str) -> FileType:
    """'q4' -> Q4_K_M, 'Q8_0' -> Q8_0 (case-insensitive); unknown names list the supported ones."""
    key = ALIASES.get(text.lower(), text.upper())
    if key not in FILE_TYPES:
        raise QuantizationError(f"unknown type {text!r}; supported: {', '.join(FILE_TYPES)} "
                                f"(short: {', '.join(f'{k}={v}' for k, v in ALIASES.items() if k[1].isdigit())})")
    return FILE_TYPES[key]


def block_size(type_name: str) -> int:
    return _BLOCK.get(type_name, 32)


@dataclass
class MixOptions:
    """llama-quantize's options that change the mix."""

    output_type: str | None = None             # --output-tensor-type
    token_embedding_type: str | None = None    # --token-embedding-type
    tensor_types: list[tuple[str, str]] = field(default_factory=list)  # --tensor-type PATTERN=TYPE
    pure: bool = False                         # --pure
    has_imatrix: bool = False                  # --imatrix given
    allow_requantize: bool = False             # --allow-requantize (GGUF sources)


def llama_order(name: str) -> tuple[int, str]:
    """llama_model_loader's order: non-block tensors first, blocks numerically, then by name."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1), name


def allows_quantization(name: str, n_dims: int) -> bool:
    """tensor_allows_quantization, for the tensors of the supported families."""
    return (n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name and name not in ("position_embd.weight",
                                                                     "token_types.weight"))


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part in ("attn_qkv", "attn_kv_b", "attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{part}.weight" in name:
            return part
    for part in ("ffn_up", "ffn_gate", "ffn_down"):
        if part in name:
            return part
    return "other"


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class Mixer:
    """Assigns types to tensors one by one, in llama.cpp's order, keeping its counters."""

    def __init__(self, ft: FileType, names: Sequence[str], *, n_layer: int, n_gqa: int,
                 is_70b: bool = False, options: MixOptions | None = None):
        self.ft, self.opts = ft, options or MixOptions()
        self.n_layer, self.n_gqa, self.is_70b = n_layer, n_gqa, is_70b
        cats = [_category(n) for n in names]
        self.n_attention_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats)
        self.tied = "output" not in cats
        self.i_attention_wv = self.i_ffn_down = 0
        self._patterns = [(re.compile(p), t) for p, t in self.opts.tensor_types]

    def tensor_type(self, name: str, shape: Sequence[int], source_type: str = "F32") -> str:
        """The type of one tensor (shape in numpy order; last dim is the row)."""
        if not allows_quantization(name, len(shape)):
            return source_type
        cat = _category(name)
        if self.opts.token_embedding_type and cat == "token_embd":
            return self.opts.token_embedding_type
        if self.opts.output_type and cat == "output":
            return self.opts.output_type
        new = self.ft.default
        if not self.ft.quantized:
            return new
        manual = False
        for pat, t in self._patterns:
            if pat.search(name):
                new, manual = t, True
                break
        if not manual and not self.opts.pure:
            new = self._mix(new, cat, shape[-1])
        return self._fallback(new, shape[-1])

    def _fallback(self, t: str, ncols: int) -> str:
        if ncols % block_size(t) == 0:
            return t
        t2 = _FALLBACK.get(t, t)
        return t2 if ncols % block_size(t2) == 0 else "F16"

    def _mix(self, new: str, cat: str, ncols: int) -> str:  # noqa: C901 (it is llama.cpp's table)
        f, gqa = self.ft.name, self.n_gqa
        if cat == "output" or (self.tied and cat == "token_embd"):
            if ncols % block_size(new) != 0:
                return "Q8_0"
            return new if new == "Q8_0" else "Q6_K"
        if cat == "token_embd":
            return new
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            i, n = self.i_attention_wv, self.n_attention_wv
            if f == "Q2_K":
                new = "Q4_K" if gqa >= 4 else "Q3_K"
            elif f == "Q3_K_M":
                new = "Q5_K" if i < 2 else "Q4_K"
            elif f == "Q3_K_L":
                new = "Q5_K"
            elif f in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
                new = "Q5_K"
            elif f in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
                new = "Q6_K"
            elif f == "Q4_K_S" and i < 4:
                new = "Q5_K"
            if self.is_70b and new in ("Q3_K", "Q4_K"):
                new = "Q5_K"
            self.i_attention_wv += 1
        elif cat == "ffn_down":
            i, n = self.i_ffn_down, self.n_layer
            if f == "Q2_K":
                new = "Q3_K"
            elif f == "Q3_K_M":
                new = "Q5_K" if i < n // 16 else "Q4_K"   # (the Q3_K branch is Falcon's only)
            elif f == "Q3_K_L":
                new = "Q5_K"
            elif f == "Q4_K_M":
                if _more_bits(i, n):
                    new = "Q6_K"
            elif i < n // 8 and f in ("IQ4_NL", "IQ4_XS") and not self.opts.has_imatrix:
                new = "Q5_K"
            elif f == "Q5_K_M" and _more_bits(i, n):
                new = "Q6_K"
            elif f == "Q4_K_S" and i < n // 8:
                new = "Q5_K"
            elif f in ("Q4_0", "Q5_0") and self.opts.has_imatrix and i < n // 8:
                new = "Q4_1" if f == "Q4_0" else "Q5_1"
            self.i_ffn_down += 1
        elif cat == "attn_output":
            new = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(f, new)
        return new
