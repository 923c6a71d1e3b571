"""Qwen 2 (attention bias) and Qwen 3 (q/k norms): llama.cpp's neox-rope families."""
import gguf

from ggforge.convert.archs.base import ArchSpec

QWEN2 = ArchSpec(hf_names=("Qwen2ForCausalLM",), arch=gguf.MODEL_ARCH.QWEN2)
QWEN3 = ArchSpec(hf_names=("Qwen3ForCausalLM",), arch=gguf.MODEL_ARCH.QWEN3)
