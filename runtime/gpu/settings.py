"""The GPU backend's settings: defaults, overridable from the API or the command line.

    from ggforge.runtime import gpu
    gpu.configure(pdl=False)                            # no programmatic dependent launch
    gpu.configure(q8_tiles=settings.read_tile_file("q8_tiles.json"))  # decode tiles

Nothing here is read from environment variables. Whether Triton's interpreter runs the
kernels is Triton's own choice, made when triton is first imported (its TRITON_INTERPRET
switch: the test suite sets it on machines without a GPU, so the same kernels run on the
CPU); the backend reads that choice and never writes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import triton

# Triton's interpreter runs the kernels (on CPU tensors), as Triton was imported with
INTERPRET = bool(triton.knobs.runtime.interpret)


@dataclass(frozen=True)
class GpuSettings:
    """``pdl``: programmatic dependent launch of the decode kernels (None: on where the
    GPU has it, Hopper and later). ``q8_tiles``: decode tiles by shape for Q8_0-planar
    products, {"NOUTxNIN": {"BM": int, "BK": int, "num_warps": int}}, tried before the
    built-in table (scripts/device/q8_sweep.py writes such a file)."""

    pdl: bool | None = None
    q8_tiles: dict = field(default_factory=dict)


_current = GpuSettings()


def current() -> GpuSettings:
    return _current


def configure(**changes) -> GpuSettings:
    """Replace the given fields of the settings (unknown names: TypeError); returns the
    new settings. Takes effect at the next kernel launch."""
    global _current
    if "q8_tiles" in changes:
        changes["q8_tiles"] = check_tiles(changes["q8_tiles"] or {}, "q8_tiles")
    _current = replace(_current, **changes)
    return _current


def check_tiles(tiles, where: str) -> dict:
    """``tiles`` if it is a tile table, else one ValueError naming ``where``."""
    ok = isinstance(tiles, dict) and all(
        isinstance(v, dict) and sorted(v) == ["BK", "BM", "num_warps"]
        and all(type(n) is int and n > 0 for n in v.values()) for v in tiles.values())
    if not ok:
        raise ValueError(f'{where}: not a tile table of q8_sweep.py (each shape needs '
                         f'{{"BM": int, "BK": int, "num_warps": int}})')
    return dict(tiles)


def read_tile_file(path: str | Path) -> dict:
    """A tile table from a JSON file of scripts/device/q8_sweep.py; one ValueError naming
    the file if it is unreadable or malformed."""
    try:
        tiles = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a tile file of q8_sweep.py ({e})") from None
    return check_tiles(tiles, str(path))
