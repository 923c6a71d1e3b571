"""`ggforge run`, `ggforge chat` and `ggforge bench`: argument parsing and printing only."""
from __future__ import annotations

import os
import sys

import click

from ggforge.tools.errors import one_line_errors
from ggforge.tools.table import format_table


def sampling_options(fn):
    opts = [
        click.option("--temp", "temperature", default=0.8, show_default=True, help="Temperature; 0 is greedy."),
        click.option("--top-k", default=40, show_default=True),
        click.option("--top-p", default=0.95, show_default=True),
        click.option("--min-p", default=0.05, show_default=True),
        click.option("--repeat-penalty", default=1.0, show_default=True),
        click.option("--repeat-last-n", default=64, show_default=True),
        click.option("--seed", type=int, default=None, help="Random seed (default: random)."),
        click.option("-c", "--ctx-size", type=int, default=None, help="Context size (default: the file's, at most 4096)."),
        click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all)."),
        click.option("-ngl", "--gpu-layers", default="0", show_default=True,
                     help="Layers on the GPU, counted as llama.cpp's --n-gpu-layers: N, 'all' or 'auto'."),
        click.option("--gpu-memory", default=None,
                     help="Plan with this much free GPU memory (e.g. 6GiB) instead of what the device reports."),
    ] + cache_type_options()
    for o in reversed(opts):
        fn = o(fn)
    return flash_attn_option(fn)


def cache_type_options() -> list:
    """--cache-type-k / --cache-type-v, with llama.cpp's default (f16)."""
    return [click.option(f"-ct{kv}", f"--cache-type-{kv}", f"cache_type_{kv}", default="f16",
                         show_default=True, type=click.Choice(["f32", "f16"], case_sensitive=False),
                         help=f"KV cache type for {'keys' if kv == 'k' else 'values'}, CPU and GPU "
                              "(f32: llama.cpp's logits with -ctk/-ctv f32 -fa off).")
            for kv in ("k", "v")]


def cache_types(fn):
    for o in reversed(cache_type_options()):
        fn = o(fn)
    return fn


def flash_attn_option(fn):
    """--flash-attn on|off|auto, llama.cpp's -fa (default auto)."""
    return click.option("-fa", "--flash-attn", "flash_attn", default="auto", show_default=True,
                        type=click.Choice(["on", "off", "auto"], case_sensitive=False),
                        help="CPU attention as llama.cpp's flash attention (auto: with an F16 "
                             "cache, as llama.cpp's default picks it).")(fn)


def _settings(kw: dict):
    from ggforge.runtime.sampling import SamplerSettings

    return SamplerSettings(temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"],
                           min_p=kw["min_p"], repeat_penalty=kw["repeat_penalty"],
                           repeat_last_n=kw["repeat_last_n"], seed=kw["seed"])


def _load(path: str, kw: dict):
    from ggforge.runtime import kernels
    from ggforge.runtime.generate import load

    from ggforge.runtime.placement import parse_bytes

    if kw.get("threads"):
        kernels.set_threads(kw["threads"])
    mem = kw.get("gpu_memory")
    return load(path, n_ctx=kw.get("ctx_size"), gpu_layers=kw.get("gpu_layers") or 0,
                gpu_memory=parse_bytes(mem) if mem else None,
                cache_type_k=kw.get("cache_type_k") or "f16", cache_type_v=kw.get("cache_type_v") or "f16",
                flash_attn=kw.get("flash_attn") or "auto")


@click.command("run")
@click.argument("model", type=click.Path())
@click.option("-p", "--prompt", required=True, help="The prompt.")
@click.option("-n", "--n-predict", default=128, show_default=True, help="Tokens to generate at most.")
@click.option("--stop", multiple=True, help="Stop when this text is generated (repeatable).")
@sampling_options
@one_line_errors
def run_cmd(model: str, prompt: str, n_predict: int, stop: tuple[str, ...], **kw) -> None:
    """Generate text from PROMPT with a GGUF MODEL on the CPU."""
    with _load(model, kw) as m:
        for piece in m.generate(prompt, max_tokens=n_predict, settings=_settings(kw), stop=stop):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()


