"""ggforge: Hugging Face safetensors -> GGUF with block-wise quantization."""
from ggforge.formats.errors import FormatError, QuantizationError, UnsupportedModelError

__version__ = "0.1.0"
__all__ = ["FormatError", "QuantizationError", "UnsupportedModelError", "__version__"]
