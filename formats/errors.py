"""The project's error types. Each message names the file, tensor or key and what to do."""


class FormatError(ValueError):
    """A file on disk is malformed or not what it claims to be."""


class UnsupportedModelError(ValueError):
    """A model (architecture, tensor, type) that ggforge does not handle."""


class QuantizationError(ValueError):
    """A tensor cannot be quantized as asked (NaN/Inf, bad shape, unknown type)."""
