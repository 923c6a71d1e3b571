"""Writing llama.cpp importance-matrix files, and reading their raw sums back.

An importance matrix holds, per weight matrix, the sum of the squared input activations of
each input column and how many activation rows went into it. Experts of a merged MoE tensor
(GGML_OP_MUL_MAT_ID) each have their own sums and count; a dense matrix has one of each.
Both layouts are what llama-imatrix writes (tools/imatrix/imatrix.cpp of the llama.cpp
bundled with llama-cpp-python 0.3.36, save_imatrix and save_imatrix_legacy):

GGUF: keys `general.type` = "imatrix", `imatrix.datasets` (array of the text files' paths),
`imatrix.chunk_count`, `imatrix.chunk_size` (u32); per entry, in name order, the F32
tensors `<name>.in_sum2` (ne = [n_in, n_mat]) and `<name>.counts` (ne = [1, n_mat]), raw
sums and counts (stored as floats), dimensions as ggml_n_dims gives them (trailing 1s
dropped: a dense entry's tensors are 1-D).

Legacy .dat (int32 and float32, little-endian): the entry count; per entry (name order,
entries without any data left out) the name length, the name, `ncall` = ceil(max count /
chunk_size), the number of values, then (sum / count) * ncall per value (1 * ncall where a
count is zero); then the chunk count and the length-prefixed name of the last dataset.

The reader of the per-column means (what llama-quantize uses) is formats/imatrix.py.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from ggforge.formats.atomic import atomic_output
from ggforge.formats.errors import FormatError
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.gguf_writer import GGUFWriter
from ggforge.formats.imatrix import load_imatrix

FORMATS = ("gguf", "dat")
_KEYS = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")


@dataclass
class ImatrixEntry:
    """One weight's statistics: ``sums`` (n_mat, n_in) float32, Σ x² per input column of
    the rows routed to each matrix (n_mat = 1 for a dense weight, the expert count for a
    merged MoE tensor); ``counts`` (n_mat,) int64, the rows each matrix saw."""

    sums: np.ndarray
    counts: np.ndarray

    @classmethod
    def empty(cls, n_in: int, n_mat: int = 1) -> ImatrixEntry:
        return cls(np.zeros((n_mat, n_in), np.float32), np.zeros(n_mat, np.int64))

    def means(self) -> np.ndarray:
        """Per-column mean squared activation (n_mat * n_in,), as llama-quantize reads the
        GGUF file: 1 for a matrix that saw no rows."""
        c = self.counts.astype(np.float32)[:, None]
        return np.where(c > 0, self.sums / np.where(c > 0, c, 1), np.float32(1)).astype(np.float32).reshape(-1)


@dataclass
class ImatrixData:
    """An importance matrix: entries by weight name, and what it was computed from."""

    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0


# -- GGUF ------------------------------------------------------------------------------------

def gguf_writer(data: ImatrixData) -> GGUFWriter:
    """A planned GGUFWriter (header declared) for ``data``, in llama-imatrix's key order."""
    w = GGUFWriter()
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", list(data.datasets), elem=V.STRING)
    w.add_uint32("imatrix.chunk_count", data.chunk_count)
    w.add_uint32("imatrix.chunk_size", data.chunk_size)
    for name in sorted(data.entries):
        e = data.entries[name]
        n_mat, n_in = e.sums.shape
        # ggml_n_dims: a dimension of 1 at the end is not written
        w.add_tensor_info(f"{name}.in_sum2", (n_in,) if n_mat == 1 else (n_mat, n_in), T.F32)
        w.add_tensor_info(f"{name}.counts", (1,) if n_mat == 1 else (n_mat, 1), T.F32)
    return w


def _write_gguf(data: ImatrixData, f) -> None:
    w = gguf_writer(data)
    w.attach(f)
    w.write_header()
    for name in sorted(data.entries):
        e = data.entries[name]
        w.write_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums, dtype="<f4"))
        w.write_tensor(f"{name}.counts", e.counts.astype("<f4"))
    w.finish()


