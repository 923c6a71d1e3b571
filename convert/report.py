"""The quality report of a quantization: what the file does to the model's outputs.

    rep = quality_report(out_path, source, errors=errors)
    rep.kld.kld.value, rep.kld.same_top.value     # KL divergence, top-1 agreement
    rep.worst                                      # the tensors that lost most

The reference is the source at its own precision (a BF16 checkpoint as a BF16 GGUF, F16
as F16, else F32), written to a temporary file beside the output and removed after; both
files run on the CPU through the runtime's public API (ggforge.runtime.generate.load,
runtime.evaluate), which DESIGN.md allows the converter for its report. The figures are
llama-perplexity --kl-divergence's (runtime/evaluate.py) over REPORT_TEXT, a short text of
prose, code and several languages written for the project (convert/calibration/report.txt),
in chunks of REPORT_CTX tokens, the second half of each scored.

What it costs: two forward passes of each chunk (the file and the reference) and one
conversion of the source to a float file: several times the quantization itself on the CPU.
So it runs on request (quantize --report); the per-tensor errors (convert/quant_error.py,
a decoding of each block as it is written) cost little and are always in the report.
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ggforge.convert.quant_error import TensorError, TensorErrors

REPORT_TEXT = Path(__file__).parent / "calibration" / "report.txt"
REPORT_CTX = 128
REPORT_CHUNKS = 8
N_WORST = 5


@dataclass
class QualityReport:
    """KL divergence statistics against the source (None when not measured) and the
    per-tensor errors, worst first."""

    text: str                                  # what the KLD was measured on
    kld: object | None = None                  # runtime.evaluate.KldResult
    n_scored: int = 0
    tensors: list[TensorError] = field(default_factory=list)

    @property
    def worst(self) -> list[TensorError]:
        return self.tensors[:N_WORST]

    def figures(self) -> dict[str, float]:
        """The card's float figures (convert/card.py REPORT_FIGURES)."""
        out = {}
        if self.kld is not None:
            out.update(kld_mean=self.kld.kld.value, kld_p99=self.kld.kld_percentiles["99.0%"],
                       top1=self.kld.same_top.value, ppl_ratio=self.kld.ratio.value)
        if self.tensors:
            out["worst_rel_rms"] = self.tensors[0].rel_rms
        return out


def text_label(path: Path = REPORT_TEXT) -> str:
    """The text's name and digest, as the card records it."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"{path.name} sha256:{digest} ctx {REPORT_CTX} chunks<={REPORT_CHUNKS}"


def quality_report(output: Path, source: Path, *, errors: TensorErrors | None = None,
                   kld: bool = True, text: Path = REPORT_TEXT, progress=None) -> QualityReport:
    """The report of ``output`` (a GGUF just written) made from ``source`` (what convert()
    read); ``kld=False`` gives the per-tensor part alone."""
    rep = QualityReport(text_label(text), tensors=errors.rows() if errors is not None else [])
    if not kld:
        return rep
    from ggforge.convert.calibrate import source_precision
    from ggforge.convert.pipeline import convert
    from ggforge.runtime.evaluate import evaluate, perplexity_tokens
    from ggforge.runtime.generate import load

    output, source = Path(output), Path(source)
    folder = output.parent
    with tempfile.TemporaryDirectory(dir=folder, prefix=".ggforge-report-") as tmp:
        if source.suffix == ".gguf":
            ref_path = source      # a requantization: the file it was made from
        else:
            ref_path = convert(source, source_precision(source), Path(tmp) / "reference.gguf").output
        with load(output, n_ctx=REPORT_CTX) as m, load(ref_path, n_ctx=REPORT_CTX) as ref:
            tokens = perplexity_tokens(m, text.read_bytes())
            res = evaluate(m, tokens, REPORT_CTX, ref=ref, n_chunks=REPORT_CHUNKS, source=str(text),
                           model_name=str(output), ref_name=str(source), progress=progress)
    rep.kld, rep.n_scored = res.kld, res.n_scored
    return rep
