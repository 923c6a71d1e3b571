"""Tables of the quality report (quantize --report) and of a file's quality card (inspect)."""
from __future__ import annotations

import math

from ggforge.tools.table import format_table


def _fig(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.2f}%" if pct else f"{v:.6f}"


def render_report(rep) -> str:
    """The report of convert/report.py: KL divergence against the source, then the tensors
    that lost most to quantization."""
    lines = []
    if rep.kld is not None:
        k = rep.kld
        rows = [["mean KLD", f"{k.kld.value:.6f} ± {k.kld.unc:.6f}"],
                ["median KLD", _fig(k.kld_percentiles["median"])],
                ["99% KLD", _fig(k.kld_percentiles["99.0%"])],
                ["max KLD", _fig(k.kld_percentiles["max"])],
                ["same top token", f"{100 * k.same_top.value:.2f} ± {100 * k.same_top.unc:.2f} %"],
                ["PPL(file) / PPL(source)", f"{k.ratio.value:.4f} ± {k.ratio.unc:.4f}"]]
        lines += [f"quality against the source ({rep.text}, {rep.n_scored} positions)",
                  format_table(["figure", "value"], rows), ""]
    if rep.tensors:
        w = "importance-weighted " if any(e.weighted for e in rep.tensors) else ""
        lines += [f"tensors that lost most ({w}relative RMS error)",
                  format_table(["tensor", "type", "rel. RMS error"],
                               [[e.name, e.type_name, f"{e.rel_rms:.4f}"] for e in rep.worst])]
    return "\n".join(lines).rstrip()


_LABELS = {"version": "made by ggforge", "source": "source", "source.files": "source files",
           "mix": "mix", "imatrix.sha256": "imatrix sha256", "imatrix.dataset": "imatrix dataset",
           "imatrix.chunks": "imatrix chunks", "imatrix.dataset_sha256": "imatrix dataset sha256", "report.text": "report text",
           "report.kld_mean": "mean KLD", "report.kld_p99": "99% KLD", "report.top1": "same top token",
           "report.ppl_ratio": "PPL ratio", "report.worst_rel_rms": "worst tensor rel. RMS error"}


def render_card(card: dict) -> str:
    """A file's card (convert/card.py card_of), one row a key."""
    rows = []
    for key, value in card.items():
        short = key.removeprefix("ggforge.")
        label = _LABELS.get(short, key)
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, float):
            value = _fig(value, pct=short == "report.top1")
        rows.append([label, value])
    return format_table(["how it was made", ""], rows)
