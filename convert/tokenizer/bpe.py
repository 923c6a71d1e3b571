"""Byte-level BPE vocabularies (tokenizer.json) as llama.cpp's `gpt2` tokenizer model.

Mirrors `get_vocab_base` / `_set_vocab_gpt2` of llama.cpp's convert_hf_to_gguf.py, reading
tokenizer.json as data instead of through transformers: the model vocabulary with the
added tokens on top, ids with no token padded as `[PAD{i}]` up to config.json's
vocab_size, added tokens typed CONTROL (special, or looking special) or USER_DEFINED.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType as V

from ggforge.formats.errors import FormatError, UnsupportedModelError
from ggforge.formats.gguf_writer import KV
from ggforge.convert.tokenizer import pretok
from ggforge.convert.tokenizer.files import read_json, vocab_size_hint
from ggforge.convert.tokenizer.special import load_special_tokens, looks_special

T = gguf.Keys.Tokenizer
TT = gguf.TokenType

# transformers' clean_up_tokenization, applied by its decode when the config asks for it
_CLEANUP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _content_ids(tokenizer: dict[str, Any], path: Path) -> tuple[dict[str, int], dict[int, dict[str, Any]]]:
    """content -> id (what `tokenizer.get_vocab()` returns: model vocabulary, then added
    tokens over it) and id -> added token entry."""
    model = tokenizer.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type", "BPE") != "BPE" or not isinstance(vocab, dict):
        raise UnsupportedModelError(f"{path}: a {model.get('type')!r} tokenizer model is not a BPE vocabulary; "
                                    "supported: byte-level BPE tokenizer.json, SentencePiece tokenizer.model")
    content_ids = dict(vocab)
    added: dict[int, dict[str, Any]] = {}
    for entry in tokenizer.get("added_tokens") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise FormatError(f"{path}: malformed entry in added_tokens: {entry!r}")
        content_ids[entry["content"]] = entry.get("id")
        added[entry.get("id")] = entry
    for content, tid in content_ids.items():
        if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
            raise FormatError(f"{path}: token {content!r} has the id {tid!r}")
    return content_ids, added


def _roundtrip(hf: Any, token: str, cleanup: bool) -> str:
    """decode(encode(token)): how the converter pre-normalizes a non-normalized added token."""
    if hf is None:
        return token
    text = hf.decode(hf.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
    if cleanup:
        for old, new in _CLEANUP:
            text = text.replace(old, new)
    return text


def bpe_vocab(model_dir: Path, hparams: dict[str, Any], arch: str) -> tuple[list[str], list[int], str]:
    """(tokens, token types, pre-tokenizer name) of model_dir/tokenizer.json."""
    path = model_dir / "tokenizer.json"
    tokenizer = read_json(path)
    if tokenizer is None:
        raise UnsupportedModelError(f"{model_dir}: no tokenizer.json or tokenizer.model to take the vocabulary from")
    content_ids, added = _content_ids(tokenizer, path)
    n_vocab = vocab_size_hint(hparams, "vocab_size") or len(content_ids)
    top = max(content_ids.values(), default=-1)
    if top >= n_vocab:
        raise FormatError(f"{path}: token id {top} is past config.json's vocab_size {n_vocab}")
    hf = pretok.load(path)
    pre = pretok.identify(path, tokenizer, arch, hf)
    cleanup = (read_json(model_dir / "tokenizer_config.json") or {}).get("clean_up_tokenization_spaces") is True

    by_id = {tid: content for content, tid in content_ids.items()}
    added_contents = {entry["content"] for entry in added.values()}
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TT.UNUSED))
            continue
        if token in added_contents and i in added:
            entry = added[i]
            if not entry.get("normalized", True):
                token = _roundtrip(hf, token, cleanup)
            if entry.get("special") or looks_special(token):
                types.append(int(TT.CONTROL))
            else:
                token = token.replace("\u2581", " ")  # llama.cpp expects user-defined tokens pre-normalized
                types.append(int(TT.USER_DEFINED))
        else:
            types.append(int(TT.NORMAL))
        tokens.append(token)
    return tokens, types, pre


def bpe_kvs(model_dir: Path, hparams: dict[str, Any], arch: str) -> list[KV]:
    """`_set_vocab_gpt2`: model "gpt2", the pre-tokenizer, vocabulary, merges, special tokens."""
    tokens, types, pre = bpe_vocab(model_dir, hparams, arch)
    kvs = [KV(T.MODEL, V.STRING, "gpt2"), KV(T.PRE, V.STRING, pre),
           KV(T.LIST, V.ARRAY, tokens, V.STRING), KV(T.TOKEN_TYPE, V.ARRAY, types, V.INT32)]
    # the converter passes no vocabulary size here, so a config.json id past the vocabulary
    # would be written, and then ignored by llama.cpp with a warning; we drop it (the same
    # tokenizer at run time) so that the file passes our own reader's range check
    special = load_special_tokens(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise FormatError(f"{model_dir}: tokenizer.json has no merges (nor is there a merges.txt); "
                          "llama.cpp cannot load a BPE vocabulary without them")
    return kvs + special.kvs()
