"""Llama family: Llama 2/3 (llama3 rope scaling), SmolLM, TinyLlama, Mistral."""
import gguf
from gguf import GGUFValueType as V

from ggforge.convert.archs.base import ArchSpec, HParams
from ggforge.formats.gguf_writer import KV


def _llama_kv(spec: ArchSpec, hp: HParams) -> list[KV]:
    K = gguf.Keys
    return [KV(spec.key(K.LLM.VOCAB_SIZE), V.UINT32, int(hp.need("vocab_size"))),
            KV(spec.key(K.Rope.DIMENSION_COUNT), V.UINT32, hp.head_dim)]


LLAMA = ArchSpec(
    hf_names=("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM"),
    arch=gguf.MODEL_ARCH.LLAMA,
    permute_qk=True,
    llama3_rope_freqs=True,
    extra_kv=_llama_kv,
)