def read_imatrix_stats(path: str | Path) -> ImatrixData:
    """The raw sums and counts of a GGUF imatrix file (load_imatrix gives the means)."""
    path = Path(path)
    with GGUFFile.open(path) as g:
        for key in _KEYS:
            if key not in g.metadata:
                raise FormatError(f"{path}: GGUF imatrix without its metadata key {key!r}")
        out = ImatrixData(datasets=[str(d) for d in g.metadata["imatrix.datasets"]],
                          chunk_count=int(g.metadata["imatrix.chunk_count"]),
                          chunk_size=int(g.metadata["imatrix.chunk_size"]))
        for tname, info in g.tensors.items():
            if not tname.endswith(".in_sum2"):
                continue
            name = tname[: -len(".in_sum2")]
            if f"{name}.counts" not in g.tensors:
                raise FormatError(f"{path}: imatrix entry {name!r} lacks its counts")
            for t in (tname, f"{name}.counts"):
                if g.tensors[t].ggml_type != T.F32:
                    raise FormatError(f"{path}: imatrix tensor {t!r} must be F32, is {g.tensors[t].type_name}")
            counts = np.array(g.array(f"{name}.counts"), dtype=np.float32).reshape(-1)
            sums = np.array(g.array(tname), dtype=np.float32).reshape(-1)
            if counts.size == 0 or sums.size % counts.size:
                raise FormatError(f"{path}: imatrix entry {name!r}: {sums.size} sums for {counts.size} counts")
            out.entries[name] = ImatrixEntry(sums.reshape(counts.size, -1), np.rint(counts).astype(np.int64))
        return out


# -- legacy .dat -----------------------------------------------------------------------------

def legacy_bytes(data: ImatrixData) -> bytes:
    """The legacy .dat file of ``data``, byte for byte as save_imatrix_legacy writes it."""
    if data.chunk_size < 1:
        raise FormatError(f"imatrix chunk size must be at least 1 for the .dat format, got {data.chunk_size}")
    stored = sorted(n for n, e in data.entries.items() if e.counts.size and (e.counts > 0).any())
    out = [struct.pack("<i", len(stored))]
    for name in stored:
        e = data.entries[name]
        b = name.encode("utf-8")
        ncall = int((int(e.counts.max()) + data.chunk_size - 1) // data.chunk_size)  # ceiling
        c = e.counts.astype(np.float32)[:, None]                      # (n_mat, 1)
        value = np.where(c == 0, np.float32(1), e.sums)
        values = (value / np.where(c == 0, np.float32(1), c)) * np.float32(ncall)  # float32, as C
        out.append(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, e.sums.size))
        out.append(values.astype("<f4").tobytes())
    last = data.datasets[-1].encode("utf-8") if data.datasets else b""
    out.append(struct.pack("<i", data.chunk_count) + struct.pack("<i", len(last)) + last)
    return b"".join(out)


# -- the file --------------------------------------------------------------------------------

def write_imatrix(data: ImatrixData, output: str | Path, fmt: str = "gguf") -> Path:
    """Write ``data`` as ``fmt`` ('gguf' or 'dat') to ``output`` through a partial file
    (formats/atomic.py), read back with load_imatrix before it takes the final name.
    The caller checks the output against its inputs (atomic.check_output)."""
    if fmt not in FORMATS:
        raise ValueError(f"imatrix output format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not data.entries:
        raise FormatError(f"{output}: no matrix products were collected; nothing to write")
    output = Path(output)
    planned = gguf_writer(data).planned_size if fmt == "gguf" else None
    with atomic_output(output, planned_size=planned, validate=lambda p: _validate(p, data)) as f:
        if fmt == "gguf":
            _write_gguf(data, f)
        else:
            f.write(legacy_bytes(data))
    return output


def _validate(path: Path, data: ImatrixData) -> None:
    back = load_imatrix(path)
    stored = {n for n, e in data.entries.items() if (e.counts > 0).any()}
    if not stored <= set(back):
        missing = sorted(stored - set(back))[0]
        raise FormatError(f"{path}: imatrix entry {missing!r} did not read back")


__all__ = ["FORMATS", "ImatrixData", "ImatrixEntry", "gguf_writer", "legacy_bytes",
           "read_imatrix_stats", "write_imatrix"]
