"""The runtime at the settings the llama.cpp comparisons use (no oracle imported here:
the GPU tests run where llama-cpp-python is not installed)."""
from __future__ import annotations


def load_at_oracle_settings(path, **kw):
    """ggforge.load with an F32 cache and no flash attention unless told: the configuration
    the runtime tests compare (llama.cpp's logits with -ctk/-ctv f32 -fa off, as load()
    here gives them; the CPU and GPU backends bit for bit). ggforge's defaults (F16, flash
    attention) are tests/test_flash_attn.py's."""
    from ggforge.runtime.generate import load as ggforge_load

    kw.setdefault("cache_type_k", "f32")
    kw.setdefault("cache_type_v", "f32")
    kw.setdefault("flash_attn", "off")
    return ggforge_load(path, **kw)
