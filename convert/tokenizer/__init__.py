"""Tokenizer export: a Hugging Face model folder's tokenizer as GGUF `tokenizer.*` metadata.

    kvs = export_tokenizer(Path("SmolLM2-135M"), "llama")   # list[KV], ready for GGUFWriter

The result is what llama.cpp's convert_hf_to_gguf.py (the llama.cpp bundled with
llama-cpp-python 0.3.36) writes for the same folder: same keys, value types and values.
Which path a family takes is theirs too:

| GGUF arch       | tokenizer.model (SentencePiece)        | else tokenizer.json (byte-level BPE) |
|-----------------|----------------------------------------|--------------------------------------|
| llama (Llama, Mistral) | `llama` model; add_space_prefix from tokenizer_config's add_prefix_space | `gpt2` model + pre-tokenizer |
| qwen2, qwen3    | `llama` model                           | `gpt2` model + pre-tokenizer         |
| gemma3          | `llama` model, add_space_prefix = false | `gpt2` model + pre-tokenizer         |
| gemma2          | `llama` model, add_space_prefix = false | (refused: the converter needs tokenizer.model) |
| phi3            | `llama` model, added tokens its own way | `gpt2` model when tokenizer_class is GPT2Tokenizer (Phi-4) |

Files are read as data (JSON, the SentencePiece protobuf); nothing in the folder runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gguf
from gguf import GGUFValueType as V

from ggforge.formats.errors import FormatError, UnsupportedModelError
from ggforge.formats.gguf_writer import KV
from ggforge.convert.tokenizer.bpe import bpe_kvs
from ggforge.convert.tokenizer.files import read_hparams, read_json
from ggforge.convert.tokenizer.special import load_special_tokens
from ggforge.convert.tokenizer.spm import phi3_spm_kvs, spm_kvs

__all__ = ["export_tokenizer", "SUPPORTED_ARCHS"]

T = gguf.Keys.Tokenizer

# what transformers' AutoConfig fills in for a config.json without vocab_size: llama.cpp's
# converter reads config.json through it (LlamaConfig/MistralConfig, Qwen2/3Config, Gemma3TextConfig)
CONFIG_DEFAULT_VOCAB = {"llama": 32000, "qwen2": 151936, "qwen3": 151936, "gemma3": 262208,
                        "gemma2": 256000, "phi3": 32064}
CODELLAMA_VOCAB = 32016  # CodeLlama: fill-in-the-middle tokens at fixed ids
GRANITE_SMALL_VOCAB = 49152  # the converter turns BOS off for this vocabulary size (SmolLM's too)


def _vocab_kvs(model_dir: Path, hparams: dict[str, Any], arch: str) -> list[KV]:
    """SentencePiece when tokenizer.model exists, else byte-level BPE from tokenizer.json."""
    if (model_dir / "tokenizer.model").is_file():
        return spm_kvs(model_dir, hparams)
    return bpe_kvs(model_dir, hparams, arch)


def _llama(model_dir: Path, hparams: dict[str, Any], arch: str) -> list[KV]:
    """LlamaModel.set_vocab (Llama 2/3, TinyLlama, SmolLM, Mistral)."""
    if (model_dir / "tekken.json").is_file() and not (model_dir / "tokenizer.json").is_file():
        raise UnsupportedModelError(f"{model_dir}: Mistral tekken.json tokenizers are not supported; "
                                    "use a repo with tokenizer.json or tokenizer.model")
    kvs = []
    prefix = (read_json(model_dir / "tokenizer_config.json") or {}).get("add_prefix_space")
    if prefix is not None:
        kvs.append(KV(T.ADD_PREFIX, V.BOOL, bool(prefix)))
    if not (model_dir / "tokenizer.model").is_file() and _is_llama_hf_bpe(model_dir):
        # the converter's LlamaHfVocab path: SentencePiece-style BPE known only from
        # tokenizer.json, written with every score -1000, which llama.cpp's SentencePiece
        # tokenizer cannot merge by. Better to say so than to write a file that tokenizes wrong.
        raise UnsupportedModelError(f"{model_dir / 'tokenizer.json'}: a SentencePiece-style BPE without "
                                    "tokenizer.model; add the repo's tokenizer.model")
    kvs += _vocab_kvs(model_dir, hparams, arch)
    vocab_size = hparams.get("vocab_size", 32000)
    if vocab_size == CODELLAMA_VOCAB:
        st = load_special_tokens(model_dir, types=("prefix", "suffix", "middle", "eot"))
        for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            st.set_id(typ, tid)
        kvs += st.kvs()
    if vocab_size == GRANITE_SMALL_VOCAB:
        kvs.append(KV(T.ADD_BOS, V.BOOL, False))
    return kvs


def _is_llama_hf_bpe(model_dir: Path) -> bool:
    """What gguf-py's LlamaHfVocab accepts: BPE with byte fallback and a Sequence decoder."""
    tokenizer = read_json(model_dir / "tokenizer.json")
    if tokenizer is None:
        return False
    model = tokenizer.get("model") or {}
    if model.get("type") == "BPE" and model.get("ignore_merges", False) and not model.get("byte_fallback", True):
        return False  # Llama 3
    decoder = tokenizer.get("decoder") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback", False)) and decoder.get("type") == "Sequence"


