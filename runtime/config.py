"""A model's shape and switches, read from GGUF metadata and tensor names.

The forward's structure (runtime/decoder.py) is driven by these fields; what differs
between families is data in TRAITS (keyed by general.architecture) or is read from the
file. The decoder is the one place of the runtime that reads them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ggforge.formats.errors import FormatError, UnsupportedModelError
from ggforge.formats.gguf_reader import GGUFFile


@dataclass(frozen=True)
class Traits:
    """What llama.cpp's graph for an architecture does that the metadata does not say."""

    rope: str                   # "norm": rotate pairs (2i, 2i+1); "neox": (i, i + d/2)
    act: str                    # FFN gate activation: "silu" or "gelu" (tanh approximation)
    embed_scale: bool = False   # multiply embeddings by sqrt(n_embd)
    swa_pattern: int = 0        # every n-th layer is global, the others sliding (0: none)
    q_scale_on_q: bool = False  # scale q before attention (Gemma, Phi-3) instead of inside softmax
    attn_softcap: bool = False  # soft-cap the attention scores by {arch}.attn_logit_softcapping
    swa_rope_base: float | None = 10000.0   # sliding layers' default rope base (None: the global one)
    # layer counts at which the query scale is 1/sqrt(n_embd/n_head), not 1/sqrt(head_dim)
    # (llama.cpp's Gemma 2 27B: query_pre_attn_scalar = n_embd / n_head)
    embd_scale_at_layers: tuple[int, ...] = ()


TRAITS: dict[str, Traits] = {
    "llama": Traits(rope="norm", act="silu"),
    "qwen2": Traits(rope="neox", act="silu"),
    "qwen3": Traits(rope="neox", act="silu"),
    "gemma3": Traits(rope="neox", act="gelu", embed_scale=True, swa_pattern=6, q_scale_on_q=True),
    "gemma2": Traits(rope="neox", act="gelu", embed_scale=True, swa_pattern=2, q_scale_on_q=True,
                     attn_softcap=True, swa_rope_base=None, embd_scale_at_layers=(46,)),
    "phi3": Traits(rope="neox", act="silu", q_scale_on_q=True),
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    traits: Traits
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int               # key/query head size
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    eps: float
    rope_base: float
    rope_scale: float           # multiplies positions (1 / linear scaling factor)
    rope_base_swa: float
    n_rot: int
    sliding_window: int         # 0: no sliding-window layers
    attn_scale: float
    final_softcap: float
    attn_softcap: float         # 0: none
    rope_mscale: float          # cos/sin multiplied by this ({arch}.rope.scaling.attn_factor)
    n_ctx_orig: int             # past this context, long rope factors (rope_factors_long)
    has_rope_freqs: bool
    tied_output: bool

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> "ModelConfig":
        arch = g.get("general.architecture")
        if arch not in TRAITS:
            raise UnsupportedModelError(f"{g.path}: architecture {arch!r} is not supported; "
                                        f"supported: {', '.join(TRAITS)}")
        t = TRAITS[arch]

        def key(name: str, default=None, required: bool = False):
            v = g.get(f"{arch}.{name}", default)
            if v is None and required:
                raise FormatError(f"{g.path}: missing metadata key {arch}.{name}")
            if isinstance(v, np.ndarray):  # per-layer arrays: all layers alike here
                if v.size == 0 or np.any(v != v.flat[0]):
                    raise UnsupportedModelError(f"{g.path}: {arch}.{name} varies by layer")
                v = v.flat[0].item()
            return v

        n_embd = int(key("embedding_length", required=True))
        n_head = int(key("attention.head_count", required=True))
        head_dim = int(key("attention.key_length", n_embd // n_head))
        scaling = g.get(f"{arch}.rope.scaling.type", "none")
        factor = float(key("rope.scaling.factor", 1.0) or 1.0)
        if scaling not in ("none", "linear"):
            raise UnsupportedModelError(f"{g.path}: rope scaling {scaling!r} is not supported")
        vocab = g.get("tokenizer.ggml.tokens")
        emb = g.tensors.get("token_embd.weight")
        if emb is None:
            raise FormatError(f"{g.path}: tensor token_embd.weight is missing")
        base = float(key("rope.freq_base", 10000.0))
        n_layer = int(key("block_count", required=True))
        attn_scale = 1.0 / math.sqrt(n_embd / n_head if n_layer in t.embd_scale_at_layers else head_dim)
        return cls(
            arch=arch, traits=t,
            n_layer=n_layer, n_embd=n_embd, n_head=n_head,
            n_head_kv=int(key("attention.head_count_kv", n_head)), head_dim=head_dim,
            head_dim_v=int(key("attention.value_length", head_dim)),
            n_ff=int(key("feed_forward_length", required=True)),
            n_vocab=emb.shape[0] if vocab is None else len(vocab),
            n_ctx_train=int(key("context_length", 4096)),
            eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=base, rope_scale=1.0 / factor if scaling == "linear" else 1.0,
            rope_base_swa=float(key("rope.freq_base_swa", base if t.swa_rope_base is None else t.swa_rope_base)),
            n_rot=int(key("rope.dimension_count", head_dim)),
            sliding_window=int(key("attention.sliding_window", 0) or 0),
            attn_scale=attn_scale,
            final_softcap=float(key("final_logit_softcapping", 0.0) or 0.0),
            attn_softcap=float(key("attn_logit_softcapping", 0.0) or 0.0) if t.attn_softcap else 0.0,
            rope_mscale=float(key("rope.scaling.attn_factor", 1.0) or 1.0),
            n_ctx_orig=int(key("rope.scaling.original_context_length", 0) or key("context_length", 4096)),
            has_rope_freqs="rope_freqs.weight" in g.tensors,
            tied_output="output.weight" not in g.tensors,
        )
