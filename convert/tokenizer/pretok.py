"""Which llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) a byte-level BPE tokenizer needs.

llama.cpp does not read the pre-tokenizer from tokenizer.json: it keeps its own
implementation of each known one, named by a string. Its converter picks the name by
tokenizing a fixed check text and hashing the ids ("chkhsh"); a tokenizer whose hash is
not in its table is refused. We do the same for real models, and for tokenizers that no
table can know (trained in a test, or a new fine-tune) we read the pre-tokenizer's
definition in tokenizer.json and name the llama.cpp implementation of that exact regex.
"""
from __future__ import annotations

import logging
from hashlib import sha256
from pathlib import Path
from typing import Any

from ggforge.formats.errors import UnsupportedModelError

log = logging.getLogger(__name__)

# convert_hf_to_gguf.py's check text, byte for byte
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")

# sha256(str(ids of CHECK_TEXT)) -> name, for the tokenizers of the families we convert
# (values from get_vocab_base_pre() of llama.cpp's convert_hf_to_gguf.py)
CHKHSH: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3-7B (Llama)
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # Llama arch
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # Llama arch
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # ruGPT3XL
}

# The split regexes of llama.cpp's pre-tokenizers, as tokenizer.json writes them. llama.cpp
# spells the case-insensitive group out ('[sS]...); Hugging Face repos use (?i:...).
_CONTRACTIONS = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)",
                 "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])")
_LLAMA3_TAIL = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_TAIL = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_REGEXES = {c + _LLAMA3_TAIL: "llama3" for c in _CONTRACTIONS} | {c + _QWEN2_TAIL: "qwen2" for c in _CONTRACTIONS}

# (shape of the tokenizer.json pre-tokenizer) -> llama.cpp names of that implementation
SUPPORTED = {
    "llama3": "Split(Llama 3 regex) + ByteLevel(use_regex=false), ignore_merges -> llama-bpe, "
              "without ignore_merges -> smaug-bpe",
    "qwen2": "Split(Qwen2 regex) + ByteLevel(use_regex=false) -> qwen2",
    "smollm": "Digits(individual_digits=true) + ByteLevel(use_regex=true) -> smollm",
    "gpt-2": "ByteLevel(use_regex=true) -> gpt-2",
}


def load(tokenizer_json: Path) -> Any:
    """tokenizer.json as a `tokenizers.Tokenizer` (a data file: nothing in it runs), or None
    when the `tokenizers` package is not installed."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        log.info("tokenizers is not installed; the pre-tokenizer is named from its definition")
        return None
    try:
        return Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # tokenizers raises a plain Exception on a file it cannot read
        raise UnsupportedModelError(f"{tokenizer_json}: the tokenizers library cannot load it ({e})") from None


def chkhsh(hf: Any) -> str:
    """llama.cpp's hash of the check text's ids, special tokens added as `AutoTokenizer.encode`
    adds them."""
    return sha256(str(list(hf.encode(CHECK_TEXT).ids)).encode()).hexdigest()


def _shape(pre: Any) -> str | None:
    """Name the llama.cpp implementation of the pre-tokenizer definition `pre`, or None."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        return None
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        return None  # llama.cpp's BPE never adds a prefix space
    use_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and use_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and use_regex:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not use_regex:
        split = steps[0]
        pattern = split.get("pattern") or {}
        if split.get("behavior") == "Isolated" and not split.get("invert") and "Regex" in pattern:
            return _SPLIT_REGEXES.get(pattern["Regex"])
    return None


def from_definition(tokenizer: dict[str, Any]) -> str | None:
    """llama.cpp's name for the pre-tokenizer that tokenizer.json defines, or None."""
    shape = _shape(tokenizer.get("pre_tokenizer"))
    if shape == "llama3":
        # llama.cpp's llama-bpe takes a pre-token that is in the vocabulary whole, as
        # Hugging Face's BPE does with ignore_merges; smaug-bpe has the same regex without it
        ignore = bool((tokenizer.get("model") or {}).get("ignore_merges"))
        return "llama-bpe" if ignore else "smaug-bpe"
    return shape


def identify(tokenizer_json: Path, tokenizer: dict[str, Any], arch: str, hf: Any = None) -> str:
    """The `tokenizer.ggml.pre` value for the byte-level BPE in `tokenizer_json` (parsed:
    `tokenizer`; loaded by `load`: `hf`, None to skip the hash)."""
    digest = chkhsh(hf) if hf is not None else None
    if digest in CHKHSH:
        return CHKHSH[digest]
    name = from_definition(tokenizer)
    if name is not None:
        log.info("%s: pre-tokenizer hash %s is not in llama.cpp's table; its definition is %s's",
                 tokenizer_json, digest, name)
        return name
    raise UnsupportedModelError(
        f"{tokenizer_json}: unknown BPE pre-tokenizer for a {arch!r} model (chkhsh {digest}); "
        f"llama.cpp would refuse it too. Supported: {'; '.join(SUPPORTED.values())}")
