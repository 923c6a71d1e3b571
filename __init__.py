"""ggforge: Hugging Face safetensors -> GGUF with block-wise quantization, and a runtime.

    import ggforge
    m = ggforge.load("model.gguf")
    for piece in m.generate("Once upon a time", max_tokens=64, temperature=0):
        print(piece, end="")
    for piece in m.chat([{"role": "user", "content": "Hello"}]):
        print(piece, end="")
"""
from ggforge.formats.errors import FormatError, QuantizationError, UnsupportedModelError

__version__ = "0.1.0"
__all__ = ["FormatError", "QuantizationError", "UnsupportedModelError", "load", "__version__"]


def load(path, *, n_ctx=None, gpu_layers=0, cache_type_k="f16", cache_type_v="f16", flash_attn="auto",
         **kw):
    """Map a GGUF model (weights stay quantized) with its tokenizer, ready to generate.

    ``n_ctx``: the context (default: the file's, at most 4096); ``gpu_layers``: a count as
    llama.cpp's --n-gpu-layers, 'all' or 'auto' (needs ``pip install 'ggforge[gpu]'``);
    ``cache_type_k`` / ``cache_type_v``: the KV cache's element type, 'f16' (llama.cpp's
    default) or 'f32'; ``flash_attn`` ('auto', 'on', 'off'): with an F16 cache, attention
    computed as llama.cpp's CPU flash attention (its default). Further keywords (``gpu_memory``, ``device``) as runtime.generate.load."""
    from ggforge.runtime.generate import load as _load

    return _load(path, n_ctx=n_ctx, gpu_layers=gpu_layers, cache_type_k=cache_type_k,
                 cache_type_v=cache_type_v, flash_attn=flash_attn, **kw)
