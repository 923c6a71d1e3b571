"""llama.cpp importance-matrix files: the GGUF format and the legacy .dat format.

Both give, per tensor name, the mean squared activation of each input column; the K-quants
use it to weight their rounding errors. The values are what llama-quantize computes from
them (tools/quantize/quantize.cpp of the llama.cpp bundled with llama-cpp-python 0.3.36):
GGUF `in_sum2 / counts` (1 where a count is zero), legacy `sums / ncall`.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ggforge.formats.errors import FormatError
from ggforge.formats.gguf_reader import GGUFFile

_MAX_NAME = 1 << 16


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """Tensor name -> float32 importance per input column (all experts concatenated)."""
    return load_imatrix_with_meta(path)[0]


def load_imatrix_with_meta(path: str | Path) -> tuple[dict[str, np.ndarray], tuple[str, ...], int]:
    """load_imatrix's values, and the file's datasets and chunk count as llama-quantize
    reads them (the legacy format: the chunk count and one dataset name after the entries,
    when present; 0 and none when not), from one read of the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise FormatError(f"{path}: cannot read imatrix file: {e.strerror}") from None
    data, datasets, chunks = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    if not data:
        raise FormatError(f"{path}: the imatrix file holds no entries")
    for name, v in data.items():
        if not np.all(np.isfinite(v)):
            raise FormatError(f"{path}: imatrix entry {name!r} holds NaN or Inf")
    return data, datasets, chunks


def _load_gguf(path: Path) -> tuple[dict[str, np.ndarray], tuple[str, ...], int]:
    with GGUFFile.open(path) as g:
        for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
            if key not in g.metadata:
                raise FormatError(f"{path}: GGUF imatrix without its metadata key {key!r}")
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for name, info in g.tensors.items():
            for suffix in (".in_sum2", ".counts"):
                if name.endswith(suffix):
                    if info.ggml_type != T.F32:
                        raise FormatError(f"{path}: imatrix tensor {name!r} must be F32, is {info.type_name}")
                    pairs.setdefault(name[: -len(suffix)], {})[suffix] = np.array(g.array(name)).reshape(-1)
        out = {}
        for name, p in pairs.items():
            if len(p) != 2:
                raise FormatError(f"{path}: imatrix entry {name!r} lacks its sums or counts")
            sums, counts = p[".in_sum2"], np.rint(p[".counts"])
            if counts.size == 0 or sums.size % counts.size:
                raise FormatError(f"{path}: imatrix entry {name!r}: {sums.size} sums for {counts.size} counts")
            per = sums.reshape(counts.size, -1)
            c = counts.astype(np.float32)[:, None]
            out[name] = np.where(c > 0, per / np.where(c > 0, c, 1), np.float32(1)).astype(np.float32).reshape(-1)
        ds = g.metadata["imatrix.datasets"]
        datasets = tuple(map(str, ds)) if isinstance(ds, (list, tuple)) else (str(ds),)
        return out, datasets, int(g.metadata["imatrix.chunk_count"])


def _load_legacy(path: Path) -> tuple[dict[str, np.ndarray], tuple[str, ...], int]:
    raw = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(raw):
            raise FormatError(f"{path}: legacy imatrix truncated at byte {pos} reading {what}")
        pos += n
        return raw[pos - n:pos]

    (n_entries,) = struct.unpack("<i", take(4, "the entry count"))
    if n_entries < 1 or n_entries * 16 > len(raw):
        raise FormatError(f"{path}: not an imatrix file (entry count {n_entries})")
    out: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        (length,) = struct.unpack("<i", take(4, f"entry {i} name length"))
        if not 0 < length < _MAX_NAME:
            raise FormatError(f"{path}: entry {i} has a name length of {length}")
        try:
            name = take(length, f"entry {i} name").decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: entry {i} name is not UTF-8") from None
        ncall, nval = struct.unpack("<ii", take(8, f"entry {name!r} counts"))
        if nval < 1:
            raise FormatError(f"{path}: entry {name!r} has {nval} values")
        sums = np.frombuffer(take(4 * nval, f"entry {name!r} values"), dtype="<f4").astype(np.float32)
        out[name] = sums / np.float32(ncall) if ncall > 0 else sums
    tail, chunks, datasets = raw[pos:], 0, ()
    if len(tail) >= 4:
        (chunks,) = struct.unpack("<i", tail[:4])
        if len(tail) >= 8:
            (n,) = struct.unpack("<i", tail[4:8])
            if 0 < n <= len(tail) - 8:
                datasets = (tail[8:8 + n].decode("utf-8", "replace"),)
    return out, datasets, max(chunks, 0)


def imatrix_for(imatrix: dict[str, np.ndarray] | None, name: str, n_per_row: int,
                path: str = "imatrix") -> np.ndarray | None:
    """The importance vector of one tensor, checked against its row length."""
    if imatrix is None or name not in imatrix:
        return None
    v = imatrix[name]
    if v.size != n_per_row:
        raise FormatError(f"{path}: imatrix entry {name!r} has {v.size} values; the tensor's rows "
                          f"have {n_per_row} (an imatrix of another model?)")
    return v


__all__ = ["load_imatrix", "load_imatrix_with_meta", "imatrix_for"]
