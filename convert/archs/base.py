"""What an architecture family is, as data: its names, hyper-parameters and tensor transforms.

An `ArchSpec` says how a Hugging Face checkpoint of one family becomes llama.cpp's GGUF:
the GGUF architecture name, the hyper-parameter keys llama.cpp reads, and the few tensor
transforms llama.cpp's own converter applies (convert_hf_to_gguf.py of the llama.cpp bundled
with llama-cpp-python 0.3.36). Tensor names come from gguf-py's reference name map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import gguf
import numpy as np
from gguf import GGUFValueType as V

from ggforge.formats.errors import UnsupportedModelError
from ggforge.formats.gguf_writer import KV

# HF tensor names the converter drops (buffers, not weights)
SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
# prefixes of the non-text towers inside multimodal checkpoints (the text model is kept)
SKIP_MARKERS = ("vision_tower.", "vision_model.", "multi_modal_projector.", "multimodal_projector.",
                "audio_tower.", "visual.")


@dataclass
class HParams:
    """config.json, with a multimodal checkpoint's text_config lifted to the top."""

    raw: dict[str, Any]
    path: str = "config.json"

    @classmethod
    def from_config(cls, config: dict[str, Any], path: str = "config.json") -> "HParams":
        merged = dict(config)
        if isinstance(config.get("text_config"), dict):
            merged.update(config["text_config"])
        return cls(merged, path)

    def get(self, *keys: str, default: Any = None) -> Any:
        for k in keys:
            if self.raw.get(k) is not None:
                return self.raw[k]
        return default

    def need(self, *keys: str) -> Any:
        v = self.get(*keys)
        if v is None:
            raise UnsupportedModelError(f"{self.path}: missing hyper-parameter {keys[0]!r}")
        return v

    @property
    def n_head(self) -> int:
        return int(self.need("num_attention_heads", "n_head", "n_heads"))

    @property
    def n_head_kv(self) -> int:
        return int(self.get("num_key_value_heads", "n_kv_heads", default=self.n_head))

    @property
    def head_dim(self) -> int:
        hd = self.get("head_dim")
        return int(hd) if hd is not None else int(self.need("hidden_size")) // self.n_head

    def rope(self) -> dict[str, Any]:
        """Rope parameters in transformers-v5 form, from either v5 or v4 configs."""
        rp = dict(self.get("rope_parameters", "rope_scaling", default={}) or {})
        if "full_attention" not in rp and "sliding_attention" not in rp:
            local = self.get("rope_local_base_freq", "local_rope_theta")
            if local is not None:
                rp["sliding_attention"] = {"rope_theta": local}
            if "rope_theta" not in rp and self.get("rope_theta") is not None:
                rp["rope_theta"] = self.get("rope_theta")
            if "rope_type" not in rp and rp.get("type") is not None:
                rp["rope_type"] = rp["type"]
        return rp

    def rope_full(self) -> dict[str, Any]:
        rp = self.rope()
        return rp.get("full_attention", rp)


