"""The JSON files of a Hugging Face model folder, read as data (never as code)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ggforge.formats.errors import FormatError

_MAX_JSON_BYTES = 512 << 20  # tokenizer.json of a 256k vocabulary is ~35 MB


def read_json(path: Path, *, kind: type = dict) -> Any:
    """The JSON value in `path`, or None when there is no such file.

    Raises FormatError when the file is not JSON or its top level is not a `kind`."""
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size > _MAX_JSON_BYTES:
        raise FormatError(f"{path}: {size} bytes is too large for a tokenizer file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(value, kind):
        raise FormatError(f"{path}: expected a JSON {kind.__name__}, found {type(value).__name__}")
    return value


def read_hparams(model_dir: Path) -> dict[str, Any]:
    """config.json with a multimodal model's text_config lifted to the top, as llama.cpp's
    converter sees it ({} when the folder has no config.json)."""
    config = read_json(model_dir / "config.json") or {}
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    return config


def vocab_size_hint(hparams: dict[str, Any], *keys: str) -> int | None:
    """The first of `keys` that config.json sets, as a positive int (None if none is set)."""
    for key in keys:
        value = hparams.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise FormatError(f"config.json: {key} must be a positive integer, found {value!r}")
        return value
    return None
