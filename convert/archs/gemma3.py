"""Gemma 3 text models (and the text model inside a Gemma 3 multimodal checkpoint)."""
import gguf
from gguf import GGUFValueType as V

from ggforge.convert.archs.base import ArchSpec, HParams
from ggforge.formats.gguf_writer import KV


def _gemma3_kv(spec: ArchSpec, hp: HParams) -> list[KV]:
    """Gemma3Model.set_gguf_parameters: defaults for keys the HF config may omit."""
    K, k = gguf.Keys, spec.key
    head_dim = int(hp.get("head_dim", default=256))
    out = [
        KV(k(K.LLM.CONTEXT_LENGTH), V.UINT32, int(hp.get("max_position_embeddings", default=131072))),
        KV(k(K.Attention.HEAD_COUNT), V.UINT32, int(hp.get("num_attention_heads", default=8))),
        KV(k(K.Attention.LAYERNORM_RMS_EPS), V.FLOAT32, float(hp.get("rms_norm_eps", default=1e-6))),
        KV(k(K.Attention.KEY_LENGTH), V.UINT32, head_dim),
        KV(k(K.Attention.VALUE_LENGTH), V.UINT32, head_dim),
        KV(k(K.Rope.FREQ_BASE), V.FLOAT32, float(hp.rope_full().get("rope_theta", 1_000_000.0))),
    ]
    if hp.get("final_logit_softcapping"):
        out.append(KV(k(K.LLM.FINAL_LOGIT_SOFTCAPPING), V.FLOAT32,
                      float(hp.get("final_logit_softcapping"))))
    if hp.get("sliding_window_pattern") != 1:
        out.append(KV(k(K.Attention.SLIDING_WINDOW), V.UINT32, int(hp.need("sliding_window"))))
    out.append(KV(k(K.Attention.HEAD_COUNT_KV), V.UINT32, int(hp.get("num_key_value_heads", default=4))))
    return out


GEMMA3 = ArchSpec(
    hf_names=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    arch=gguf.MODEL_ARCH.GEMMA3,
    norm_shift=1.0,  # Gemma3RMSNorm computes x * (1 + w)
    trim_embd_to_vocab=True,  # checkpoints carry unused embedding rows past the vocabulary
    extra_kv=_gemma3_kv,
)
