"""The steps of `quantize` around the conversion itself: the --dry-run plan, reading an
--imatrix file, --calibrate, and the --report's progress bar (tools/cli.py calls them)."""
from __future__ import annotations

import sys
from typing import Any

import click

from ggforge.formats.units import human_bytes
from ggforge.tools.table import format_table, printable


def print_conversion_plan(source: str, type_: str, overrides, options) -> None:
    """quantize --dry-run: what each tensor would become, and the totals by type."""
    from ggforge.convert.mixes import parse_file_type
    from ggforge.convert.plan import plan_conversion

    plan = plan_conversion(source, parse_file_type(type_), list(overrides), options)
    try:
        rows, by_type = [], {}
        for t in plan.tensors:
            b = t.qtype.nbytes(t.shape)
            rows.append([printable(t.name), "x".join(map(str, t.shape)), t.qtype.name, human_bytes(b)])
            n, p, tb = by_type.get(t.qtype.name, (0, 0, 0))
            by_type[t.qtype.name] = (n + 1, p + t.n_elements, tb + b)
        click.echo(f"{plan.model_name} -> {plan.file_type.name} (dry run: nothing written)")
        click.echo(format_table(["tensor", "shape", "type", "size"], rows))
        total = sum(b for _, _, b in by_type.values())
        click.echo("\n" + format_table(["type", "tensors", "params", "size", "bits/weight"],
                                        [[k, n, p, human_bytes(b), round(8 * b / max(p, 1), 2)]
                                         for k, (n, p, b) in sorted(by_type.items())]))
        click.echo(f"\n{plan.n_params:,} params, {human_bytes(total)} of tensors, "
                   f"{8 * total / max(plan.n_params, 1):.2f} bits/weight")
    finally:
        plan.close()


def read_imatrix(path: str):
    """An importance matrix file's values and what the quality card says of it."""
    import hashlib
    from pathlib import Path

    from ggforge.convert.card import ImatrixInfo
    from ggforge.formats.imatrix import load_imatrix_with_meta

    values, datasets, chunks = load_imatrix_with_meta(path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return values, ImatrixInfo(Path(path), digest, datasets, chunks, len(values))


def calibrate(source: str, text: str | None, n_ctx: int, n_chunks: int | None, output: str | None,
               no_progress: bool):
    """quantize --calibrate: the importance matrix of the source's own weights."""
    from pathlib import Path

    from tqdm import tqdm

    from ggforge.convert.calibrate import calibrate
    from ggforge.convert.card import ImatrixInfo

    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            desc = "calibration: converting" if stage == "convert" else "calibration: imatrix"
            bar = bars[stage] = tqdm(total=total, desc=desc, disable=no_progress, file=sys.stderr,
                                     unit="param" if stage == "convert" else "chunk", unit_scale=True,
                                     leave=False)
        bar.update(done - bar.n)

    src = Path(source)
    workdir = Path(output).parent if output else (src if src.is_dir() else src.parent)
    try:
        cal = calibrate(source, text, n_ctx=n_ctx, n_chunks=n_chunks, workdir=workdir, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    click.echo(f"calibrated on {cal.dataset}: {cal.n_chunks} chunks of {cal.n_ctx} tokens "
               f"({cal.precision} weights, source perplexity {cal.ppl:.4f})", err=True)
    return cal.imatrix, ImatrixInfo(None, None, (cal.dataset,), cal.n_chunks, len(cal.imatrix),
                                    dataset_sha256=cal.sha256)


def report_bar(no_progress: bool):
    """A progress callback for the report's evaluation (chunks done of total)."""
    from tqdm import tqdm

    bar: list[Any] = []

    def progress(done: int, total: int, ppl: float) -> None:
        if not bar:
            bar.append(tqdm(total=total, unit="chunk", desc="quality report", disable=no_progress,
                            file=sys.stderr, leave=False))
        bar[0].update(done - bar[0].n)
        if done == total:
            bar[0].close()
    return progress
