"""The streaming converter: one tensor in memory at a time, written as it is made.

    result = convert("./SmolLM2/model.safetensors", "q8_0")
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ggforge.convert.plan import ConversionPlan, PlannedTensor, plan_conversion
from ggforge.convert.mixes import FileType, MixOptions, parse_file_type
from ggforge.formats.atomic import atomic_output, check_output
from ggforge.formats.errors import FormatError
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.gguf_writer import KV, GGUFWriter
from ggforge.formats.imatrix import imatrix_for
from ggforge.formats.quants import quantize

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 22  # rows are quantized in chunks of about this many elements


@dataclass
class ConvertResult:
    """What was written, for the summary table."""

    output: Path
    file_type: str
    file_size: int
    n_params: int
    seconds: float
    by_type: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # type -> (tensors, params, bytes)

    @property
    def bits_per_weight(self) -> float:
        return 8 * sum(b for _, _, b in self.by_type.values()) / max(self.n_params, 1)


def default_output(plan: ConversionPlan) -> Path:
    """`<model-name>-<TYPE>.gguf` in the model's folder."""
    return plan.model_dir / f"{plan.model_name}-{plan.file_type.name}.gguf"


def convert(source: str | Path, file_type: str | FileType, output: str | Path | None = None, *,
            force: bool = False, overrides: Iterable[KV] = (), options: MixOptions | None = None,
            imatrix: dict[str, np.ndarray] | None = None,
            progress: Callable[[PlannedTensor, int], None] | None = None,
            on_plan: Callable[[ConversionPlan], None] | None = None) -> ConvertResult:
    """Convert a safetensors checkpoint (file, folder or index) into one GGUF file."""
    t0 = time.perf_counter()
    ft = file_type if isinstance(file_type, FileType) else parse_file_type(file_type)
    plan = plan_conversion(source, ft, list(overrides), options)
    try:
        out = Path(output) if output is not None else default_output(plan)
        check_output(out, plan.inputs, force=force)
        writer = _declare(plan)
        if on_plan is not None:
            on_plan(plan)
        with atomic_output(out, planned_size=writer.planned_size,
                           validate=lambda p: _validate(p, plan)) as f:
            writer.attach(f)
            writer.write_header()
            for t in plan.tensors:
                _write_tensor(writer, plan, t, imatrix, progress or (lambda t, n: None))
            writer.finish()
        result = ConvertResult(out, ft.name, out.stat().st_size, plan.n_params,
                               time.perf_counter() - t0)
        for t in plan.tensors:
            n, p, b = result.by_type.get(t.qtype.name, (0, 0, 0))
            result.by_type[t.qtype.name] = (n + 1, p + t.n_elements, b + t.qtype.nbytes(t.shape))
        return result
    finally:
        plan.close()


def _declare(plan: ConversionPlan) -> GGUFWriter:
    w = GGUFWriter(None)
    w.add_all(plan.metadata)
    for t in plan.tensors:
        w.add_tensor_info(t.name, t.shape, t.qtype.ggml_type)
    return w


def _write_tensor(writer: GGUFWriter, plan: ConversionPlan, t: PlannedTensor,
                  imatrix: dict[str, np.ndarray] | None,
                  progress: Callable[[PlannedTensor, int], None]) -> None:
    """Write one tensor in row chunks; `progress(t, n)` after each n elements."""
    if plan.read_raw is not None and t.qtype.name == t.source_type:
        writer.write_tensor(t.name, plan.read_raw(t))  # same type: copy the bytes as they are
        progress(t, t.n_elements)
        return
    data = plan.read(t)  # (..., n_per_row) float32
    rows = data.reshape(-1, t.shape[-1]) if data.ndim else data.reshape(1, 1)
    weights = imatrix_for(imatrix, t.name, rows.shape[1]) if t.qtype.block_size > 1 else None
    step = max(1, CHUNK_ELEMENTS // max(rows.shape[1], 1))

    def parts():
        for i in range(0, rows.shape[0], step):
            chunk = rows[i:i + step]
            yield quantize(chunk, t.qtype, name=t.source or t.name, imatrix=weights)
            progress(t, chunk.size)

    writer.write_tensor_chunks(t.name, parts())


def _validate(path: Path, plan: ConversionPlan) -> None:
    """Read the written file back with the strict reader and compare it with the plan."""
    with GGUFFile.open(path) as g:
        if list(g.tensors) != [t.name for t in plan.tensors]:
            raise FormatError(f"{path}: tensors read back differ from those written")
        for t in plan.tensors:
            info = g.tensors[t.name]
            if info.shape != tuple(t.shape) or info.ggml_type != int(t.qtype.ggml_type):
                raise FormatError(f"{path}: tensor {t.name!r} read back as {info.type_name} "
                                  f"{info.shape}, written as {t.qtype.name} {t.shape}")
        missing = [kv.key for kv in plan.metadata if kv.key not in g.metadata]
        if missing:
            raise FormatError(f"{path}: metadata keys missing after writing: {missing[:5]}")
