"""SentencePiece vocabularies (tokenizer.model) as llama.cpp's `llama` tokenizer model.

Mirrors `_create_vocab_sentencepiece` / `_set_vocab_sentencepiece` of llama.cpp's
convert_hf_to_gguf.py: pieces with their scores and types, then added_tokens.json and
tokenizer_config.json's added_tokens_decoder on top, the whole padded to config.json's
vocab_size with `[PAD{i}]` placeholders.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType as V

from ggforge.formats.errors import FormatError
from ggforge.formats.gguf_writer import KV
from ggforge.convert.tokenizer import spm_proto
from ggforge.convert.tokenizer.files import read_json, vocab_size_hint
from ggforge.convert.tokenizer.special import load_special_tokens, looks_special

log = logging.getLogger(__name__)
T = gguf.Keys.Tokenizer
TT = gguf.TokenType

# llama.cpp's converter asks sentencepiece IsUnknown/IsControl/IsUnused/IsByte, in that
# order; anything else (user-defined pieces included) is NORMAL
_TYPE = {spm_proto.UNKNOWN: TT.UNKNOWN, spm_proto.CONTROL: TT.CONTROL,
         spm_proto.UNUSED: TT.UNUSED, spm_proto.BYTE: TT.BYTE}


def spm_vocab(model_dir: Path, hparams: dict[str, Any]) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of model_dir/tokenizer.model, as the converter writes them."""
    pieces = spm_proto.read_pieces(model_dir / "tokenizer.model")
    # gemma3n's per-layer vocabulary is the text one; other models have only vocab_size
    n_vocab = vocab_size_hint(hparams, "vocab_size_per_layer_input", "vocab_size") or len(pieces)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(TT.UNUSED)] * n_vocab
    if len(pieces) > n_vocab:
        log.warning("tokenizer.model has %d pieces, config.json vocab_size is %d: pieces from id %d dropped",
                    len(pieces), n_vocab, n_vocab)
    for i, piece in enumerate(pieces[:n_vocab]):
        tokens[i], scores[i], types[i] = piece.text, piece.score, int(_TYPE.get(piece.type, TT.NORMAL))

    added = read_json(model_dir / "added_tokens.json") or {}
    for content, tid in added.items():
        if not _in_range(tid, n_vocab, model_dir / "added_tokens.json"):
            continue
        tokens[tid], scores[tid], types[tid] = content, -1000.0, int(TT.USER_DEFINED)

    config = read_json(model_dir / "tokenizer_config.json") or {}
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise FormatError(f"{model_dir / 'tokenizer_config.json'}: added_tokens_decoder is not an object")
    for key, data in decoder.items():
        tid = _int_key(key, model_dir / "tokenizer_config.json")
        content = data.get("content") if isinstance(data, dict) else None
        if not isinstance(content, str):
            raise FormatError(f"{model_dir / 'tokenizer_config.json'}: added token {key} has no content")
        if not _in_range(tid, n_vocab, model_dir / "tokenizer_config.json"):
            continue
        if data.get("special") or looks_special(content):
            types[tid] = int(TT.CONTROL)
        else:
            content = content.replace("\u2581", " ")  # llama.cpp expects user-defined tokens pre-normalized
            types[tid] = int(TT.USER_DEFINED)
        tokens[tid], scores[tid] = content, -1000.0
    return tokens, scores, types


def _int_key(key: str, path: Path) -> int:
    try:
        return int(key)
    except ValueError:
        raise FormatError(f"{path}: added token id {key!r} is not an integer") from None


def _in_range(tid: Any, n_vocab: int, path: Path) -> bool:
    if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
        raise FormatError(f"{path}: token id {tid!r} is not a non-negative integer")
    if tid >= n_vocab:
        log.warning("%s: token id %d is past the vocabulary (%d); ignored", path, tid, n_vocab)
        return False
    return True


def spm_kvs(model_dir: Path, hparams: dict[str, Any]) -> list[KV]:
    """`_set_vocab_sentencepiece`: model "llama", pre "default", vocabulary, special tokens."""
    tokens, scores, types = spm_vocab(model_dir, hparams)
    kvs = [KV(T.MODEL, V.STRING, "llama"), KV(T.PRE, V.STRING, "default"),
           KV(T.LIST, V.ARRAY, tokens, V.STRING), KV(T.SCORES, V.ARRAY, scores, V.FLOAT32),
           KV(T.TOKEN_TYPE, V.ARRAY, types, V.INT32)]
    return kvs + load_special_tokens(model_dir, n_vocab=len(tokens)).kvs()


def phi3_spm_kvs(model_dir: Path, hparams: dict[str, Any]) -> list[KV]:
    """Phi3MiniModel.set_vocab: the pieces padded to vocab_size as above, then added_tokens.json,
    tokenizer_config.json's added_tokens_decoder and tokenizer.json's added_tokens, each token
    USER_DEFINED (CONTROL when marked special) with score -1000, unnormalized."""
    pieces = spm_proto.read_pieces(model_dir / "tokenizer.model")
    n_vocab = vocab_size_hint(hparams, "vocab_size") or len(pieces)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(TT.UNUSED)] * n_vocab
    for i, piece in enumerate(pieces[:n_vocab]):
        tokens[i], scores[i], types[i] = piece.text, piece.score, int(_TYPE.get(piece.type, TT.NORMAL))
    for content, tid in (read_json(model_dir / "added_tokens.json") or {}).items():
        if _in_range(tid, n_vocab, model_dir / "added_tokens.json"):
            tokens[tid], scores[tid], types[tid] = content, -1000.0, int(TT.USER_DEFINED)
    config_path, json_path = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    decoder = (read_json(config_path) or {}).get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise FormatError(f"{config_path}: added_tokens_decoder is not an object")
    added = [(_int_key(k, config_path), d, config_path) for k, d in decoder.items()]
    listed = (read_json(json_path) or {}).get("added_tokens") or []
    if not isinstance(listed, list):
        raise FormatError(f"{json_path}: added_tokens is not a list")
    added += [(d.get("id") if isinstance(d, dict) else None, d, json_path) for d in listed]
    for tid, data, path in added:
        content = data.get("content") if isinstance(data, dict) else None
        if not isinstance(content, str):
            raise FormatError(f"{path}: added token {tid} has no content")
        if not _in_range(tid, n_vocab, path):
            continue
        tokens[tid], scores[tid] = content, -1000.0
        types[tid] = int(TT.CONTROL if data.get("special") else TT.USER_DEFINED)
    kvs = [KV(T.MODEL, V.STRING, "llama"), KV(T.PRE, V.STRING, "default"),
           KV(T.LIST, V.ARRAY, tokens, V.STRING), KV(T.SCORES, V.ARRAY, scores, V.FLOAT32),
           KV(T.TOKEN_TYPE, V.ARRAY, types, V.INT32)]
    return kvs + load_special_tokens(model_dir, n_vocab=len(tokens)).kvs()
