"""`ggforge serve MODEL`: an OpenAI-compatible HTTP server (runtime/server/); options only."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from ggforge.tools.errors import one_line_errors
from ggforge.tools.run_cli import cache_types, flash_attn_option

log = logging.getLogger(__name__)


@click.command("serve")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; pass --api-key before exposing it).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("-c", "--ctx-size", type=click.IntRange(min=1), default=None,
              help="Context size (default: the file's, at most 4096).")
@click.option("-ngl", "--gpu-layers", default="0", show_default=True,
              help="Layers on the GPU, counted as llama.cpp's --n-gpu-layers: N, 'all' or 'auto'.")
@click.option("--gpu-memory", default=None, help="Plan with this much free GPU memory (e.g. 6GiB).")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all).")
@click.option("-np", "--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Requests generated at once; this version serves them one at a time, in order.")
@click.option("--queue-size", type=click.IntRange(min=0), default=32, show_default=True,
              help="Requests that may wait for the model; more are answered 429.")
@click.option("--max-body", type=click.IntRange(min=1024), default=2 << 20, show_default=True,
              help="Largest request body in bytes; larger ones are answered 413.")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every request "
              "(GET /health excepted).")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Read the API key from this file (keeps it out of the process list).")
@click.option("-a", "--alias", default=None, help="Model name in responses (default: the file's name).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@cache_types
@flash_attn_option
@one_line_errors
def serve_cmd(model: str, host: str, port: int, parallel: int, queue_size: int, max_body: int,
              api_key: str | None, api_key_file: str | None, alias: str | None, log_level: str,
              **kw) -> None:
    """Serve MODEL over OpenAI's HTTP API: /v1/chat/completions, /v1/completions,
    /v1/models, /health, /tokenize, /detokenize."""
    from ggforge.runtime.server import ServerSettings, serve
    from ggforge.tools.run_cli import _load

    if api_key and api_key_file:
        raise ValueError("give --api-key or --api-key-file, not both")
    if api_key_file:
        api_key = Path(api_key_file).read_text().strip()
        if not api_key:
            raise ValueError(f"{api_key_file} is empty: no API key in it")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s")
    if parallel > 1:
        log.warning("--parallel %d: this version generates one request at a time; the others "
                    "wait in a FIFO queue", parallel)
    m = _load(model, kw)
    try:
        settings = ServerSettings(model_name=alias or Path(model).name, api_key=api_key or None,
                                  max_body_bytes=max_body, max_waiting=queue_size)
        serve(m, settings, host=host, port=port, log_level=log_level)
    finally:
        m.close()
