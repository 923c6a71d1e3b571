"""Bytes on disk: GGUF reader/writer, safetensors reader, quantization types."""
