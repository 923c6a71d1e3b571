"""Special tokens, add_bos/add_eos and the chat template, as gguf-py's SpecialVocab finds them.

llama.cpp's converter reads these from the model folder in a fixed order, and the first
answer wins:

1. special token ids: `{typ}_token` of tokenizer_config.json, looked up by content among
   tokenizer.json's `added_tokens`; then `{typ}_token_id` of config.json for what is left
   (an id past the vocabulary is dropped for SentencePiece vocabularies).
2. add_bos/add_eos/add_sep: tokenizer.json's post-processor (ByteLevel: neither;
   TemplateProcessing: whatever its `single` template starts and ends with; Roberta:
   all), then `add_{typ}_token` of tokenizer_config.json.
3. chat template: tokenizer_config.json's `chat_template`, else chat_template.jinja (with
   additional_chat_templates/*.jinja as named templates), else chat_template.json; only
   when tokenizer_config.json exists.

This module reproduces that (gguf-py/gguf/vocab.py of llama.cpp as bundled with
llama-cpp-python 0.3.36) and returns typed GGUF key/values.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import gguf
from gguf import GGUFValueType as V

from ggforge.formats.errors import FormatError
from ggforge.formats.gguf_writer import KV
from ggforge.convert.tokenizer.files import read_json

log = logging.getLogger(__name__)
T = gguf.Keys.Tokenizer

DEFAULT_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# special token types gguf-py can write (it has no key for cls, nor for the old prefix/suffix/middle)
_ID_KEYS = {"bos": T.BOS_ID, "eos": T.EOS_ID, "unk": T.UNK_ID, "sep": T.SEP_ID, "pad": T.PAD_ID,
            "mask": T.MASK_ID, "eot": T.EOT_ID, "eom": T.EOM_ID}
_ADD_KEYS = {"bos": T.ADD_BOS, "eos": T.ADD_EOS, "sep": T.ADD_SEP}
# not in every gguf-py release
NORMALIZER_LOWERCASE = getattr(T, "NORMALIZER_LOWERCASE", "tokenizer.ggml.normalizer.lowercase")
NORMALIZER_STRIP_ACCENTS = getattr(T, "NORMALIZER_STRIP_ACCENTS", "tokenizer.ggml.normalizer.strip_accents")


@dataclass
class SpecialTokens:
    """What the converter found; `kvs()` turns it into GGUF metadata."""

    types: tuple[str, ...] = DEFAULT_TYPES
    n_vocab: int | None = None
    ids: dict[str, int] = field(default_factory=dict)
    add: dict[str, bool] = field(default_factory=dict)
    merges: list[str] = field(default_factory=list)
    chat_template: str | list[dict[str, str]] | None = None
    lowercase: bool | None = None
    strip_accents: bool | None = None

    def set_id(self, typ: str, tid: Any) -> None:
        """Record special token `typ`; the first id found wins, non-ints are ignored."""
        if isinstance(tid, bool) or not isinstance(tid, int):
            return
        if tid < 0:
            raise FormatError(f"special token {typ!r} has the negative id {tid}")
        if self.n_vocab is not None and tid >= self.n_vocab:
            log.warning("special token %s id %d is past the vocabulary (%d); skipped", typ, tid, self.n_vocab)
            return
        self.ids.setdefault(typ, tid)

    def kvs(self) -> list[KV]:
        out = []
        if self.merges:
            out.append(KV(T.MERGES, V.ARRAY, self.merges, V.STRING))
        out += [KV(_ID_KEYS[t], V.UINT32, i) for t, i in self.ids.items() if t in _ID_KEYS]
        out += [KV(_ADD_KEYS[t], V.BOOL, v) for t, v in self.add.items() if t in _ADD_KEYS]
        out += chat_template_kvs(self.chat_template)
        if self.lowercase is not None:
            out.append(KV(NORMALIZER_LOWERCASE, V.BOOL, bool(self.lowercase)))
        if self.strip_accents is not None:
            out.append(KV(NORMALIZER_STRIP_ACCENTS, V.BOOL, bool(self.strip_accents)))
        return out


def looks_special(token: str) -> bool:
    """Added tokens that some repos forget to mark special but llama.cpp's converter makes
    control tokens anyway (<|...|>, <｜...｜>, <unused...>, <pad>, <mask>, ...)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or token.startswith("<|") and token.endswith("|>")
            or token.startswith("<｜") and token.endswith("｜>")
            or token.startswith("<unused") and token.endswith(">"))


