"""The vocabulary a GGUF file's `tokenizer.*` metadata describes, as llama.cpp loads it.

Besides tokens and types, llama.cpp derives some things from token *texts*: the end-of-turn
and fill-in-the-middle ids a converter did not write, the set of end-of-generation tokens,
and control attributes for tokens that look special. Those rules are tables here.
"""
from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass, field
from typing import Any

from ggforge.formats.errors import FormatError

log = logging.getLogger(__name__)

K = "tokenizer.ggml."

# llama_token_attr bits
UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 2, 4, 8, 16, 32
LSTRIP, RSTRIP = 128, 256
# GGUF token_type -> attribute (0 and anything unknown: no attribute at all)
TYPE_ATTR = {1: NORMAL, 2: UNKNOWN, 3: CONTROL, 4: USER_DEFINED, 5: UNUSED, 6: BYTE}

# role -> metadata keys (later keys are deprecated spellings of the same id)
ROLE_KEYS = {
    "bos": ("bos_token_id",), "eos": ("eos_token_id",), "eot": ("eot_token_id",),
    "eom": ("eom_token_id",), "unk": ("unknown_token_id",), "sep": ("seperator_token_id",),
    "pad": ("padding_token_id",), "mask": ("mask_token_id",),
    "fim_pre": ("fim_pre_token_id", "prefix_token_id"), "fim_suf": ("fim_suf_token_id", "suffix_token_id"),
    "fim_mid": ("fim_mid_token_id", "middle_token_id"), "fim_pad": ("fim_pad_token_id",),
    "fim_rep": ("fim_rep_token_id",), "fim_sep": ("fim_sep_token_id",),
}
# default ids before the metadata speaks, per vocabulary type
DEFAULT_IDS = {"llama": {"bos": 1, "eos": 2, "unk": 0}, "gpt2": {"bos": 11, "eos": 11}}

# roles llama.cpp fills in from a token's text when no id was given (and makes it control)
ROLE_TEXTS = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
            "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# texts that end generation (and are made control tokens)
EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))
ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss: user-defined


@dataclass
class Vocab:
    """Tokens, per-token attributes and the special ids, after llama.cpp's load rules."""
    model: str                       # tokenizer.ggml.model: "llama" or "gpt2"
    tokens: list[str]
    scores: array                    # float64 (array('d'))
    attrs: list[int]
    token_to_id: dict[str, int]
    ids: dict[str, int | None]       # role -> id (None: the vocabulary has none)
    eog: frozenset[int] = field(default_factory=frozenset)

    @property
    def n(self) -> int:
        return len(self.tokens)


def read_vocab(md: dict[str, Any], model: str) -> Vocab:
    """Tokens, scores, attributes and special ids from the metadata (no EOG rules yet)."""
    tokens = md.get(K + "tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise FormatError(f"{K}tokens is missing or not an array of strings; the file has no usable vocabulary")
    n = len(tokens)
    # llama.cpp gives an empty token a placeholder text
    if not all(tokens):
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    scores = _array(md, "scores", n, 0.0)
    types = _array(md, "token_type", n, 1)
    token_to_id = dict(zip(tokens, range(n)))
    if len(token_to_id) != n:
        seen: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise FormatError(f"{K}tokens: {t!r} appears at ids {seen[t]} and {i}; llama.cpp refuses "
                                  "a vocabulary with a repeated token")
            seen[t] = i
    attrs = [TYPE_ATTR.get(int(t), 0) for t in types]
    ids: dict[str, int | None] = {role: None for role in ROLE_KEYS}
    for role, default in DEFAULT_IDS.get(model, {}).items():
        ids[role] = default if default < n else None
    for role, keys in ROLE_KEYS.items():
        for key in keys:
            value = md.get(K + key)
            if value is None:
                continue
            if 0 <= int(value) < n:
                ids[role] = int(value)
            else:
                log.warning("%s%s = %s is outside the vocabulary (%d tokens); keeping %s", K, key, value, n, ids[role])
    return Vocab(model, tokens, scores, attrs, token_to_id, ids)


def _array(md: dict[str, Any], name: str, n: int, default: float) -> list:
    value = md.get(K + name)
    if value is None:
        return [default] * n
    values = value.tolist() if hasattr(value, "tolist") else list(value)  # numpy -> Python numbers
    if len(values) < n:
        raise FormatError(f"{K}{name} has {len(values)} entries for {n} tokens; the file is inconsistent")
    if isinstance(default, float):  # 8 bytes a score, not a 24-byte float object each
        return array("d", (float(v) for v in values[:n]))
    return [int(v) for v in values[:n]]


def apply_text_rules(v: Vocab) -> None:
    """llama.cpp's rules on token texts: fill in missing EOT/EOM/FIM ids, mark control-looking
    tokens, build the end-of-generation set."""
    for role, texts in ROLE_TEXTS.items():
        if v.ids[role] is not None:
            continue
        # llama.cpp takes the first candidate in its hash map's order. Where a vocabulary has
        # several (Llama 3: <|end_of_text|>, <|eot_id|>; Qwen: <|endoftext|>, <|im_end|>) that
        # has been the one ranked first in the list, which is what we take.
        found = [v.token_to_id[t] for t in texts if t in v.token_to_id]
        if found:
            v.ids[role] = found[0]
            v.attrs[found[0]] |= CONTROL
    for i, t in enumerate(v.tokens):  # control tokens named "unused..." are unused
        if v.attrs[i] & CONTROL and "unused" in t:
            v.attrs[i] |= UNUSED
    eog = {v.ids[r] for r in ("fim_pad", "fim_rep", "fim_sep") if v.ids[r] is not None}
    for t in EOG_TEXTS:
        i = v.token_to_id.get(t)
        if i is not None:
            eog.add(i)
            v.attrs[i] |= CONTROL
    for t in ALWAYS_RENDERED:
        if t in v.token_to_id:
            v.attrs[v.token_to_id[t]] = USER_DEFINED
    eog |= {v.ids[r] for r in ("eos", "eot", "eom") if v.ids[r] is not None}
    texts = {v.tokens[i]: i for i in eog}
    # o200k_harmony / solar-open: "<|end|>" ends a message, not the generation
    has_call = "<|call|>" in texts or "<|calls|>" in texts
    if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
        eog.discard(texts["<|end|>"])
        v.attrs[texts["<|end|>"]] = USER_DEFINED
    # Gemma 4 / PLaMo: "</s>" is an ordinary token
    if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
        eog.discard(texts["</s>"])
        v.attrs[texts["</s>"]] = NORMAL
    v.eog = frozenset(eog)
