"""The command line: `ggforge quantize|inspect ...` and the `quantize` shortcut.

Argument parsing and printing only; the work is library calls. Errors of ours become one
line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click
from gguf import GGUFValueType as V

from ggforge.formats.gguf_writer import KV
from ggforge.tools.errors import one_line_errors
from ggforge.tools.run_cli import bench_cmd, cache_types, chat_cmd, memory_cmd, run_cmd
from ggforge.tools.table import format_table, human_bytes, printable

def parse_meta(text: str) -> KV:
    """`KEY=VALUE` or `KEY=TYPE:VALUE` (TYPE: str, int, uint, float, bool) -> a typed entry."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r}: expected KEY=VALUE")
    kind, colon, rest = value.partition(":")
    explicit = {"str": V.STRING, "int": V.INT32, "uint": V.UINT32, "float": V.FLOAT32, "bool": V.BOOL}
    if colon and kind in explicit:
        vtype, value = explicit[kind], rest
    elif value.lower() in ("true", "false"):
        vtype = V.BOOL
    else:
        vtype = V.STRING
        for t, conv in ((V.UINT32, int), (V.FLOAT32, float)):
            try:
                conv(value)
                vtype = t
                break
            except ValueError:
                pass
    try:
        if vtype == V.BOOL:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return KV(key, vtype, value.lower() in ("true", "1"))
        if vtype in (V.UINT32, V.INT32):
            n = int(value)
            if vtype == V.UINT32 and n < 0:
                vtype = V.INT32
            return KV(key, vtype, n)
        if vtype == V.FLOAT32:
            return KV(key, vtype, float(value))
    except ValueError:
        raise click.BadParameter(f"{text!r}: {value!r} is not a valid {kind}") from None
    return KV(key, V.STRING, value)


def _tensor_type(text: str | None) -> str | None:
    """A ggml tensor type name (q6_k -> Q6_K), checked against the registry."""
    if text is None:
        return None
    from ggforge.formats.quants import get_type

    return get_type(text).name


def _pattern_type(text: str) -> tuple[str, str]:
    import re

    pattern, sep, type_name = text.rpartition("=")
    if not sep or not pattern:
        raise click.BadParameter(f"{text!r}: expected PATTERN=TYPE")
    try:
        re.compile(pattern)
    except re.error as e:
        raise click.BadParameter(f"{pattern!r} is not a valid regular expression: {e}") from None
    return pattern, _tensor_type(type_name)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
