"""What is inside a model file (GGUF or safetensors), as plain data for `ggforge inspect`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ggforge.formats.errors import FormatError
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.safetensors import SafetensorsFile

ARRAY_HEAD = 8  # long arrays are shown by their first few elements


def _summarize_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        if len(value) <= ARRAY_HEAD:
            return value
        return {"array_length": len(value), "first": value[:ARRAY_HEAD]}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _totals(tensors: list[dict[str, Any]]) -> tuple[dict[str, dict[str, int]], int, int]:
    by_type: dict[str, dict[str, int]] = {}
    for t in tensors:
        d = by_type.setdefault(t["type"], {"tensors": 0, "params": 0, "bytes": 0})
        d["tensors"] += 1
        d["params"] += t["params"]
        d["bytes"] += t["bytes"]
    params = sum(d["params"] for d in by_type.values())
    nbytes = sum(d["bytes"] for d in by_type.values())
    return by_type, params, nbytes


def summarize(path: str | Path) -> dict[str, Any]:
    """Metadata, tensor table, totals by type, parameter count, bits per weight."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        out = _gguf(path)
    elif path.suffix == ".safetensors":
        out = _safetensors(path)
    else:
        raise FormatError(f"{path}: neither GGUF (magic {magic!r}) nor .safetensors")
    by_type, params, nbytes = _totals(out["tensors"])
    out.update(file=str(path), file_size=path.stat().st_size, totals_by_type=by_type,
               params=params, tensor_bytes=nbytes,
               bits_per_weight=round(8 * nbytes / params, 4) if params else 0.0)
    return out


def _gguf(path: Path) -> dict[str, Any]:
    with GGUFFile.open(path) as g:
        meta = {k: _summarize_value(v) for k, v in g.metadata.items()}
        tensors = [{"name": t.name, "type": t.type_name, "shape": list(t.shape),
                    "params": t.n_elements, "bytes": t.nbytes} for t in g.tensors.values()]
        return {"format": "gguf", "version": g.version, "alignment": g.alignment,
                "metadata": meta, "tensors": tensors}


def _safetensors(path: Path) -> dict[str, Any]:
    with SafetensorsFile.open(path) as s:
        tensors = [{"name": t.name, "type": t.dtype, "shape": list(t.shape),
                    "params": t.n_elements, "bytes": t.nbytes} for t in s.tensors.values()]
        return {"format": "safetensors", "metadata": dict(s.metadata), "tensors": tensors}
