"""`ggforge eval`: perplexity and KL divergence as llama-perplexity computes them, no C++ build.

    ggforge eval model-Q4_K_M.gguf -f text.txt -c 512
    ggforge eval model-Q4_K_M.gguf -f text.txt --ref ./model-folder     # + KL divergence

Argument parsing and printing only; the computation is runtime/evaluate.py. A Hugging Face
reference (folder or safetensors) is converted to a temporary F32 GGUF first.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import click

from ggforge.tools.errors import one_line_errors
from ggforge.tools.run_cli import _load, cache_types
from ggforge.tools.table import format_table


def read_text(path: str) -> bytes:
    """The text as llama-perplexity's -f reads it: the file's bytes, one trailing newline
    dropped."""
    data = Path(path).read_bytes()
    return data[:-1] if data.endswith(b"\n") else data


def is_gguf(path: str) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def reference_gguf(ref: str, workdir: str) -> str:
    """REF as a GGUF path: a GGUF as it is; a Hugging Face folder, safetensors file or
    sharded index converted to an F32 GGUF in ``workdir`` (the converter's public API)."""
    if is_gguf(ref):
        return ref
    if not Path(ref).exists():
        raise FileNotFoundError(f"--ref {ref}: no such file or folder")
    from ggforge.convert.pipeline import convert

    click.echo(f"converting {ref} to a temporary F32 GGUF ...", err=True)
    return str(convert(ref, "F32", Path(workdir) / "reference-F32.gguf").output)


def _finite(v):
    """JSON has no NaN: a correlation without variance becomes null."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _pm(e, scale: float = 1.0, digits: int = 6) -> list[str]:
    return [f"{scale * e.value:.{digits}f}", f"{scale * e.unc:.{digits}f}"]


LABELS = {"max": "Maximum", "median": "Median", "min": "Minimum"}   # llama-perplexity's words


def result_rows(r) -> list[list[str]]:
    """The table of an EvalResult: llama-perplexity's final lines, in its order and units."""
    rows = [["PPL", *_pm(r.ppl, digits=4)]]
    k = r.kld
    if k is None:
        return rows
    rows += [["Mean PPL(Q)", *_pm(k.ppl_q)], ["Mean PPL(base)", *_pm(k.ppl_base)],
             ["Cor(ln(PPL(Q)), ln(PPL(base)))", f"{100 * k.cor:.2f}%", ""],
             ["Mean ln(PPL(Q)/PPL(base))", *_pm(k.ln_ratio)],
             ["Mean PPL(Q)/PPL(base)", *_pm(k.ratio)], ["Mean PPL(Q)-PPL(base)", *_pm(k.ppl_diff)],
             ["Mean KLD", *_pm(k.kld)]]
    rows += [[f"{LABELS.get(name, name)} KLD", f"{v:.6f}", ""] for name, v in k.kld_percentiles.items()]
    rows += [["Mean Δp", *[s + " %" for s in _pm(k.p_diff, 100, 3)]]]
    rows += [[f"{LABELS.get(name, name)} Δp", f"{100 * v:.3f} %", ""] for name, v in k.p_diff_percentiles.items()]
    rows += [["RMS Δp", *[s + " %" for s in _pm(k.rms_p_diff, 100, 3)]],
             ["Same top p", *[s + " %" for s in _pm(k.same_top, 100, 3)]]]
    return rows


@click.command("eval")
@click.argument("model", type=click.Path())
@click.option("-f", "--file", "text_file", required=True, type=click.Path(),
              help="The text to evaluate (read as llama-perplexity's -f).")
@click.option("--ref", default=None,
              help="Reference for KL divergence: a GGUF, or a Hugging Face folder / safetensors "
                   "(converted to a temporary F32 GGUF).")
@click.option("-c", "--ctx-size", type=int, default=512, show_default=True,
              help="Tokens per chunk; the second half of each chunk is scored.")
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="Evaluate at most this many chunks (default: all).")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all).")
@click.option("-ngl", "--gpu-layers", default="0", show_default=True,
              help="Layers on the GPU (MODEL and REF alike), as llama.cpp's --n-gpu-layers: N, 'all' or 'auto'.")
@click.option("--gpu-memory", default=None,
              help="Plan with this much free GPU memory (e.g. 6GiB) instead of what the device reports.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@cache_types
@one_line_errors
def eval_cmd(model: str, text_file: str, ref: str | None, ctx_size: int, chunks: int | None,
             threads: int | None, gpu_layers: str, gpu_memory: str | None, as_json: bool,
             no_progress: bool, **cache_kw) -> None:
    """Perplexity of a GGUF MODEL over a text, as llama-perplexity's; with --ref, the KL
    divergence of MODEL's next-token distributions from REF's, as llama-perplexity
    --kl-divergence (the reference recomputed beside MODEL, chunk by chunk)."""
    from tqdm import tqdm

    from ggforge.runtime.evaluate import (check_same_vocab, check_tokens, evaluate,
                                           perplexity_tokens)

    text = read_text(text_file)
    # cache_kw: the KV cache options of @cache_types, passed on as `run` passes them
    kw = dict(ctx_size=ctx_size, threads=threads, gpu_layers=gpu_layers, gpu_memory=gpu_memory,
              **cache_kw)
    with tempfile.TemporaryDirectory(prefix="ggforge-eval-") as tmp, _load(model, kw) as m:
        tokens = perplexity_tokens(m, text)
        available = check_tokens(len(tokens), ctx_size, text_file)  # before REF is converted
        total = available if chunks is None else min(chunks, available)
        ref_path = reference_gguf(ref, tmp) if ref is not None else None
        r_model = _load(ref_path, kw) if ref_path is not None else None
        try:
            if r_model is not None:   # refused before the progress bar starts
                check_same_vocab(m, r_model, model, ref)
            bar = tqdm(total=total, unit="chunk", disable=no_progress, file=sys.stderr,
                       desc=Path(model).name)

            def progress(done: int, total: int, ppl: float) -> None:
                bar.set_postfix_str(f"ppl {ppl:.4f}", refresh=False)
                bar.update(1)

            try:
                res = evaluate(m, tokens, ctx_size, ref=r_model, n_chunks=chunks, source=text_file,
                               model_name=model, ref_name=ref or "", progress=progress)
            finally:
                bar.close()
        finally:
            if r_model is not None:
                r_model.close()
    if as_json:
        click.echo(json.dumps(_finite({"model": model, "file": text_file, "ref": ref,
                                        **res.to_dict()}), allow_nan=False))
        return
    click.echo(f"{model}: {text_file}, {res.n_tokens:,} tokens, {res.n_chunks} chunks of "
               f"{res.n_ctx}, {res.n_scored:,} positions scored"
               + (f", reference {ref}" if ref else ""))
    click.echo(format_table(["statistic", "value", "±"], result_rows(res)))