@click.command("chat")
@click.argument("model", type=click.Path())
@click.option("-s", "--system", default=None, help="A system message.")
@click.option("-n", "--n-predict", default=512, show_default=True, help="Tokens per reply at most.")
@sampling_options
@one_line_errors
def chat_cmd(model: str, system: str | None, n_predict: int, **kw) -> None:
    """Chat with a GGUF MODEL using its chat template (empty line or Ctrl-D ends)."""
    with _load(model, kw) as m:
        m.chat_template   # a file without a usable template fails before the first turn
        messages = [{"role": "system", "content": system}] if system else []
        settings = _settings(kw)
        while True:
            try:
                line = input("> ") if sys.stdin.isatty() else sys.stdin.readline()
            except EOFError:
                break
            line = line.rstrip("\n")
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            reply = []
            for piece in m.chat(messages, max_tokens=n_predict, settings=settings):
                reply.append(piece)
                click.echo(piece, nl=False)
                sys.stdout.flush()
            click.echo()
            messages.append({"role": "assistant", "content": "".join(reply)})


@click.command("bench")
@click.argument("model", type=click.Path())
@click.option("-p", "--n-prompt", default=128, show_default=True, help="Prompt tokens (pp).")
@click.option("-n", "--n-gen", default=64, show_default=True, help="Generated tokens (tg).")
@click.option("-r", "--repeat", default=3, show_default=True, help="Runs per figure (median kept).")
@click.option("-t", "--threads", type=int, default=None, help="Threads for both engines (default: all cores).")
@click.option("-ngl", "--gpu-layers", default=None,
              help="GPU benchmark at these layer counts, comma-separated (numbers, 'half', 'all'), e.g. 0,half,all.")
@click.option("--llama-bench", "llama_bench_bin", default=None,
              help="llama.cpp's llama-bench binary (a CUDA build) to compare the GPU figures with.")
@click.option("--no-pdl", is_flag=True, help="GPU: no programmatic dependent launch (on by default on Hopper).")
@click.option("--q8-tiles", type=click.Path(dir_okay=False), default=None,
              help="GPU: Q8_0 decode tiles by shape, a JSON file of scripts/device/q8_sweep.py.")
@one_line_errors
def bench_cmd(model: str, n_prompt: int, n_gen: int, repeat: int, threads: int | None,
              gpu_layers: str | None, llama_bench_bin: str | None, no_pdl: bool,
              q8_tiles: str | None) -> None:
    """Prompt (pp) and generation (tg) tokens/s of ggforge beside llama.cpp, same file, same threads."""
    from pathlib import Path

    from ggforge.runtime.bench import bench_ggforge, bench_llama_cpp

    if gpu_layers is not None:
        from ggforge.runtime import gpu

        gpu.configure(pdl=False if no_pdl else None)
        if q8_tiles:
            from ggforge.runtime.gpu import settings

            gpu.configure(q8_tiles=settings.read_tile_file(q8_tiles))
        _bench_gpu(Path(model), n_prompt, n_gen, repeat, threads, gpu_layers, llama_bench_bin)
        return

    threads = threads or len(os.sched_getaffinity(0))
    ours = bench_ggforge(Path(model), n_prompt, n_gen, repeat, threads)
    theirs = bench_llama_cpp(Path(model), n_prompt, n_gen, repeat, threads)
    rows = [["ggforge", round(ours.pp_tps, 1), round(ours.tg_tps, 1)]]
    if theirs is not None:
        rows.append(["llama.cpp", round(theirs.pp_tps, 1), round(theirs.tg_tps, 1)])
        rows.append(["ratio", round(ours.pp_tps / theirs.pp_tps, 2), round(ours.tg_tps / theirs.tg_tps, 2)])
    click.echo(f"{model}: {threads} threads, pp{n_prompt} tg{n_gen}, median of {repeat}")
    click.echo(format_table(["engine", f"pp{n_prompt} t/s", f"tg{n_gen} t/s"], rows))


