"""The runtime's tokenizer: llama.cpp's token ids and text, built from GGUF metadata alone.

    from ggforge.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_metadata(GGUFFile.open(path).metadata)
    ids = tok.encode("Hello")                  # llama_tokenize(text, add_special, parse_special)
    text = tok.decode(ids)                     # llama_detokenize(ids, remove_special, unparse_special)

Vocabularies: "llama" (SentencePiece-style: Llama 2, TinyLlama, Mistral, Gemma) and "gpt2"
(byte-level BPE) with the pre-tokenizers in PRETOKENIZERS (llama-bpe, qwen2, smollm, gpt-2,
default and their llama.cpp aliases).

| module        | does                                                              |
|---------------|-------------------------------------------------------------------|
| tokenizer     | the Tokenizer: metadata -> settings, encode / decode              |
| vocab         | tokens, attributes, special ids, end-of-generation set            |
| special       | cutting special tokens out of text, strip attributes              |
| spm, bpe      | the two merge algorithms                                           |
| pretokenize   | BPE pre-tokenizers (llama.cpp's regex splitters)                   |
| unicode       | code point classes as llama.cpp's tables have them, UTF-8, GPT-2 bytes |
| detokenize    | token pieces and the clean-up of spaces                            |
"""
from ggforge.runtime.tokenizer.pretokenize import PRETOKENIZERS
from ggforge.runtime.tokenizer.tokenizer import VOCAB_TYPES, Tokenizer

__all__ = ["Tokenizer", "PRETOKENIZERS", "VOCAB_TYPES"]