def _qwen(model_dir: Path, hparams: dict[str, Any], arch: str) -> list[KV]:
    """Qwen2Model/Qwen3Model.set_vocab."""
    return _vocab_kvs(model_dir, hparams, arch)


def _gemma3(model_dir: Path, hparams: dict[str, Any], arch: str) -> list[KV]:
    """Gemma3Model.set_vocab: SentencePiece without the space prefix."""
    kvs = _vocab_kvs(model_dir, hparams, arch)
    if (model_dir / "tokenizer.model").is_file():
        kvs.append(KV(T.ADD_PREFIX, V.BOOL, False))
    return kvs


def _gemma2(model_dir: Path, hparams: dict[str, Any], arch: str) -> list[KV]:
    """Gemma2Model.set_vocab: SentencePiece only, without the space prefix."""
    if not (model_dir / "tokenizer.model").is_file():
        raise UnsupportedModelError(f"{model_dir}: Gemma 2 needs tokenizer.model (as llama.cpp's converter does)")
    return spm_kvs(model_dir, hparams) + [KV(T.ADD_PREFIX, V.BOOL, False)]


def _phi3(model_dir: Path, hparams: dict[str, Any], arch: str) -> list[KV]:
    """Phi3MiniModel.set_vocab: byte-level BPE for a GPT2Tokenizer (Phi-4), else its own
    reading of tokenizer.model."""
    if (read_json(model_dir / "tokenizer_config.json") or {}).get("tokenizer_class") == "GPT2Tokenizer":
        return bpe_kvs(model_dir, hparams, arch)
    if not (model_dir / "tokenizer.model").is_file():
        raise UnsupportedModelError(f"{model_dir}: Phi-3 needs tokenizer.model (as llama.cpp's converter does)")
    return phi3_spm_kvs(model_dir, hparams)


FAMILIES: dict[str, Callable[[Path, dict[str, Any], str], list[KV]]] = {
    "llama": _llama, "qwen2": _qwen, "qwen3": _qwen, "gemma3": _gemma3, "gemma2": _gemma2,
    "phi3": _phi3,
}
SUPPORTED_ARCHS = tuple(FAMILIES)


def export_tokenizer(model_dir: Path, arch: str) -> list[KV]:
    """The `tokenizer.*` GGUF metadata for the model in `model_dir` of GGUF architecture
    `arch`, one KV per key in the order llama.cpp's converter writes them.

    Raises UnsupportedModelError for an architecture or tokenizer kind we do not export,
    FormatError for malformed tokenizer files."""
    model_dir = Path(model_dir)
    if arch not in FAMILIES:
        raise UnsupportedModelError(f"no tokenizer export for architecture {arch!r}; "
                                    f"supported: {', '.join(SUPPORTED_ARCHS)}")
    hparams = read_hparams(model_dir)
    if (model_dir / "config.json").is_file() and hparams.get("vocab_size") is None:
        hparams["vocab_size"] = CONFIG_DEFAULT_VOCAB[arch]
    kvs = FAMILIES[arch](model_dir, hparams, arch)
    merged: dict[str, KV] = {}
    for kv in kvs:  # a later value for a key replaces the earlier one in place, as gguf-py does
        merged[kv.key] = kv
    _check_unique(merged[T.LIST].value, model_dir)
    return list(merged.values())


def _check_unique(tokens: list[str], model_dir: Path) -> None:
    """llama.cpp maps token text to id and aborts (GGML_ASSERT) when two ids share a text;
    refuse here, with the culprits, instead of writing a file it cannot load."""
    if len(set(tokens)) == len(tokens):
        return
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in seen:
            raise FormatError(f"{model_dir}: token {token!r} appears at ids {seen[token]} and {i}; "
                              "llama.cpp cannot load a vocabulary with duplicate tokens")
        seen[token] = i
