"""Tiny real tokenizers, trained in-process and saved in Hugging Face layout.

    make_tokenizer("llama3-bpe", folder)   # tokenizer.json, tokenizer_config.json, special_tokens_map.json

Each kind mimics the files of one model family as its Hugging Face repos ship them:

| kind        | like                     | files                                   | model                           |
|-------------|--------------------------|-----------------------------------------|---------------------------------|
| llama2-spm  | Llama 2, TinyLlama, Mistral v0.1 | tokenizer.model + tokenizer.json | SentencePiece BPE, byte fallback, `▁` prefix |
| phi3-spm    | Phi-3 (mini, medium)     | tokenizer.model + tokenizer.json        | llama2-spm, its chat tokens added past the pieces |
| gemma3-spm  | Gemma 3, Gemma 2         | tokenizer.model + tokenizer.json        | SentencePiece BPE, no prefix, <pad>=0 <eos>=1 <bos>=2 <unk>=3 |
| llama3-bpe  | Llama 3.x                | tokenizer.json                          | byte-level BPE, Llama 3 split regex, ignore_merges |
| qwen2-bpe   | Qwen 2.5 / Qwen 3        | tokenizer.json                          | byte-level BPE, Qwen regex, NFC |
| smollm-bpe  | SmolLM / SmolLM2         | tokenizer.json                          | byte-level BPE, GPT-2 regex, single digits |

The vocabularies are small (about 700 entries) and trained on CORPUS, which covers the
hard cases of the tests (accents, CJK, emoji, RTL scripts, whitespace runs, code, numbers).
SentencePiece kinds also get a tokenizer.json built from the trained model, since
transformers cannot convert tokenizer.model without protobuf.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable

CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog. I've been told he's there, we'll see.",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "Hello world! How are you doing today? I'm fine, thanks; and you?",
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "for i in range(10):\n\tprint(i)  # tabs\tand  double  spaces\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 123 1234 12345 3.14159 2025-11-30 1,000,000",
    "Café, naïve, résumé, façade, jalapeño, Ærøskøbing, Straße, Ünïcödé.",
    "日本語のテキストです。我想在北京工作。한국어 문장입니다.",
    "Emoji: 🚀 🦙🦙 😀 👍🏽 ✅ 😶‍🌫️ 🇫🇷",
    "Русский текст и немного български. Ελληνικά γράμματα.",
    "العربية من اليمين إلى اليسار. עברית משמאל לימין.",
    "   leading spaces and trailing spaces   \n\n\n  \t \n",
    "'''''' ``````` \"\"\"\" ...... !!!!!! ?????? ------======= <html><body>x</body></html>",
    "json = {\"key\": [1, 2, 3], \"other\": null}\nif (x != y) { return x->y; }",
]
CORPUS = CORPUS_LINES * 20

_KINDS: dict[str, Callable[[Path], None]] = {}


def make_tokenizer(kind: str, folder: Path) -> None:
    """Train tokenizer `kind` (see KINDS) and save it in Hugging Face layout into `folder`."""
    if kind not in _KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {', '.join(KINDS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _KINDS[kind](folder)


def _kind(name: str):
    def register(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        _KINDS[name] = fn
        return fn
    return register


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _added(content: str, special: bool = True) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def _write_config(folder: Path, tok: Any, config: dict[str, Any], special_map: dict[str, Any]) -> None:
    """tokenizer_config.json (with added_tokens_decoder, as transformers saves it) and
    special_tokens_map.json."""
    added = {str(i): _added(t.content, t.special) for i, t in sorted(tok.get_added_tokens_decoder().items())}
    _write_json(folder / "tokenizer_config.json", {"added_tokens_decoder": added, **config})
    _write_json(folder / "special_tokens_map.json",
                {k: (_added(v) if isinstance(v, str) else v) for k, v in special_map.items()})


# -- SentencePiece ---------------------------------------------------------------------------

def _train_spm(vocab_size: int, **options: Any) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", hard_vocab_limit=False,
        max_sentence_length=1 << 14, num_threads=1, minloglevel=2, **options)
    return buf.getvalue()


def _spm_vocab_merges(model: bytes, user_defined: list[str]) -> tuple[dict[str, int], list[tuple[str, str]], list[str]]:
    """vocab, merges and control/user-defined pieces of a SentencePiece BPE model.

    A merge (a, b) is ranked by the score of the piece a+b: SentencePiece BPE merges the
    adjacent pair whose union has the highest score, which is Hugging Face BPE with ranks
    in that order (how transformers converts these models, too)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    n = sp.GetPieceSize()
    vocab = {sp.IdToPiece(i): i for i in range(n)}
    specials = [p for i, p in enumerate(vocab) if sp.IsControl(i) or sp.IsUnknown(i)] + user_defined
    mergeable = {p for i, p in enumerate(vocab) if not (sp.IsControl(i) or sp.IsUnknown(i)
                                                         or sp.IsByte(i) or p in specials)}
    merges = []
    for piece in mergeable:
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                merges.append((sp.GetScore(vocab[piece]), vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return vocab, [(m[3], m[4]) for m in merges], specials


def _spm_tokenizer_json(model: bytes, unk: str, bos: str, prefix: bool, user_defined: list[str]):
    """The tokenizer.json a Llama-2 or Gemma-3 repo ships, for this SentencePiece model."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges, specials = _spm_vocab_merges(model, user_defined)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    if prefix:  # Llama 2: "▁" in front of the text, spaces become "▁"
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:  # Gemma: no dummy prefix
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return tok


LLAMA2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")

GEMMA3_TURNS = ["<start_of_turn>", "<end_of_turn>"]
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@_kind("llama2-spm")
def _llama2_spm(folder: Path) -> None:
    model = _train_spm(700, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True)
    (folder / "tokenizer.model").write_bytes(model)
    tok = _spm_tokenizer_json(model, "<unk>", "<s>", prefix=True, user_defined=[])
    tok.save(str(folder / "tokenizer.json"))
    _write_config(folder, tok, {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "chat_template": LLAMA2_TEMPLATE,
        "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 2048,
        "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False,
    }, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


PHI3_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]
PHI3_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + '\n' + message['content'] "
                 "+ '<|end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@_kind("phi3-spm")
def _phi3_spm(folder: Path) -> None:
    """Phi-3's layout: the SentencePiece model knows only its pieces; the chat tokens (ids
    past them) are in tokenizer.json's added_tokens, as Phi-3-mini ships them."""
    from tokenizers import AddedToken

    model = _train_spm(700, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True)
    (folder / "tokenizer.model").write_bytes(model)
    tok = _spm_tokenizer_json(model, "<unk>", "<s>", prefix=True, user_defined=[])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PHI3_TOKENS])
    tok.save(str(folder / "tokenizer.json"))
    _write_config(folder, tok, {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
        "unk_token": "<unk>", "pad_token": "<|endoftext|>", "chat_template": PHI3_TEMPLATE,
        "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 4096,
        "padding_side": "left", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False,
    }, {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>"})


@_kind("gemma3-spm")
def _gemma3_spm(folder: Path) -> None:
    model = _train_spm(700, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                       bos_piece="<bos>", unk_piece="<unk>", control_symbols=["<mask>"],
                       user_defined_symbols=GEMMA3_TURNS, add_dummy_prefix=False)
    (folder / "tokenizer.model").write_bytes(model)
    tok = _spm_tokenizer_json(model, "<unk>", "<bos>", prefix=False, user_defined=GEMMA3_TURNS)
    tok.save(str(folder / "tokenizer.json"))
    _write_config(folder, tok, {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>", "chat_template": GEMMA3_TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_max_length": 32768, "padding_side": "left",
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer",
        "use_default_system_prompt": False,
    }, {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})


# -- byte-level BPE -----------------------------------------------------------------------------

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _train_bpe(pre_tokenizer: Any, vocab_size: int, leading_specials: list[str], *,
               normalizer: Any = None, ignore_merges: bool = False):
    """A byte-level BPE trained on CORPUS: every byte is in the alphabet, then merges."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=leading_specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if ignore_merges:  # Llama 3: a pre-token that is in the vocabulary is taken whole
        spec = json.loads(tok.to_str())
        spec["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
    return tok


def _byte_level_split(regex: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@_kind("llama3-bpe")
def _llama3_bpe(folder: Path) -> None:
    from tokenizers import AddedToken, processors

    tok = _train_bpe(_byte_level_split(LLAMA3_REGEX), 700, [], ignore_merges=True)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA3_SPECIALS])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    tok.save(str(folder / "tokenizer.json"))
    _write_config(folder, tok, {
        "bos_token": bos, "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
        "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast",
    }, {"bos_token": bos, "eos_token": "<|eot_id|>"})


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# (content, special) in Qwen 2.5 / Qwen 3 order; some are added tokens that are not special
QWEN2_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
               ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<tool_call>", False),
               ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
               ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<think>", False), ("</think>", False)]


@_kind("qwen2-bpe")
def _qwen2_bpe(folder: Path) -> None:
    from tokenizers import AddedToken, normalizers, processors

    tok = _train_bpe(_byte_level_split(QWEN2_REGEX), 700, [], normalizer=normalizers.NFC())
    tok.add_tokens([AddedToken(s, special=sp, normalized=False) for s, sp in QWEN2_ADDED])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.save(str(folder / "tokenizer.json"))
    specials = [s for s, sp in QWEN2_ADDED if sp and s != "<|endoftext|>"]
    _write_config(folder, tok, {
        "add_bos_token": False, "add_prefix_space": False, "additional_special_tokens": specials,
        "bos_token": None, "chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }, {"additional_special_tokens": specials, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


SMOLLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                   "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                   "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
                   "<jupyter_script>", "<empty_output>"]


@_kind("smollm-bpe")
def _smollm_bpe(folder: Path) -> None:
    from tokenizers import pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok = _train_bpe(pre, 700, SMOLLM_SPECIALS)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.save(str(folder / "tokenizer.json"))
    _write_config(folder, tok, {
        "add_prefix_space": False, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>", "chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "model_max_length": 2048, "pad_token": "<|im_end|>",
        "tokenizer_class": "GPT2Tokenizer", "unk_token": "<|endoftext|>", "vocab_size": 49152,
    }, {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"})


KINDS = tuple(_KINDS)
