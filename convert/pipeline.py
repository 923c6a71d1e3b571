"""The streaming converter: tensors are read, quantized and written a chunk of rows at a time.

    result = convert("./SmolLM2/model.safetensors", "q8_0")

Reading, quantizing and writing run side by side (convert/stages); memory follows a few
chunks (and the largest tensor that has to be read whole), not the model.
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
from ggforge.convert.card import ImatrixInfo, card_kvs, is_card_key, mix_description, patch_report
from ggforge.convert.plan import merge_kvs
from ggforge.convert.quant_error import TensorErrors
from ggforge.convert.report import QualityReport, quality_report, text_label
from ggforge.convert.stages import Stages
from ggforge.formats.atomic import atomic_output, check_output
from ggforge.formats.errors import FormatError
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.gguf_writer import KV, GGUFWriter
from ggforge.formats.quants import get_type
from ggforge.formats.quants import quantize as quantize_tensor

log = logging.getLogger(__name__)


@dataclass
class ConvertResult:
    """What was written, for the summary table."""

    output: Path
    file_type: str
    file_size: int
    n_params: int
    seconds: float
    by_type: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # type -> (tensors, params, bytes)
    report: QualityReport | None = None                                     # with report=True

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
            on_plan: Callable[[ConversionPlan], None] | None = None,
            errors: TensorErrors | None = None, card: bool = True,
            imatrix_info: ImatrixInfo | None = None, report: bool = False,
            report_progress=None) -> ConvertResult:
    """Convert a safetensors checkpoint (file, folder or index) into one GGUF file.

    ``errors``, if given, collects each quantized tensor's error (convert/quant_error.py).
    ``card``: write the quality card (convert/card.py; ``imatrix_info`` describes the
    importance matrix). ``report``: measure the file against the source before it is put
    in place (convert/report.py) and record the figures in the card."""
    t0 = time.perf_counter()
    ft = file_type if isinstance(file_type, FileType) else parse_file_type(file_type)
    plan = plan_conversion(source, ft, list(overrides), options)
    if report and errors is None:
        errors = TensorErrors()
    if card:
        kvs = card_kvs(plan.model_name, plan.inputs, mix_description(ft, options, imatrix_info), imatrix=imatrix_info,
                       report_text=text_label() if report else None)
        plan.metadata = merge_kvs([kv for kv in plan.metadata if not is_card_key(kv.key)], kvs)
    made: list[QualityReport] = []

    def validate(path: Path) -> None:
        _validate(path, plan)
        if report:
            rep = quality_report(path, Path(source), errors=errors, progress=report_progress)
            patch_report(path, rep.figures(), len(writer.header_bytes()))
            made.append(rep)
    try:
        out = Path(output) if output is not None else default_output(plan)
        check_output(out, plan.inputs, force=force)
        writer = _declare(plan)
        if on_plan is not None:
            on_plan(plan)
        with atomic_output(out, planned_size=writer.planned_size, validate=validate) as f:
            writer.attach(f)
            writer.write_header()
            _write_tensors(writer, plan, imatrix, progress or (lambda t, n: None), errors)
            writer.finish()
        result = ConvertResult(out, ft.name, out.stat().st_size, plan.n_params,
                               time.perf_counter() - t0, report=made[0] if made else None)
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


def _write_tensors(writer: GGUFWriter, plan: ConversionPlan,
                   imatrix: dict[str, np.ndarray] | None,
                   progress: Callable[[PlannedTensor, int], None],
                   errors: TensorErrors | None = None) -> None:
    """Read, quantize and write every tensor in row chunks; `progress(t, n)` after each
    n elements. Reading (a prefetch thread), quantizing (this thread, the kernels on all
    cores) and writing (a writer thread) overlap: see convert/stages."""
    with Stages(writer, plan, imatrix) as stages:
        for item in stages.chunks():
            t = item.tensor
            if item.raw is not None:
                out, n = item.raw, t.n_elements
            else:
                out = quantize(item.rows, t.qtype, name=t.source or t.name,
                               imatrix=item.weights, checked=item.checked)
                n = item.rows.size
                if errors is not None:   # before done(): the rows' buffer is reused after it
                    errors.add(t, item.rows, out, item.weights)
            stages.done(item, out)
            progress(t, n)


def quantize(rows: np.ndarray, qtype, *, name: str, imatrix=None,
             checked: bool = False) -> np.ndarray:
    """registry.quantize of one chunk of rows (n_rows, n_per_row) -> (n_rows, row_bytes)
    uint8, without its NaN/Inf scan when the rows were `checked` as they were read."""
    qt = get_type(qtype)
    if not checked or imatrix is not None or rows.ndim != 2 or rows.shape[1] % qt.block_size:
        return quantize_tensor(rows, qt, name=name, imatrix=imatrix)
    # ggml's overflows (scales near 1e30 becoming Inf) without warnings, as registry.quantize
    with np.errstate(over="ignore", invalid="ignore"):
        out = qt.quantize_blocks(rows.reshape(-1, qt.block_size))
    if np.may_share_memory(out, rows):  # F32 "quantizes" to a view; the rows' buffer is reused
        out = out.copy()
    return out.reshape(rows.shape[0], qt.row_bytes(rows.shape[1]))


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