def cli(verbose: bool) -> None:
    """ggforge: Hugging Face safetensors -> GGUF, and what is inside a model file."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@click.command("quantize")
@click.argument("source", type=click.Path())
@click.argument("type_", metavar="TYPE")
@click.option("-o", "--output", type=click.Path(), help="Output file (default: beside the source, <model>-<TYPE>.gguf).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--meta", "metas", multiple=True, help="Set a metadata key: KEY=VALUE or KEY=TYPE:VALUE (repeatable).")
@click.option("--output-tensor-type", help="Type of output.weight (as llama-quantize).")
@click.option("--token-embedding-type", help="Type of token_embd.weight (as llama-quantize).")
@click.option("--tensor-type", "tensor_types", multiple=True,
              help="PATTERN=TYPE: tensors whose name matches the regex PATTERN get TYPE (repeatable).")
@click.option("--pure", is_flag=True, help="Every quantizable tensor gets TYPE's base type: no mix.")
@click.option("--imatrix", "imatrix_path", type=click.Path(),
              help="llama.cpp importance matrix (GGUF or legacy .dat) for the K-quants.")
@click.option("--allow-requantize", is_flag=True,
              help="Allow requantizing tensors of a GGUF source that are already quantized.")
@click.option("--calibrate", "calibrate_text", is_flag=False, flag_value="", default=None, metavar="[FILE]",
              help="Compute an importance matrix from the source's own weights over FILE (default: "
                   "a built-in text of prose, code and several languages) and quantize with it.")
@click.option("--calibrate-ctx", default=512, show_default=True, help="--calibrate: tokens per chunk.")
@click.option("--calibrate-chunks", type=int, default=None, help="--calibrate: at most this many chunks.")
@click.option("--report", is_flag=True,
              help="Measure the file against the source (KL divergence, top-1 agreement on a short "
                   "built-in text) and record it in the file's quality card.")
@click.option("--dry-run", is_flag=True, help="Print the plan (each tensor's type and size) and write nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@one_line_errors
def quantize_cmd(source: str, type_: str, output: str | None, force: bool, metas: tuple[str, ...],
                 output_tensor_type: str | None, token_embedding_type: str | None,
                 tensor_types: tuple[str, ...], pure: bool, imatrix_path: str | None,
                 allow_requantize: bool, calibrate_text: str | None, calibrate_ctx: int,
                 calibrate_chunks: int | None, report: bool, dry_run: bool, no_progress: bool) -> None:
    """Convert SOURCE (a .safetensors file, a model folder, a sharded index, or a GGUF) to TYPE.

    TYPE (case-insensitive): F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L
    Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K IQ4_NL IQ4_XS; short names q2 q3 q4 q5 q6 q8 give
    Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K Q8_0.
    """
    from tqdm import tqdm

    from ggforge.convert.mixes import MixOptions
    from ggforge.convert.pipeline import convert
    from ggforge.tools import quantize_steps as steps

    overrides = [parse_meta(m) for m in metas]
    if calibrate_text is not None and imatrix_path is not None:
        raise ValueError("--calibrate computes the importance matrix; --imatrix reads one: give one of them")
    if calibrate_text is not None:
        imatrix_path = ""    # the mix's imatrix rules apply
    options = MixOptions(output_type=_tensor_type(output_tensor_type),
                         token_embedding_type=_tensor_type(token_embedding_type),
                         tensor_types=[_pattern_type(p) for p in tensor_types], pure=pure,
                         has_imatrix=imatrix_path is not None, allow_requantize=allow_requantize)
    if dry_run:
        steps.print_conversion_plan(source, type_, overrides, options)
        return
    imatrix, imatrix_info = None, None
    if calibrate_text is not None:
        imatrix, imatrix_info = steps.calibrate(source, calibrate_text or None, calibrate_ctx,
                                                calibrate_chunks, output, no_progress)
    elif imatrix_path is not None:
        imatrix, imatrix_info = steps.read_imatrix(imatrix_path)
    bar: list[Any] = []

    current: list[Any] = [None]

    def on_plan(plan: Any) -> None:
        total = sum(t.n_elements for t in plan.tensors)
        bar.append(tqdm(total=total, unit="param", unit_scale=True, disable=no_progress, position=0,
                        desc=f"{plan.model_name} -> {plan.file_type.name}", file=sys.stderr))
        bar.append(tqdm(total=1, unit="param", unit_scale=True, disable=no_progress, position=1,
                        leave=False, file=sys.stderr))

    def progress(t: Any, n: int) -> None:
        """Overall bar, and one bar for the tensor being written."""
        overall, tensor = bar
        if current[0] is not t:
            current[0] = t
            tensor.reset(total=t.n_elements)
            tensor.set_description_str(f"{t.name} {t.qtype.name}", refresh=False)
        tensor.update(n)
        overall.update(n)

    try:
        result = convert(source, type_, output, force=force, overrides=overrides, options=options,
                         imatrix=imatrix, progress=progress, on_plan=on_plan, imatrix_info=imatrix_info,
                         report=report, report_progress=steps.report_bar(no_progress) if report else None)
    finally:
        for b in bar:
            b.close()
    rows = [[name, n, p, human_bytes(b), round(8 * b / max(p, 1), 2)]
            for name, (n, p, b) in sorted(result.by_type.items())]
    click.echo(format_table(["type", "tensors", "params", "size", "bits/weight"], rows))
    click.echo(f"\nwrote {result.output}  ({human_bytes(result.file_size)}, "
               f"{result.n_params:,} params, {result.bits_per_weight:.2f} bits/weight, "
               f"{result.seconds:.1f} s)")
    if result.report is not None:
        from ggforge.tools.quality_view import render_report

        click.echo("\n" + render_report(result.report))


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--plan", "show_plan", is_flag=True, help="Show what fits where: GPU/CPU layers, KV cache, memory.")
@click.option("-c", "--ctx-size", type=int, default=None, help="Context size for --plan (default: as `run`).")
@click.option("--gpu-memory", default=None, help="Free GPU memory for --plan (default: what the device reports).")
@click.option("-ngl", "--gpu-layers", default=None,
              help="Layers on the GPU for --plan: N, 'all' or 'auto' (default: auto when the memory is known, else all).")
@cache_types
@one_line_errors
def inspect_cmd(path: str, as_json: bool, show_plan: bool, ctx_size: int | None,
                gpu_memory: str | None, gpu_layers: str | None, cache_type_k: str, cache_type_v: str) -> None:
    """Show what is inside a GGUF or safetensors file."""
    from ggforge.formats.summary import summarize

    if show_plan:
        _print_plan(path, ctx_size, gpu_memory, gpu_layers, (cache_type_k, cache_type_v))
        return
    s = summarize(path)
    if as_json:
        click.echo(json.dumps(s, indent=1, default=str))
        return
    click.echo(f"{s['file']}: {s['format']}" + (f" v{s['version']}" if "version" in s else "")
               + f", {human_bytes(s['file_size'])}")
    if s["metadata"]:
        click.echo("\nmetadata")
        click.echo(format_table(["key", "value"], [[k, _short(v)] for k, v in s["metadata"].items()]))
        from ggforge.convert.card import card_of

        card = card_of(s["metadata"])
        if card:
            from ggforge.tools.quality_view import render_card

            click.echo("\n" + render_card(card))
    click.echo("\ntensors")
    click.echo(format_table(["name", "type", "shape", "bytes"],
                            [[printable(t["name"]), t["type"], "x".join(map(str, t["shape"])) or "scalar", t["bytes"]]
                             for t in s["tensors"]]))
    click.echo("\ntotals by type")
    rows = [[k, d["tensors"], d["params"], human_bytes(d["bytes"]), round(8 * d["bytes"] / max(d["params"], 1), 2)]
            for k, d in sorted(s["totals_by_type"].items())]
    click.echo(format_table(["type", "tensors", "params", "size", "bits/weight"], rows))
    click.echo(f"\n{s['params']:,} parameters, {human_bytes(s['tensor_bytes'])} of tensors, "
               f"{s['bits_per_weight']:.2f} bits per weight")


def _print_plan(path: str, ctx_size: int | None, gpu_memory: str | None, gpu_layers: str | None,
                kv_types: tuple[str, str] = ("f32", "f32")) -> None:
    from ggforge.formats.gguf_reader import GGUFFile
    from ggforge.runtime.config import ModelConfig
    from ggforge.runtime.generate import DEFAULT_CTX_CAP
    from ggforge.runtime.gpu import cuda_free_memory
    from ggforge.runtime.kv_cache import cache_dtype
    from ggforge.runtime.placement import make_plan, parse_bytes, parse_gpu_layers
    from ggforge.tools.plan_view import render_plan

    with GGUFFile.open(path) as g:
        config = ModelConfig.from_gguf(g)
        n_ctx = int(ctx_size or min(config.n_ctx_train, DEFAULT_CTX_CAP))
        if n_ctx < 1:
            raise ValueError(f"context size must be at least 1, got {n_ctx}")
        free = parse_bytes(gpu_memory) if gpu_memory else cuda_free_memory()
        n = parse_gpu_layers(gpu_layers) if gpu_layers is not None else ("auto" if free is not None else "all")
        plan = make_plan(g, config, n_ctx, n, free, kv_bytes=tuple(cache_dtype(t).itemsize for t in kv_types))
    click.echo(f"{path}: {config.arch}, {config.n_layer} layers, "
               + (f"--gpu-layers {gpu_layers}" if gpu_layers is not None else f"--gpu-layers {n} (default)"))
    click.echo(render_plan(plan))
    if not plan.fits:
        raise click.exceptions.Exit(1)


def _short(v: Any, width: int = 100) -> str:
    if isinstance(v, dict) and "array_length" in v:
        text = f"[{v['array_length']:,} items] " + json.dumps(v["first"], ensure_ascii=False)[:-1] + ", ...]"
    else:
        text = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
    text = printable(text)
    return text if len(text) <= width else text[:width - 3] + "..."


@click.command("bench-quantize")
@click.argument("source", type=click.Path())
@click.option("--types", default="q8_0,q4_0,q4_k_m,q6_k", show_default=True,
              help="Comma-separated file types to time.")
@click.option("--repeat", default=3, show_default=True, help="Runs per measurement (median kept).")
@click.option("--workdir", type=click.Path(), help="Folder for the temporary files (default: system temp).")
@one_line_errors
def bench_quantize_cmd(source: str, types: str, repeat: int, workdir: str | None) -> None:
    """Quantization speed of ggforge (from SOURCE, one step) beside llama.cpp's quantizer
    (from the F32 GGUF of SOURCE), on the same cores, in one run."""
    import os

    from ggforge.convert.bench import bench_quantize

    threads = len(os.sched_getaffinity(0))
    click.echo(f"{source}: {threads} threads, median of {repeat}")
    rows = []

    def show(r: Any) -> None:
        rows.append([r.file_type, r.n_params, round(r.ggforge_s, 2), round(r.ggforge_rate / 1e6, 1),
                     "-" if r.llama_cpp_s is None else round(r.llama_cpp_s, 2),
                     "-" if r.llama_cpp_rate is None else round(r.llama_cpp_rate / 1e6, 1),
                     "-" if r.ratio is None else round(r.ratio, 2)])
        click.echo(f"  {r.file_type} done", err=True)

    bench_quantize(source, [t.strip() for t in types.split(",") if t.strip()], threads=threads,
                   repeat=repeat, workdir=workdir, on_result=show)
    click.echo(format_table(["type", "params", "ggforge s", "ggforge Mparam/s", "llama.cpp s",
                             "llama.cpp Mparam/s", "ratio"], rows))


from ggforge.tools.eval_cli import eval_cmd  # noqa: E402
from ggforge.tools.imatrix_cli import imatrix_cmd  # noqa: E402
from ggforge.tools.serve_cli import serve_cmd  # noqa: E402

for _cmd in (quantize_cmd, inspect_cmd, bench_quantize_cmd, run_cmd, chat_cmd, bench_cmd, memory_cmd,
             imatrix_cmd, eval_cmd, serve_cmd):
    cli.add_command(_cmd)


def main() -> None:
    cli()


def quantize_main() -> None:
    """The `quantize` shortcut: the same command as `ggforge quantize`."""
    quantize_cmd()
