"""The runtime tokenizer against llama.cpp on the same GGUF file.

For every tokenizer kind of tests/tokenizer_factory.py: export it with the converter, write
a vocab-only GGUF, read it back, build ggforge.runtime.tokenizer.Tokenizer from its metadata
and compare with llama.cpp (llama-cpp-python, vocab_only=True, through its C API so that
add_special / parse_special / remove_special / unparse_special are passed as they are):
token ids, detokenized bytes, every token's piece, special ids and end-of-generation tokens.
"""
from __future__ import annotations

import ctypes
import dataclasses
import random
import time
from pathlib import Path

import gguf
import pytest

from require import require
from gguf import GGUFValueType as V

from ggforge.convert.tokenizer import export_tokenizer
from ggforge.formats.errors import FormatError, UnsupportedModelError
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.gguf_writer import KV, GGUFWriter
from ggforge.runtime.tokenizer import Tokenizer
from tokenizer_factory import CORPUS_LINES, make_tokenizer

llama_cpp = require("llama_cpp")

T = gguf.Keys.Tokenizer
KINDS = {"llama2-spm": "llama", "gemma3-spm": "gemma3", "llama3-bpe": "llama", "qwen2-bpe": "qwen2",
         "smollm-bpe": "llama"}

TEXTS = {
    "empty": "", "space": " ", "two-spaces": "  ", "newline": "\n", "plain": "Hello world",
    "lead-space": " Hello world", "trail-space": "Hello world ", "lead-two": "  leading two",
    "newlines": "a\n\nb\n\n\nc\n", "crlf": "a\r\n\r\n b \r x\n\n\n  y", "tabs": "tabs\tand\t\ttabs",
    "mixed-ws": "mixed \t\n \n  spaces   \n\n\t", "space-run": "x" * 30 + " " * 20 + "y",
    "accents": "Café naïve résumé façade jalapeño Straße Ærøskøbing", "nfd": "e\u0301 decomposed",
    "cjk": "日本語のテキスト 我想在北京工作 한국어 문장", "emoji": "emoji 🚀🦙 😶\u200d🌫️ 👍🏽 🇫🇷 ✅",
    "rtl": "العربية من اليمين עברית משמאל", "cyrillic-greek": "нещо на Български Ελληνικά",
    "digits": "1 12 123 1234 12345 1234567890 3.14159 2025-11-30", "long-number": "12345678901234567890",
    "other-numbers": "½ ² Ⅻ ٣٤٥ ௰", "symbols": "Ω≈ç√∫˜µ≤≥÷ ⁰⁴⁵ ₀₁₂ \u200b zero\u00a0nbsp\u3000ideo",
    "code": "def f(x):\n    if x:\n        return x * 2\n    return None\n",
    "json": '{"key": [1, 2, 3], "other": null}',
    "contractions": "I've been 'told he's there, 'RE you sure? We'Ve a'lL don 't",
    "punct-spaces": "Wait , what ? Yes ! ok . a ' b ' c 's 'm 're 've",
    "chatml": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "llama3-chat": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "gemma-turns": "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "spm-tags": "<s>hello</s> world <s><s>", "unk-tag": "<unk> unk",
    "qwen-tools": '<tool_call>{"a": 1}</tool_call> <think>x</think> <|fim_prefix|>p',
    "endoftext": "text<|endoftext|>after", "byte-lookalikes": "<0x41> <0xFF> \x00\x01\x7f \ufffd \uffff",
    # classes llama.cpp's Unicode 15.1 tables know and Python 3.11's Unicode 14 does not (and 16/17)
    # (a letter or digit before 's splits off the contraction; an undefined character does not)
    "unicode-15": "x\U0002EBF0's \U00031350'S 1\U00011F50't \U0001E4F0're \U0001FAE8!",
    "unicode-16": "a\U00033000's \U0001FAE9?",
}
PARSE_MODES = [(True, True), (True, False), (False, True), (False, False)]  # (add_special, parse_special)


