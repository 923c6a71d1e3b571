"""`ggforge imatrix`: an importance matrix as llama.cpp's llama-imatrix computes it.

    ggforge imatrix model.gguf -f calibration.txt -o imatrix.gguf -c 512
    quantize ./model q4_k_m --imatrix imatrix.gguf

Argument parsing and printing only: the work is runtime/imatrix.py (what is collected) and
formats/imatrix_writer.py (the file). A Hugging Face model (folder, .safetensors file or
sharded index) is first converted to a temporary F32 GGUF, as llama.cpp's workflow does
with convert_hf_to_gguf.py.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import click

from ggforge.runtime.generate import resolve_flash_attn
from ggforge.runtime.kv_cache import cache_dtype
from ggforge.tools.errors import one_line_errors
from ggforge.tools.run_cli import flash_attn_option


def _cache_type(kv: str):
    return click.option(f"-ct{kv}", f"--cache-type-{kv}", f"cache_type_{kv}", default="f16",
                        show_default=True, type=click.Choice(["f32", "f16"], case_sensitive=False),
                        help=f"KV cache type for {'keys' if kv == 'k' else 'values'} (as llama-imatrix's; "
                             "-ctk f32 -ctv f32 -fa off: its sums with those options).")


@contextlib.contextmanager
def _gguf_model(source: str, no_progress: bool) -> Iterator[Path]:
    """``source`` when it is a GGUF file; else its F32 conversion in a temporary folder."""
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{source}: no such model file or folder")
    hf = path.is_dir() or path.suffix in (".safetensors", ".json")
    if not hf:
        yield path
        return
    from ggforge.convert.pipeline import convert

    with tempfile.TemporaryDirectory(prefix="ggforge-imatrix-") as tmp:
        if not no_progress:
            click.echo(f"{source}: converting to a temporary F32 GGUF", err=True)
        result = convert(source, "F32", Path(tmp) / "model-F32.gguf")
        yield result.output


def _check_is_model(path: Path) -> None:
    """A GGUF without an architecture (an imatrix, a vocabulary) is named as such."""
    from ggforge.formats.gguf_reader import GGUFFile

    with GGUFFile.open(path) as g:
        if "general.architecture" not in g.metadata:
            kind = g.metadata.get("general.type")
            what = f" (general.type is {kind!r})" if isinstance(kind, str) else ""
            raise ValueError(f"{path}: not a model: the GGUF has no general.architecture{what}; "
                             "give a model GGUF or a Hugging Face model folder")


@click.command("imatrix")
@click.argument("model", type=click.Path())
@click.option("-f", "--file", "text", required=True, type=click.Path(),
              help="The calibration text (UTF-8 or any bytes, as llama-imatrix reads it).")
@click.option("-o", "--output", default="imatrix.gguf", show_default=True, type=click.Path(),
              help="Output file.")
@click.option("--output-format", "fmt", type=click.Choice(["gguf", "dat"], case_sensitive=False),
              default="gguf", show_default=True, help="GGUF imatrix, or llama.cpp's legacy .dat.")
@click.option("-c", "--ctx-size", default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", default=-1, show_default=True, help="Chunks to process at most (-1: all).")
@click.option("--chunk", "--from-chunk", "from_chunk", default=0, show_default=True,
              help="Skip this many chunks of the text first.")
@click.option("--process-output", is_flag=True, help="Also collect output.weight (an untied head).")
@click.option("--ppl/--no-ppl", default=True, show_default=True,
              help="Print the perplexity over the chunks' second halves, as llama-imatrix.")
@click.option("--parse-special", is_flag=True, help="Tokenize special-token text as special tokens.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all).")
@click.option("-ngl", "--gpu-layers", default="0", show_default=True,
              help="Layers on the GPU: only 0 for now (the products are observed on the CPU).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_cache_type("k")
@_cache_type("v")
@flash_attn_option
@one_line_errors
def imatrix_cmd(model: str, text: str, output: str, fmt: str, ctx_size: int, chunks: int,
                from_chunk: int, process_output: bool, ppl: bool, parse_special: bool,
                threads: int | None, gpu_layers: str, force: bool, no_progress: bool,
                cache_type_k: str, cache_type_v: str, flash_attn: str) -> None:
    """Importance matrix of MODEL (a GGUF, or a Hugging Face model folder) over the text
    of -f, for `quantize --imatrix`: per weight of the layers, the sums of the squared
    input activations per column and their counts, in llama.cpp's imatrix format."""
    from tqdm import tqdm

    from ggforge.formats.atomic import check_output
    from ggforge.formats.imatrix_writer import write_imatrix
    from ggforge.runtime import kernels
    from ggforge.runtime.imatrix import compute_imatrix, make_chunks, read_text, text_tokens
    from ggforge.runtime.model import Model
    from ggforge.runtime.tokenizer import Tokenizer

    if str(gpu_layers).strip().lower() not in ("0", "none"):
        raise ValueError(f"imatrix: --gpu-layers {gpu_layers}: the importance matrix is collected "
                         "on the CPU only for now; use -ngl 0")
    out = Path(output)
    check_output(out, [Path(model), Path(text)], force=force)
    raw = read_text(text)   # a missing text file fails before any model is loaded or converted
    if threads:
        kernels.set_threads(threads)
    with _gguf_model(model, no_progress) as path:
        _check_is_model(path)
        types = (cache_type_k.lower(), cache_type_v.lower())
        flash = resolve_flash_attn(flash_attn, [cache_dtype(t) for t in types])
        m = Model(path)
        try:
            tok = Tokenizer.from_metadata(m.gguf.metadata)
            ids = text_tokens(tok, raw, parse_special=parse_special)
            batches = make_chunks(ids, ctx_size, n_chunks=chunks, from_chunk=from_chunk,
                                  bos=tok.bos_id if tok.add_bos else None, what=text)
            bar = tqdm(total=len(batches), unit="chunk", disable=no_progress, file=sys.stderr,
                       desc=f"imatrix {len(ids)} tokens, {len(batches)} x {ctx_size}")

            def progress(i: int, running_ppl: float | None) -> None:
                if running_ppl is not None:
                    bar.set_postfix_str(f"ppl {running_ppl:.4f}", refresh=False)
                bar.update(1)

            try:
                result = compute_imatrix(m, batches, dataset=text, process_output=process_output,
                                         compute_ppl=ppl, progress=progress,
                                         cache_types=types, flash_attn=flash)
            finally:
                bar.close()
        finally:
            m.close()
    write_imatrix(result.data, out, fmt.lower())
    d = result.data
    click.echo(f"wrote {out} ({fmt.lower()}): {len(d.entries)} entries, {d.chunk_count} chunks "
               f"of {d.chunk_size} tokens")
    if result.ppl is not None:
        err = "" if result.ppl_error is None else f" +/- {result.ppl_error:.5f}"
        click.echo(f"Final estimate: PPL = {result.ppl:.4f}{err}")