@dataclass(frozen=True)
class ArchSpec:
    """One architecture family: everything the converter needs to know about it."""

    hf_names: tuple[str, ...]              # values of config.json `architectures`
    arch: gguf.MODEL_ARCH                  # llama.cpp's architecture
    permute_qk: bool = False               # undo HF's rotary layout of q/k (llama)
    norm_shift: float = 0.0                # added to every *norm.weight (Gemma stores w - 1)
    llama3_rope_freqs: bool = False        # llama3 rope scaling as a rope_freqs tensor
    trim_embd_to_vocab: bool = False       # drop token_embd rows past the tokenizer's vocabulary
    extra_kv: Callable[["ArchSpec", HParams], list[KV]] | None = None
    common_kvs: bool = True                # False: extra_kv writes every `{arch}.*` key itself
    #                                        (families whose set_gguf_parameters skips the base's)
    extra: Callable[["ArchSpec", HParams], Iterator[tuple[str, np.ndarray]]] | None = None
    skip: tuple[str, ...] = ()             # HF tensor names the family's converter drops
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def key(self, template: str) -> str:
        return template.format(arch=self.name)

    # -- hyper-parameters -------------------------------------------------------------
    def hparam_kvs(self, hp: HParams) -> list[KV]:
        """The `{arch}.*` keys, as TextModel.set_gguf_parameters writes them."""
        K, k = gguf.Keys, self.key
        hp = HParams({**self.defaults, **hp.raw}, hp.path)
        if not self.common_kvs:
            return _dedupe(self.extra_kv(self, hp) if self.extra_kv is not None else [])
        out = [KV(k(K.LLM.BLOCK_COUNT), V.UINT32, int(hp.need("num_hidden_layers", "n_layer")))]

        def u32(key: str, *names: str) -> None:
            v = hp.get(*names)
            if v is not None:
                out.append(KV(k(key), V.UINT32, int(v)))

        u32(K.LLM.CONTEXT_LENGTH, "max_position_embeddings", "n_ctx", "n_positions")
        u32(K.LLM.EMBEDDING_LENGTH, "hidden_size", "n_embd")
        u32(K.LLM.FEED_FORWARD_LENGTH, "intermediate_size", "n_inner")
        u32(K.Attention.HEAD_COUNT, "num_attention_heads", "n_head")
        u32(K.Attention.HEAD_COUNT_KV, "num_key_value_heads", "n_kv_heads")
        out += _rope_kvs(self, hp)
        eps = hp.get("rms_norm_eps", "norm_eps")
        if eps is not None:
            out.append(KV(k(K.Attention.LAYERNORM_RMS_EPS), V.FLOAT32, float(eps)))
        if hp.get("head_dim") is not None:
            out.append(KV(k(K.Attention.KEY_LENGTH), V.UINT32, int(hp.get("head_dim"))))
            out.append(KV(k(K.Attention.VALUE_LENGTH), V.UINT32, int(hp.get("head_dim"))))
        if self.extra_kv is not None:
            out += self.extra_kv(self, hp)
        return _dedupe(out)

    # -- tensors ----------------------------------------------------------------------
    def name_map(self, n_blocks: int) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.arch, n_blocks)

    def transform(self, hf_name: str, data: np.ndarray, hp: HParams) -> np.ndarray:
        """Apply llama.cpp's converter transforms to one float32 tensor (numpy order)."""
        if self.permute_qk:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_rotary(data, hp.n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_rotary(data, hp.n_head_kv)
        if self.norm_shift and hf_name.endswith("norm.weight"):
            data = data + np.float32(self.norm_shift)
        return data

    def extra_tensors(self, hp: HParams) -> Iterator[tuple[str, np.ndarray]]:
        """Tensors llama.cpp's converter generates (rope_freqs for llama3 scaling, the
        family's own: Phi-3's long/short rope factors)."""
        if self.extra is not None:
            yield from self.extra(self, hp)
        rp = hp.rope_full()
        if self.llama3_rope_freqs and str(rp.get("rope_type", "")).lower() == "llama3":
            yield "rope_freqs.weight", llama3_rope_factors(rp, hp.head_dim)


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k rows (half-split rotary) -> llama.cpp's interleaved pairs, per head."""
    # (n_head * head_dim, ...) -> (n_head, 2, head_dim/2, ...) -> swap -> back
    rest = w.shape[1:]
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *rest)
            .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_factors(rp: dict[str, Any], dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3's rope scaling, as llama.cpp's converter makes them."""
    base = float(rp.get("rope_theta", 10000.0))
    factor = float(rp.get("factor", 8.0))
    low, high = float(rp.get("low_freq_factor", 1.0)), float(rp.get("high_freq_factor", 4.0))
    old_ctx = float(rp.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    # the converter computes freqs in float32 (torch), the rest in Python floats
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    out = []
    for f in freqs.astype(np.float32):
        wavelen = 2 * math.pi / float(f)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _rope_kvs(spec: ArchSpec, hp: HParams) -> list[KV]:
    K, k = gguf.Keys, spec.key
    rp = hp.rope()
    full = rp.get("full_attention", rp)
    out: list[KV] = []
    rtype, factor = full.get("rope_type"), full.get("factor")
    if rtype == "linear" and factor is not None:
        out += [KV(k(K.Rope.SCALING_TYPE), V.STRING, "linear"),
                KV(k(K.Rope.SCALING_FACTOR), V.FLOAT32, float(factor))]
    elif rtype == "yarn" and factor is not None:
        out += [KV(k(K.Rope.SCALING_TYPE), V.STRING, "yarn"),
                KV(k(K.Rope.SCALING_FACTOR), V.FLOAT32, float(factor)),
                KV(k(K.Rope.SCALING_ORIG_CTX_LEN), V.UINT32,
                   int(full["original_max_position_embeddings"]))]
    elif rtype not in (None, "default", "llama3"):
        raise UnsupportedModelError(f"{hp.path}: rope scaling type {rtype!r} is not supported "
                                    "(supported: linear, yarn, llama3)")
    if full.get("rope_theta") is not None:
        out.append(KV(k(K.Rope.FREQ_BASE), V.FLOAT32, float(full["rope_theta"])))
    swa_theta = rp.get("sliding_attention", {}).get("rope_theta")
    if swa_theta is not None:
        out.append(KV(k(K.Rope.FREQ_BASE_SWA), V.FLOAT32, float(swa_theta)))
    return out


def _dedupe(kvs: list[KV]) -> list[KV]:
    """Later entries win, keeping the first position (as gguf-py's writer does)."""
    seen: dict[str, KV] = {}
    for kv in kvs:
        seen[kv.key] = kv
    return list(seen.values())