# -- llama.cpp as the oracle -----------------------------------------------------------------
class Oracle:
    """llama.cpp's vocabulary functions over one GGUF file."""

    def __init__(self, path: Path):
        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab = self.llm._model.vocab

    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> list[int]:
        n = len(text) + 16
        while True:
            buf = (llama_cpp.llama_token * n)()
            k = llama_cpp.llama_tokenize(self.vocab, text, len(text), buf, n, add_special, parse_special)
            if k >= 0:
                return list(buf[:k])
            n = -k

    def detokenize(self, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
        arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
        size = 64 + 64 * len(ids)
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), buf, size, remove_special, unparse_special)
        assert 0 <= n <= size
        return buf.raw[:n]

    def piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]


def write_gguf(path: Path, arch: str, kvs: list[KV], name: str | None = None) -> Path:
    with open(path, "wb") as f:
        w = GGUFWriter(f)
        w.add_string(gguf.Keys.General.ARCHITECTURE, arch)
        if name is not None:
            w.add_string(gguf.Keys.General.NAME, name)
        w.add_all(kvs)
        w.write_header()
        w.finish()
    return path


class Pair:
    """Our tokenizer and llama.cpp's over the same file."""

    def __init__(self, path: Path):
        with GGUFFile.open(path) as g:
            self.tok = Tokenizer.from_metadata(g.metadata)
        self.ref = Oracle(path)

    def check_encode(self, text: str | bytes) -> None:
        raw = text.encode() if isinstance(text, str) else text
        for add, parse in PARSE_MODES:
            want = self.ref.tokenize(raw, add, parse)
            assert self.tok.encode(text, add_special=add, parse_special=parse) == want, (add, parse)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runtime-tokenizer")


@pytest.fixture(scope="module")
def exported(root):
    """exported(kind) -> (the converter's KV list, path of its vocab-only GGUF)."""
    cache: dict[str, tuple[list[KV], Path]] = {}

    def get(kind: str):
        if kind not in cache:
            make_tokenizer(kind, root / kind)
            kvs = export_tokenizer(root / kind, KINDS[kind])
            cache[kind] = kvs, write_gguf(root / f"{kind}.gguf", KINDS[kind], kvs)
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def pair(exported):
    cache: dict[str, Pair] = {}

    def get(kind: str) -> Pair:
        if kind not in cache:
            cache[kind] = Pair(exported(kind)[1])
        return cache[kind]

    yield get
    for p in cache.values():
        p.ref.llm.close()


# -- token ids ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEXTS)
@pytest.mark.parametrize("kind", KINDS)
def test_encode_matches_llama_cpp(pair, kind, name):
    pair(kind).check_encode(TEXTS[name])


@pytest.mark.parametrize("kind", KINDS)
def test_encode_random_strings(pair, kind):
    """~200 strings of corpus characters, whitespace runs and special-token texts."""
    rng = random.Random(kind)
    chars = sorted(set("".join(CORPUS_LINES)) | set(" \t\n\r\u00a0'sSdDtTmM0123456789½"))
    specials = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>",
                "<end_of_turn>", "<|begin_of_text|>", "<|eot_id|>", "<think>", "' ", " '"]
    p = pair(kind)
    for _ in range(200):
        parts = []
        for _ in range(rng.randint(0, 10)):
            r = rng.random()
            if r < 0.1:
                parts.append(rng.choice(specials))
            elif r < 0.25:
                parts.append(rng.choice(" \n\t") * rng.randint(1, 5))
            elif r < 0.4:
                line = rng.choice(CORPUS_LINES)
                parts.append(line[rng.randint(0, 20):rng.randint(20, 60)])
            else:
                parts.append("".join(rng.choice(chars) for _ in range(rng.randint(1, 8))))
        text = "".join(parts)
        want = p.ref.tokenize(text.encode(), True, True)
        assert p.tok.encode(text) == want, text
        assert p.tok.decode_bytes(want) == p.ref.detokenize(want, False, True), text


