"""Gemma 2: Gemma2Model of llama.cpp's converter (conversion/gemma.py).

Its set_gguf_parameters writes its own keys and skips the base's (no rope keys: llama.cpp
runs Gemma 2 at its default rope base, 10000, which is the models' rope_theta); the
soft-caps and the sliding window are the family's. Norm weights are stored as w + 1.
"""
import gguf
from gguf import GGUFValueType as V

from ggforge.convert.archs.base import ArchSpec, HParams
from ggforge.formats.gguf_writer import KV


def _gemma2_kv(spec: ArchSpec, hp: HParams) -> list[KV]:
    K, k = gguf.Keys, spec.key

    def u32(key: str, v) -> KV:
        return KV(k(key), V.UINT32, int(v))

    def f32(key: str, v) -> KV:
        return KV(k(key), V.FLOAT32, float(v))

    return [
        u32(K.LLM.CONTEXT_LENGTH, hp.need("max_position_embeddings")),
        u32(K.LLM.EMBEDDING_LENGTH, hp.need("hidden_size")),
        u32(K.LLM.BLOCK_COUNT, hp.need("num_hidden_layers")),
        u32(K.LLM.FEED_FORWARD_LENGTH, hp.need("intermediate_size")),
        u32(K.Attention.HEAD_COUNT, hp.need("num_attention_heads")),
        u32(K.Attention.HEAD_COUNT_KV, hp.get("num_key_value_heads", "num_attention_heads")),
        f32(K.Attention.LAYERNORM_RMS_EPS, hp.need("rms_norm_eps")),
        u32(K.Attention.KEY_LENGTH, hp.need("head_dim")),
        u32(K.Attention.VALUE_LENGTH, hp.need("head_dim")),
        f32(K.LLM.ATTN_LOGIT_SOFTCAPPING, hp.need("attn_logit_softcapping")),
        f32(K.LLM.FINAL_LOGIT_SOFTCAPPING, hp.need("final_logit_softcapping")),
        u32(K.Attention.SLIDING_WINDOW, hp.need("sliding_window")),
    ]


GEMMA2 = ArchSpec(
    hf_names=("Gemma2ForCausalLM",),
    arch=gguf.MODEL_ARCH.GEMMA2,
    norm_shift=1.0,  # Gemma2RMSNorm computes x * (1 + w)
    skip=("lm_head.weight",),  # tied to the embedding; llama.cpp's loader takes no output.weight
    extra_kv=_gemma2_kv,
    common_kvs=False,
)