def chat_template_kvs(template: str | list[dict[str, str]] | None) -> list[KV]:
    """One template as `tokenizer.chat_template`; a list of named ones as
    `tokenizer.chat_template.{name}` plus `tokenizer.chat_templates` (names), with the one
    named "default" as `tokenizer.chat_template`."""
    if template is None:
        return []
    if isinstance(template, str):
        return [KV(T.CHAT_TEMPLATE, V.STRING, template)]
    out, names, default = [], [], None
    for choice in template:
        if not isinstance(choice, dict):
            continue
        name = re.sub(r"[^A-Za-z0-9]", "_", str(choice.get("name", "")))
        text = choice.get("template")
        if not name or not isinstance(text, str):
            continue
        if name == "default":
            default = text
        elif name not in names:
            names.append(name)
            out.append(KV(T.CHAT_TEMPLATE_N.format(name=name), V.STRING, text))
    if names:
        out.append(KV(T.CHAT_TEMPLATES, V.ARRAY, names, V.STRING))
    if default is not None:
        out.append(KV(T.CHAT_TEMPLATE, V.STRING, default))
    return out


def load_special_tokens(model_dir: Path, *, load_merges: bool = False, n_vocab: int | None = None,
                        types: Sequence[str] = DEFAULT_TYPES) -> SpecialTokens:
    """Read special tokens, merges (if asked), add_* flags and chat template from `model_dir`."""
    st = SpecialTokens(types=tuple(types), n_vocab=n_vocab)
    tokenizer = read_json(model_dir / "tokenizer.json")
    config = read_json(model_dir / "tokenizer_config.json")
    added: list[dict[str, Any]] = []
    if tokenizer is not None:
        if load_merges:
            st.merges = _merges(tokenizer.get("model") or {}, model_dir / "tokenizer.json")
        if isinstance(tokenizer.get("normalizer"), dict):
            _normalizer_flags(st, tokenizer["normalizer"])
        added = [t for t in tokenizer.get("added_tokens") or [] if isinstance(t, dict)]
        post = tokenizer.get("post_processor")
        if isinstance(post, dict):
            for proc in post.get("processors", [post]):
                if isinstance(proc, dict):
                    _post_processor(st, proc, config)
    if config:
        st.chat_template = _chat_template(model_dir, config)
        _config_tokens(st, config, added)
    _config_json_ids(st, model_dir)
    if load_merges and not st.merges:
        st.merges = _merges_txt(model_dir / "merges.txt")
    return st


def _merges(model: dict[str, Any], path: Path) -> list[str]:
    """tokenizer.json merges as "a b" strings; pairs (transformers >= 4.45) whose parts hold
    a space get it as U+0120, which is how byte-level vocabularies spell a space."""
    merges = model.get("merges")
    if not isinstance(merges, list) or not merges:
        return []
    if all(isinstance(m, str) for m in merges):
        return list(merges)
    if all(isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m) for m in merges):
        return [" ".join(p.replace(" ", "\u0120") for p in pair) for pair in merges]
    raise FormatError(f"{path}: model.merges is neither 'a b' strings nor [a, b] pairs")


def _merges_txt(path: Path) -> list[str]:
    if not path.is_file():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].strip().startswith("#"):
        lines = lines[1:]
    for line in lines:
        parts = line.strip().split(None, 3)
        if len(parts) == 2:
            out.append(f"{parts[0]} {parts[1]}")
        elif parts:
            log.warning("%s: malformed merge %r ignored", path, line)
    return out


def _normalizer_flags(st: SpecialTokens, norm: dict[str, Any]) -> None:
    kind = norm.get("type")
    if kind == "Lowercase":
        st.lowercase = True
    elif kind == "StripAccents":
        st.strip_accents = True
    elif kind == "BertNormalizer":
        st.lowercase = norm.get("lowercase", st.lowercase)
        st.strip_accents = norm.get("strip_accents", st.strip_accents)
    elif kind == "Sequence":
        for sub in norm.get("normalizers") or []:
            if isinstance(sub, dict):
                _normalizer_flags(st, sub)


def _special_id(item: Any) -> Any:
    return item.get("SpecialToken", {}).get("id") if isinstance(item, dict) else None


