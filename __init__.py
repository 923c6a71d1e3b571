"""ggforge: Hugging Face safetensors -> GGUF with block-wise quantization, and a runtime.

    import ggforge
    m = ggforge.load("model.gguf")
    for piece in m.generate("Once upon a time", max_tokens=64):
        print(piece, end="")
"""
from ggforge.formats.errors import FormatError, QuantizationError, UnsupportedModelError

__version__ = "0.1.0"
__all__ = ["FormatError", "QuantizationError", "UnsupportedModelError", "load", "__version__"]


def load(path, *, n_ctx=None):
    """Map a GGUF model (weights stay quantized) with its tokenizer; see runtime.generate."""
    from ggforge.runtime.generate import load as _load

    return _load(path, n_ctx=n_ctx)