def _bench_gpu(model, n_prompt: int, n_gen: int, repeat: int, threads: int | None, spec: str,
               llama_bench_bin: str | None) -> None:
    from ggforge.formats.gguf_reader import GGUFFile
    from ggforge.runtime import kernels
    from ggforge.runtime.gpu import resolve_device
    from ggforge.runtime.gpu.bench import bench_offload, llama_bench, measure_bandwidth

    resolve_device()   # a CUDA device, or one clear line
    kernels.set_threads(threads or len(os.sched_getaffinity(0)))
    with GGUFFile.open(model) as g:
        n_layer = int(g.get(f"{g.get('general.architecture')}.block_count"))
    counts = []
    for part in spec.split(","):
        part = part.strip().lower()
        counts.append(n_layer + 1 if part == "all" else n_layer // 2 if part == "half" else int(part))
    bw = measure_bandwidth()
    rows = []
    for n in counts:
        s = bench_offload(model, n_prompt, n_gen, repeat, n)
        frac = s.tg_tps * s.device_bytes_per_token / bw
        row = [n, round(s.pp_tps, 1), round(s.tg_tps, 1), f"{s.device_bytes_per_token / 2**20:.0f} MiB",
               f"{100 * frac:.0f}%"]
        theirs = llama_bench(llama_bench_bin, model, n_prompt, n_gen, repeat, n) if llama_bench_bin else None
        if theirs is not None:
            row += [round(theirs[0], 1), round(theirs[1], 1), round(s.pp_tps / theirs[0], 2),
                    round(s.tg_tps / theirs[1], 2)]
        rows.append(row)
    click.echo(f"{model}: pp{n_prompt} tg{n_gen}, median of {repeat}; device copy bandwidth "
               f"{bw / 1e9:.0f} GB/s (read + write)")
    headers = ["gpu layers", "pp t/s", "tg t/s", "device bytes/token", "tg bandwidth"]
    if any(len(r) > 5 for r in rows):
        headers += ["llama.cpp pp", "llama.cpp tg", "pp ratio", "tg ratio"]
        rows = [r + [""] * (9 - len(r)) for r in rows]
    click.echo(format_table(headers, rows))


@click.command("memory")
@click.argument("model", type=click.Path())
@click.option("-p", "--n-prompt", default=128, show_default=True, help="Prompt tokens (one prefill).")
@click.option("-n", "--n-gen", default=64, show_default=True, help="Generated tokens (greedy).")
@click.option("-c", "--ctx-size", type=int, default=None, help="KV cache size (default: prompt + generated).")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
@cache_types
@flash_attn_option
@one_line_errors
def memory_cmd(model: str, n_prompt: int, n_gen: int, ctx_size: int | None, threads: int | None,
               as_json: bool, cache_type_k: str, cache_type_v: str, flash_attn: str) -> None:
    """Resident memory of running MODEL on the CPU, stage by stage, over a code-only baseline."""
    import json
    from dataclasses import asdict

    from ggforge.runtime import kernels
    from ggforge.runtime.memory_report import format_report, measure, prime_kernel_cache

    if threads:
        kernels.set_threads(threads)
    from ggforge.runtime.model import Model

    Model(model).close()   # a bad file: one line here, not a traceback from the child
    types = (cache_type_k.lower(), cache_type_v.lower())
    prime_kernel_cache(model, n_prompt, types, flash_attn.lower())
    rep = measure(model, n_prompt, n_gen, ctx_size, types, flash_attn.lower())
    if as_json:
        click.echo(json.dumps({**asdict(rep), "growth": rep.growth, "ratio": rep.ratio(rep.growth)}))
    else:
        click.echo(format_report(rep))