@pytest.mark.parametrize("kind", KINDS)
def test_encode_invalid_utf8_bytes(pair, kind):
    """Bytes are taken as given: invalid sequences tokenize as llama.cpp's do."""
    p = pair(kind)
    for raw in (b"\xff", b"a\x80b", b"\xe6\x97", b"\xe6ab\xc3", b"\xed\xa0\x80x", b"\xf0\x9f\x98", b"\xc0\x80 z",
                "Café 日本".encode()[:-1] + b" \xf8ok"):
        p.check_encode(raw)


# -- ids -> text -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEXTS)
@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches_llama_cpp(pair, kind, name):
    p = pair(kind)
    ids = p.ref.tokenize(TEXTS[name].encode(), True, True)
    for remove_special in (False, True):
        for unparse_special in (True, False):
            want = p.ref.detokenize(ids, remove_special, unparse_special)
            kw = dict(remove_special=remove_special, unparse_special=unparse_special)
            assert p.tok.decode_bytes(ids, **kw) == want, kw
            assert p.tok.decode(ids, **kw) == want.decode("utf-8", "replace")


@pytest.mark.parametrize("kind", KINDS)
def test_token_to_piece_every_id(pair, kind):
    p = pair(kind)
    for i in range(p.tok.n_vocab):
        for special in (True, False):
            assert p.tok.token_to_piece(i, special=special) == p.ref.piece(i, special), (i, special)


def test_decode_partial_utf8(pair):
    """A byte-fallback emoji cut in half: the piece is a fragment, decode() replaces it."""
    p = pair("llama2-spm")
    ids = p.ref.tokenize("🐍".encode(), False, False)  # not in the corpus: "▁" and four byte tokens
    assert len(ids) == 5 and b"".join(p.tok.token_to_piece(i) for i in ids) == " 🐍".encode()
    half = ids[:3]
    assert p.tok.decode_bytes(half) == p.ref.detokenize(half, False, True)
    assert "\ufffd" in p.tok.decode(half)


# -- the vocabulary -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_special_ids_and_end_of_generation(pair, kind):
    p, v = pair(kind), pair(kind).ref.vocab
    tok = p.tok

    def ours(i):
        return -1 if i is None else i

    assert tok.n_vocab == llama_cpp.llama_vocab_n_tokens(v)
    assert ours(tok.bos_id) == llama_cpp.llama_vocab_bos(v) and ours(tok.eos_id) == llama_cpp.llama_vocab_eos(v)
    assert ours(tok.eot_id) == llama_cpp.llama_vocab_eot(v)
    assert tok.add_bos == llama_cpp.llama_vocab_get_add_bos(v) and tok.add_eos == llama_cpp.llama_vocab_get_add_eos(v)
    assert [i for i in range(tok.n_vocab) if tok.is_eog(i)] == \
        [i for i in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(v, i)]


# -- other pre-tokenizers on the Llama 3 vocabulary ----------------------------------------------------
@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2", "default", None, "smollm", "qwen2", "starcoder"])
def test_other_pretokenizers(exported, root, pre):
    """The same merges under every supported pre-tokenizer name (None: the key is absent,
    which llama.cpp reads as "default"). An extra token " zzzz" that no merge builds is
    taken whole only where llama.cpp ignores merges for words in the vocabulary (llama-bpe)."""
    kvs = [kv for kv in exported("llama3-bpe")[0] if kv.key != T.PRE]
    if pre is not None:
        kvs.append(KV(T.PRE, V.STRING, pre))
    kvs = [dataclasses.replace(kv, value=list(kv.value) + [{T.LIST: "Ġzzzz", T.TOKEN_TYPE: 1}[kv.key]])
           if kv.key in (T.LIST, T.TOKEN_TYPE) else kv for kv in kvs]
    p = Pair(write_gguf(root / f"llama3-as-{pre}.gguf", "llama", kvs))
    try:
        zzzz = p.tok.n_vocab - 1
        assert (zzzz in p.tok.encode("a zzzz")) == (pre == "llama-bpe")
        for text in [*TEXTS.values(), "a zzzz zzzz,zzzz"]:
            p.check_encode(text)
            ids = p.ref.tokenize(text.encode(), True, True)
            assert p.tok.decode_bytes(ids) == p.ref.detokenize(ids, False, True)
    finally:
        p.ref.llm.close()


