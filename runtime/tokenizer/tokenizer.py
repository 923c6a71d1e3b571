"""The runtime's tokenizer: llama.cpp's token ids and text, from GGUF metadata alone.

    tok = Tokenizer.from_metadata(gguf_file.metadata)
    ids = tok.encode("Hello world")            # = llama_tokenize(text, add_special, parse_special)
    tok.decode(ids)                            # = llama_detokenize(ids, remove_special, unparse_special)
"""
from __future__ import annotations

from typing import Any, Iterable

from ggforge.formats.errors import FormatError, UnsupportedModelError
from ggforge.runtime.tokenizer import detokenize
from ggforge.runtime.tokenizer.bpe import BpeModel, parse_merges
from ggforge.runtime.tokenizer.pretokenize import PRETOKENIZERS
from ggforge.runtime.tokenizer.special import partition, set_strip_attributes, special_tokens
from ggforge.runtime.tokenizer.spm import SPACE, SpmModel
from ggforge.runtime.tokenizer.vocab import K, Vocab, apply_text_rules, read_vocab

VOCAB_TYPES = {"llama": "SentencePiece-style", "gpt2": "byte-level BPE"}


class Tokenizer:
    """Text <-> token ids exactly as llama.cpp does it for the same GGUF metadata."""

    def __init__(self, vocab: Vocab, model: SpmModel | BpeModel, *, pre: str | None, add_bos: bool,
                 add_eos: bool, add_space_prefix: bool, clean_spaces: bool, specials: list[int]):
        self.vocab = vocab
        self.model = model
        self.pre = pre
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.clean_spaces = clean_spaces
        self._specials = [(i, vocab.tokens[i].encode("utf-8"), vocab.attrs[i]) for i in specials]
        self._pieces: dict[int, bytes] = {}

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> Tokenizer:
        """Build from a GGUF file's metadata (GGUFFile.metadata). Raises UnsupportedModelError
        for a vocabulary type or pre-tokenizer we do not implement, FormatError for a broken one."""
        kind = md.get(K + "model")
        if kind is None:
            raise FormatError(f"{K}model is missing: the file carries no tokenizer")
        if kind not in VOCAB_TYPES:
            raise UnsupportedModelError(
                f"{K}model {kind!r} is not supported; supported vocabularies: "
                + ", ".join(f"{k} ({v})" for k, v in VOCAB_TYPES.items()))
        vocab = read_vocab(md, kind)
        apply_text_rules(vocab)
        specials = special_tokens(vocab)
        set_strip_attributes(vocab, md, specials)
        add_prefix = md.get(K + "add_space_prefix")
        if kind == "llama":
            model: SpmModel | BpeModel = SpmModel(vocab.token_to_id, vocab.scores)
            pre_name, add_bos, space, clean = None, True, True, False
        else:
            pre_name = md.get(K + "pre") or "default"  # llama.cpp's fallback, with a warning
            pre = PRETOKENIZERS.get(pre_name)
            if pre is None:
                raise UnsupportedModelError(
                    f"{K}pre {pre_name!r} (the BPE pre-tokenizer) is not supported; supported: "
                    + ", ".join(PRETOKENIZERS))
            merges = md.get(K + "merges")
            if not isinstance(merges, list):
                raise FormatError(f"{K}merges is missing or not an array of strings; a gpt2 vocabulary needs it")
            model = BpeModel(vocab.token_to_id, parse_merges(merges), pre)
            add_bos, space, clean = pre.add_bos, False, pre.clean_spaces
        return cls(vocab, model, pre=pre_name,
                   add_bos=bool(md.get(K + "add_bos_token", add_bos)),
                   add_eos=bool(md.get(K + "add_eos_token", False)),
                   add_space_prefix=bool(space if add_prefix is None else add_prefix),
                   clean_spaces=clean, specials=specials)

    # -- the vocabulary ---------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.vocab.n

    @property
    def bos_id(self) -> int | None:
        return self.vocab.ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self.vocab.ids["eos"]

    @property
    def eot_id(self) -> int | None:
        return self.vocab.ids["eot"]

    @property
    def eog_ids(self) -> frozenset[int]:
        """Every token that ends generation (eos, eot, eom, <|im_end|>, <end_of_turn>, ...)."""
        return self.vocab.eog

    def special_id(self, role: str) -> int | None:
        """Id of a role: bos eos eot eom unk sep pad mask fim_pre fim_suf fim_mid fim_pad fim_rep fim_sep."""
        return self.vocab.ids[role]

    def is_eog(self, token: int) -> bool:
        return token in self.vocab.eog

    def token_text(self, token: int) -> str:
        """The token's text as stored in the vocabulary ("▁Hello", "Ġworld", "<0x0A>")."""
        return self.vocab.tokens[self._check(token)]

    # -- text -> ids ----------------------------------------------------------------------------------
    def encode(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama_tokenize: BOS/EOS as the vocabulary asks when add_special; special-token texts
        become their ids when parse_special (user-defined tokens always do). Bytes are taken
        as given, invalid UTF-8 included."""
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        frags = partition(raw, self._specials, parse_special)
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self._required("bos"))
        spm = isinstance(self.model, SpmModel)
        prev_special = True  # SentencePiece: a space goes in front of the text and after a special
        for frag in frags:
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            piece = raw[frag[0]:frag[1]]
            if spm:
                if self.add_space_prefix and prev_special:
                    piece = b" " + piece
                piece = piece.replace(b" ", SPACE)
            out.extend(self.model.encode(piece))
            prev_special = False
        if add_special and self.add_eos:
            out.append(self._required("eos"))
        return out

    # -- ids -> text ----------------------------------------------------------------------------------
    def token_to_piece(self, token: int, *, special: bool = True) -> bytes:
        """llama_token_to_piece (lstrip=0): the bytes one token adds to the text, maybe part of
        a UTF-8 sequence. Control and unknown tokens give b"" unless `special`."""
        attr = self.vocab.attrs[self._check(token)]
        if not special and attr & detokenize.SPECIAL:
            return b""
        p = self._pieces.get(token)
        if p is None:
            p = self._pieces[token] = detokenize.piece(self.vocab.tokens[token], attr, self.vocab.model == "gpt2")
        return p

    def decode_bytes(self, ids: Iterable[int], *, remove_special: bool = False, unparse_special: bool = True) -> bytes:
        """llama_detokenize as bytes (see decode)."""
        ids = list(ids)
        strip_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self.bos_id:
            strip_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts = []
        for token in ids:
            p = self.token_to_piece(token, special=unparse_special)
            if strip_space and p[:1] == b" ":  # the space SentencePiece put in front of the text
                p = p[1:]
            strip_space = False
            parts.append(p)
        text = b"".join(parts)
        return detokenize.clean_spaces(text) if self.clean_spaces else text

    def decode(self, ids: Iterable[int], *, remove_special: bool = False, unparse_special: bool = True) -> str:
        """llama_detokenize: remove_special drops a leading BOS / trailing EOS the vocabulary
        adds itself; unparse_special renders control tokens as their text. Invalid UTF-8 (an
        incomplete byte sequence) decodes to U+FFFD."""
        return self.decode_bytes(ids, remove_special=remove_special,
                                 unparse_special=unparse_special).decode("utf-8", "replace")

    # -- helpers ------------------------------------------------------------------------------------------
    def _check(self, token: int) -> int:
        if not 0 <= token < self.vocab.n:
            raise ValueError(f"token id {token} is outside the vocabulary (n_vocab = {self.vocab.n})")
        return token

    def _required(self, role: str) -> int:
        tid = self.vocab.ids[role]
        if tid is None:
            raise FormatError(f"{K}add_{role}_token asks for a {role.upper()} token but the vocabulary has "
                              f"none ({K}{role}_token_id); llama.cpp aborts here")
        return tid

    def __repr__(self) -> str:
        kind = self.vocab.model + (f"/{self.pre}" if self.pre else "")
        return f"Tokenizer({kind}, n_vocab={self.n_vocab}, bos={self.bos_id}, eos={self.eos_id})"
