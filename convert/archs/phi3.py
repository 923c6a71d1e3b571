"""Phi-3 / Phi-4 dense: Phi3MiniModel of llama.cpp's converter (conversion/phi.py).

The checkpoint's fused projections stay fused, as llama.cpp keeps them: qkv_proj becomes
attn_qkv (q rows, then k, then v) and gate_up_proj becomes ffn_up (2 * n_ff rows: the gate,
then the up projection). Long-context checkpoints (rope type longrope, or su) get their
long and short rope factors as tensors and rope.scaling.attn_factor.
"""
import math
from typing import Iterator

import gguf
import numpy as np
from gguf import GGUFValueType as V

from ggforge.convert.archs.base import ArchSpec, HParams
from ggforge.formats.errors import UnsupportedModelError
from ggforge.formats.gguf_writer import KV


def _rope(hp: HParams) -> tuple[dict, int, int]:
    """(rope parameters, rope dims, original context) as the converter reads them."""
    rp = hp.rope_full()
    n_embd, n_head = int(hp.need("hidden_size", "n_embd")), int(hp.need("num_attention_heads", "n_head"))
    orig = rp.get("original_max_position_embeddings", hp.get("original_max_position_embeddings"))
    if orig is None:
        raise UnsupportedModelError(f"{hp.path}: missing hyper-parameter 'original_max_position_embeddings'")
    pct = rp.get("partial_rotary_factor", hp.get("partial_rotary_factor", default=1.0))
    return rp, int(pct * n_embd) // n_head, int(orig)


def _phi3_kv(spec: ArchSpec, hp: HParams) -> list[KV]:
    K, k = gguf.Keys, spec.key
    rp, rope_dims, orig = _rope(hp)

    def u32(key: str, v) -> KV:
        return KV(k(key), V.UINT32, int(v))

    out = [
        u32(K.LLM.CONTEXT_LENGTH, hp.need("n_positions", "max_position_embeddings")),
        u32(K.Rope.SCALING_ORIG_CTX_LEN, orig),
        u32(K.LLM.EMBEDDING_LENGTH, hp.need("hidden_size", "n_embd")),
        u32(K.LLM.FEED_FORWARD_LENGTH, hp.need("intermediate_size")),
        u32(K.LLM.BLOCK_COUNT, hp.need("num_hidden_layers")),
        u32(K.Attention.HEAD_COUNT, hp.need("num_attention_heads", "n_head")),
        u32(K.Attention.HEAD_COUNT_KV, hp.need("num_key_value_heads", "n_head_kv")),
        KV(k(K.Attention.LAYERNORM_RMS_EPS), V.FLOAT32, float(hp.need("rms_norm_eps"))),
        u32(K.Rope.DIMENSION_COUNT, rope_dims),
        KV(k(K.Rope.FREQ_BASE), V.FLOAT32, float(rp["rope_theta"] if "rope_theta" in rp else hp.need("rope_theta"))),
    ]
    # the converter writes the attention factor with the rope factor tensors (generate_extra_tensors),
    # after the file type; keys go in the order they are added
    out.append(u32(K.Attention.SLIDING_WINDOW, hp.get("sliding_window", default=0)))
    factor = _attn_factor(hp)
    if factor is not None:
        out.append(KV(k(K.Rope.SCALING_ATTN_FACTOR), V.FLOAT32, factor))
    return out


def _attn_factor(hp: HParams) -> float | None:
    rp, rope_dims, orig = _rope(hp)
    if not rp.get("long_factor"):
        return None
    scale = int(hp.need("n_positions", "max_position_embeddings")) / orig
    rtype = str(rp.get("rope_type", rp.get("type", ""))).lower()
    if rtype in ("su", "longrope"):
        return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    if rtype == "yarn":
        return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    raise UnsupportedModelError(f"{hp.path}: rope scaling type {rtype!r} is not supported "
                                "(Phi-3 supports longrope, su, yarn)")


def _phi3_tensors(spec: ArchSpec, hp: HParams) -> Iterator[tuple[str, np.ndarray]]:
    rp, rope_dims, _ = _rope(hp)
    long, short = rp.get("long_factor"), rp.get("short_factor")
    if not long:
        return
    if short is None or len(long) != len(short) or len(long) != rope_dims / 2:
        raise UnsupportedModelError(f"{hp.path}: rope long_factor and short_factor must both have "
                                    f"{rope_dims // 2} entries")
    yield "rope_factors_long.weight", np.asarray(long, np.float32)
    yield "rope_factors_short.weight", np.asarray(short, np.float32)


PHI3 = ArchSpec(
    hf_names=("Phi3ForCausalLM",),
    arch=gguf.MODEL_ARCH.PHI3,
    extra_kv=_phi3_kv,
    common_kvs=False,
    extra=_phi3_tensors,
)