# -- strip attributes (set by llama.cpp from general.name) ---------------------------------------------
@pytest.mark.parametrize("name", ["phi-3 mini", "modern-bert base", "my model"])
def test_strip_attributes(exported, root, name):
    """Phi-3: special tokens swallow the whitespace after them; modern-bert: [MASK] the
    whitespace before it. Extra control/user-defined tokens are appended to the vocabulary."""
    kvs = {kv.key: kv for kv in exported("llama2-spm")[0]}
    extra = [("<|endoftext|>", 3), ("<|user|>", 4), ("[MASK]", 3)]
    for key, values in ((T.LIST, [t for t, _ in extra]), (T.TOKEN_TYPE, [ty for _, ty in extra]),
                        (T.SCORES, [0.0] * len(extra))):
        kvs[key] = dataclasses.replace(kvs[key], value=list(kvs[key].value) + values)
    p = Pair(write_gguf(root / "strip.gguf", "llama", list(kvs.values()), name=name))
    try:
        for text in ("<|user|>  hi </s>  x\n<s> \n y", "a  [MASK]  b\t[MASK]", "<|endoftext|>  z <unk>  w"):
            p.check_encode(text)
    finally:
        p.ref.llm.close()


# -- refusals ------------------------------------------------------------------------------------------------
def _metadata(exported, kind: str) -> dict:
    with GGUFFile.open(exported(kind)[1]) as g:
        return dict(g.metadata)


def test_unsupported_vocab_type(exported):
    md = _metadata(exported, "llama3-bpe")
    with pytest.raises(UnsupportedModelError, match=r"'bert'.*supported.*llama.*gpt2"):
        Tokenizer.from_metadata({**md, T.MODEL: "bert"})


def test_unsupported_pretokenizer(exported):
    md = _metadata(exported, "llama3-bpe")
    with pytest.raises(UnsupportedModelError, match=r"'falcon'.*supported: .*llama-bpe.*qwen2.*smollm.*gpt-2"):
        Tokenizer.from_metadata({**md, T.PRE: "falcon"})


def test_broken_metadata(exported):
    md = _metadata(exported, "llama3-bpe")
    with pytest.raises(FormatError, match="merges"):
        Tokenizer.from_metadata({k: v for k, v in md.items() if k != T.MERGES})
    with pytest.raises(FormatError, match=r"tokenizer\.ggml\.model"):
        Tokenizer.from_metadata({k: v for k, v in md.items() if k != T.MODEL})
    tokens = list(md[T.LIST])
    tokens[5] = tokens[4]
    with pytest.raises(FormatError, match="appears at ids 4 and 5"):
        Tokenizer.from_metadata({**md, T.LIST: tokens})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer.from_metadata(md).decode([len(tokens)])


# -- speed --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama2-spm", "llama3-bpe"])
def test_encode_10kb_is_fast(exported, kind):
    """A fresh tokenizer (cold caches) encodes 10 kB of mixed text in well under 0.5 s of
    this thread's CPU time (not wall time: the machine is shared)."""
    rng = random.Random(0)
    lines = CORPUS_LINES * 4
    rng.shuffle(lines)
    text = "\n".join(lines).encode()[:10_000].decode("utf-8", "ignore")
    with GGUFFile.open(exported(kind)[1]) as g:
        tok = Tokenizer.from_metadata(g.metadata)
    start = time.thread_time()
    ids = tok.encode(text)
    elapsed = time.thread_time() - start
    assert ids and elapsed < 0.5, elapsed
