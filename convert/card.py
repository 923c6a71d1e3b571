"""The quality card: how a file was made, in metadata keys that llama.cpp ignores.

    kvs = card_kvs(plan, imatrix=info, report=True)   # written with the file's metadata
    patch_report(path, {"kld_mean": 0.012, ...})       # the report's figures, in place

Keys (namespace ``ggforge.``, shown by ``ggforge inspect``):

    ggforge.version               the package version that wrote the file
    ggforge.source                the model's name; ggforge.source.files: its input files
    ggforge.mix                   the file type and the options that changed the mix
    ggforge.imatrix.sha256        the importance matrix file's digest, with
    ggforge.imatrix.dataset       the calibration text(s) it names,
    ggforge.imatrix.chunks        its chunk count and (quantize --calibrate)
    ggforge.imatrix.dataset_sha256  the calibration text's digest
    ggforge.report.*              the quality report (convert/report.py): KL divergence
                                  and top-1 agreement against the source, the text they
                                  were measured on, the worst tensor's relative RMS error

With an importance matrix, llama-quantize's own keys are written as it writes them
(``quantize.imatrix.file``, ``.dataset``, ``.entries_count``, ``.chunks_count``).

The report's figures are only known once the file exists (they are measured on it), so
their keys are declared as float32 NaN and overwritten in place before the file is
renamed into place: a fixed-size value changes no offset.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from gguf import GGUFValueType as V

from ggforge.formats.errors import FormatError
from ggforge.formats.gguf_writer import KV

PREFIX = "ggforge."
# the float32 figures of the report, filled in by patch_report
REPORT_FIGURES = ("kld_mean", "kld_p99", "top1", "ppl_ratio", "worst_rel_rms")


@dataclass(frozen=True)
class ImatrixInfo:
    """What the card says of an importance matrix: its file (None when quantize
    --calibrate computed it in the same run) and the file's digest, the calibration text's
    name(s) and, when known, that text's digest; its chunk and entry counts."""

    path: Path | None
    sha256: str | None
    datasets: tuple[str, ...]
    chunks: int
    entries: int
    dataset_sha256: str | None = None


def package_version() -> str:
    try:
        return version("ggforge")
    except PackageNotFoundError:
        return "unknown"


def card_kvs(model_name: str, inputs: list[Path], mix: str, *, imatrix: ImatrixInfo | None = None,
             report_text: str | None = None) -> list[KV]:
    """The card's keys for a file of ``mix`` made from ``inputs``; with ``report_text``,
    the report's keys (its figures NaN until patch_report)."""
    kvs = [KV(PREFIX + "version", V.STRING, package_version()),
           KV(PREFIX + "source", V.STRING, model_name),
           KV(PREFIX + "source.files", V.ARRAY, [p.name for p in inputs], V.STRING),
           KV(PREFIX + "mix", V.STRING, mix)]
    if imatrix is not None:
        if imatrix.sha256 is not None:
            kvs.append(KV(PREFIX + "imatrix.sha256", V.STRING, imatrix.sha256))
        kvs += [KV(PREFIX + "imatrix.dataset", V.ARRAY, list(imatrix.datasets), V.STRING),
                KV(PREFIX + "imatrix.chunks", V.UINT32, imatrix.chunks)]
        if imatrix.dataset_sha256 is not None:
            kvs.append(KV(PREFIX + "imatrix.dataset_sha256", V.STRING, imatrix.dataset_sha256))
        # llama-quantize's keys (tools/quantize/quantize.cpp), as it writes them
        if imatrix.path is not None:
            kvs.append(KV("quantize.imatrix.file", V.STRING, str(imatrix.path)[:127]))
        kvs.append(KV("quantize.imatrix.entries_count", V.INT32, imatrix.entries))
        if imatrix.datasets:
            kvs.append(KV("quantize.imatrix.dataset", V.STRING, imatrix.datasets[0][:127]))
        if imatrix.chunks > 0:
            kvs.append(KV("quantize.imatrix.chunks_count", V.INT32, imatrix.chunks))
    if report_text is not None:
        kvs.append(KV(PREFIX + "report.text", V.STRING, report_text))
        kvs += [KV(PREFIX + "report." + f, V.FLOAT32, math.nan) for f in REPORT_FIGURES]
    return kvs


def _entry(key: str) -> bytes:
    """A float32 key's bytes in a GGUF header up to its value."""
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", int(V.FLOAT32))


def patch_report(path: Path, figures: dict[str, float], header_bytes: int) -> None:
    """Overwrite the report's placeholder values in ``path`` (its first ``header_bytes``
    hold the metadata) with ``figures`` (names of REPORT_FIGURES)."""
    with open(path, "r+b") as f:
        head = f.read(header_bytes)
        for name, value in figures.items():
            if name not in REPORT_FIGURES:
                raise ValueError(f"not a report figure: {name!r}")
            entry = _entry(PREFIX + "report." + name)
            at = head.find(entry)
            if at < 0 or head.find(entry, at + 1) >= 0:
                raise FormatError(f"{path}: the report key {PREFIX}report.{name} is not in the header once")
            f.seek(at + len(entry))
            f.write(struct.pack("<f", float(value)))
        f.flush()
        os.fsync(f.fileno())


def is_card_key(key: str) -> bool:
    """A key the card writes (a requantized source's card is replaced, never kept)."""
    return key.startswith((PREFIX, "quantize.imatrix."))


def mix_description(file_type, options=None, imatrix: ImatrixInfo | None = None) -> str:
    """The file type and the options that changed the mix, as typed."""
    parts = [file_type.name]
    if options is not None:
        if options.pure:
            parts.append("--pure")
        if options.output_type:
            parts.append(f"--output-tensor-type {options.output_type}")
        if options.token_embedding_type:
            parts.append(f"--token-embedding-type {options.token_embedding_type}")
        parts += [f"--tensor-type {pat}={t}" for pat, t in options.tensor_types]
        if options.has_imatrix:
            parts.append("--calibrate" if imatrix is not None and imatrix.path is None else "--imatrix")
    return " ".join(parts)


def card_of(metadata: dict) -> dict:
    """The card's keys of a file's metadata (ggforge.* and quantize.imatrix.*), in order."""
    return {k: v for k, v in metadata.items() if is_card_key(k)}