def _post_processor(st: SpecialTokens, proc: dict[str, Any], config: dict[str, Any] | None) -> None:
    """add_bos/add_eos/add_sep from one post-processor (gguf-py's crude reading, on purpose:
    the file must say what llama.cpp's converter would say)."""
    cfg = config if config else None  # gguf-py treats an empty tokenizer_config as none
    kind = proc.get("type")
    bos, eos = (cfg or {}).get("bos_token"), (cfg or {}).get("eos_token")
    cls, sep = (cfg or {}).get("cls_token"), (cfg or {}).get("sep_token")
    if not bos and cls and cfg:
        cfg["bos_token"] = bos = cls
    if not eos and sep and cfg:
        cfg["eos_token"] = eos = sep
    if kind == "ByteLevel":
        st.add.setdefault("bos", False)
        st.add.setdefault("eos", False)
    elif kind == "RobertaProcessing":
        st.add.update(bos=True, eos=True, sep=True)
        if not cls and cfg:
            cfg["cls_token"] = (proc.get("cls") or [bos])[0]
        if not sep and cfg:
            cfg["sep_token"] = (proc.get("sep") or [eos])[0]
    elif kind == "TemplateProcessing":
        _template_processing(st, proc, cfg, bos, eos, cls, sep)


def _template_processing(st: SpecialTokens, proc: dict[str, Any], cfg: dict[str, Any] | None,
                         bos: Any, eos: Any, cls: Any, sep: Any) -> None:
    single, pair = proc.get("single") or [], proc.get("pair") or []
    first = last = None
    if len(single) > 1:
        first = _special_id(single[0])
        if first:
            if not cfg:
                bos = first
            elif first not in (bos, cls):
                if not bos:
                    cfg["bos_token"] = bos = first
                if not cls:
                    cfg["cls_token"] = cls = first
            st.add["bos"] = first in (bos, cls)
        last = _special_id(single[-1])
        if last:
            if not cfg:
                eos = last
            elif last != eos:
                # a template that ends on another token: the old eos becomes eot (or eom)
                if "eot" not in st.types:
                    st.types += ("eot",)
                    cfg["eot_token"] = eos
                elif "eom" not in st.types:
                    st.types += ("eom",)
                    cfg["eom_token"] = eos
                cfg["eos_token"] = eos = last
            st.add["eos"] = last == eos
    if not pair:
        return
    start = 1 if first and _special_id(pair[0]) == first else 0
    stop = -1 if last and _special_id(pair[-1]) == last else None
    pair = pair[start:stop]
    if not pair:
        return
    seq_a = pair[0].get("Sequence", {}).get("id") if isinstance(pair[0], dict) else None
    seq_b = pair[-1].get("Sequence", {}).get("id") if isinstance(pair[-1], dict) else None
    middle = pair[1:-1]
    if seq_a != "A" or seq_b != "B" or not middle:
        return
    add_sep = False
    entry = _special_id(middle[0])
    if entry and entry in (sep, eos) and not last:
        add_sep = True
    if len(middle) == 2:
        entry = _special_id(middle[1])
        if entry and entry in (sep, eos):
            add_sep = True
    st.add["sep"] = add_sep
    if add_sep and not sep and cfg:
        cfg["sep_token"] = eos


def _chat_template(model_dir: Path, config: dict[str, Any]) -> str | list[dict[str, str]] | None:
    alt: Any = None
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        alt = jinja.read_text(encoding="utf-8")
        extra = sorted((model_dir / "additional_chat_templates").glob("*.jinja"))
        if extra:
            alt = [{"name": "default", "template": alt}]
            alt += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
    elif (model_dir / "chat_template.json").is_file():
        alt = (read_json(model_dir / "chat_template.json") or {}).get("chat_template")
    template = config.get("chat_template", alt)
    if template is None or isinstance(template, (str, list)):
        return template
    log.warning("%s: chat_template is neither a string nor a list; ignored", model_dir / "tokenizer_config.json")
    return None


def _config_tokens(st: SpecialTokens, config: dict[str, Any], added: list[dict[str, Any]]) -> None:
    """add_{typ}_token flags and `{typ}_token` contents of tokenizer_config.json; a content
    names an id only through tokenizer.json's added_tokens."""
    for typ in st.types:
        flag = config.get(f"add_{typ}_token")
        if isinstance(flag, bool):
            if typ not in st.add:
                st.add[typ] = flag
            elif st.add[typ] != flag:
                log.warning("tokenizer_config add_%s_token=%s differs from the post-processor's %s; "
                            "keeping the post-processor's", typ, flag, st.add[typ])
        entry = config.get(f"{typ}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if not isinstance(content, str):
            continue
        st.set_id(typ, next((t.get("id") for t in added if t.get("content") == content), None))


def _config_json_ids(st: SpecialTokens, model_dir: Path) -> None:
    config = read_json(model_dir / "config.json")
    if config is None:
        return
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for typ in st.types:
        tid = config.get(f"{typ}_token_id")
        if tid is None:
            tid = text.get(f"{typ}_token_id")
        st.set_id(typ, tid)
