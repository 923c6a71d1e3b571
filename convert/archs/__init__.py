"""Architecture specs, looked up by config.json's `architectures`."""
from __future__ import annotations

from ggforge.convert.archs.base import ArchSpec, HParams
from ggforge.convert.archs.gemma2 import GEMMA2
from ggforge.convert.archs.gemma3 import GEMMA3
from ggforge.convert.archs.llama import LLAMA
from ggforge.convert.archs.phi3 import PHI3
from ggforge.convert.archs.qwen import QWEN2, QWEN3
from ggforge.formats.errors import UnsupportedModelError

SPECS: tuple[ArchSpec, ...] = (LLAMA, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3)
BY_HF_NAME: dict[str, ArchSpec] = {n: s for s in SPECS for n in s.hf_names}


def supported() -> list[str]:
    return sorted(BY_HF_NAME)


def spec_for_config(config: dict, path: str = "config.json") -> ArchSpec:
    """The spec for a config.json's `architectures`; UnsupportedModelError otherwise."""
    names = config.get("architectures") or []
    for n in names:
        if n in BY_HF_NAME:
            return BY_HF_NAME[n]
    raise UnsupportedModelError(
        f"{path}: architecture {', '.join(map(str, names)) or '(none given)'} is not supported; "
        f"supported: {', '.join(supported())}")


__all__ = ["ArchSpec", "HParams", "SPECS", "spec_for_config", "supported"]
