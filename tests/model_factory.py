"""Tiny random models of every supported architecture, in Hugging Face layout.

Each model folder holds config.json, model.safetensors (or shards) and a tokenizer trained
in-process (tests/tokenizer_factory.py). Nothing is downloaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenizer_factory import make_tokenizer

# name -> (HF config class name, tokenizer kind, config overrides)
COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


@dataclass(frozen=True)
class TinyModel:
    name: str
    config_class: str
    tokenizer: str
    overrides: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, TinyModel] = {m.name: m for m in [
    TinyModel("llama2", "LlamaConfig", "llama2-spm",
              dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    TinyModel("llama3", "LlamaConfig", "llama3-bpe",
              dict(tie_word_embeddings=True, rope_parameters={
                  "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    TinyModel("smollm", "LlamaConfig", "smollm-bpe",
              dict(tie_word_embeddings=True, num_key_value_heads=4,
                   rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    TinyModel("mistral", "MistralConfig", "llama2-spm",
              dict(tie_word_embeddings=False, sliding_window=None, head_dim=64)),
    TinyModel("qwen2", "Qwen2Config", "qwen2-bpe",
              dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    TinyModel("qwen3", "Qwen3Config", "qwen2-bpe",
              dict(tie_word_embeddings=True, num_attention_heads=8, head_dim=64,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # rows of 96 and 200 columns: K-quants fall back (to 32-block types, then to F16)
    TinyModel("llama-odd", "LlamaConfig", "llama2-spm",
              dict(hidden_size=96, intermediate_size=200, num_attention_heads=3, num_key_value_heads=1,
                   tie_word_embeddings=False)),
    TinyModel("gemma3", "Gemma3TextConfig", "gemma3-spm",
              dict(num_hidden_layers=6, head_dim=64, query_pre_attn_scalar=64, sliding_window=4,
                   rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh")),
    # Gemma 2: soft-caps small enough to bite on random weights (real models: 50 and 30)
    TinyModel("gemma2", "Gemma2Config", "gemma3-spm",
              dict(num_hidden_layers=4, head_dim=64, query_pre_attn_scalar=64, sliding_window=4,
                   rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                   attn_logit_softcapping=1.5, final_logit_softcapping=4.0)),
    # Phi-3: fused qkv and gate_up projections, neox rope on Q and K
    TinyModel("phi3", "Phi3Config", "phi3-spm",
              dict(tie_word_embeddings=False, sliding_window=None, original_max_position_embeddings=512,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Phi-3 128k's longrope: long factors past the original context (llama.cpp: by the context
    # size; transformers: by the sequence length, so not compared with transformers)
    TinyModel("phi3-long", "Phi3Config", "phi3-spm",
              dict(tie_word_embeddings=False, sliding_window=None, max_position_embeddings=1024,
                   original_max_position_embeddings=128,
                   rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                    "long_factor": [1.0 + 0.1 * i for i in range(32)],
                                    "short_factor": [1.0 + 0.01 * i for i in range(32)]})),
    # Gemma-3-270M's layer shapes (rows of 640: K-quants fall back to Q5_0/Q8_0), six layers:
    # tens of MiB of weights, for memory measurements
    TinyModel("gemma3-wide", "Gemma3TextConfig", "gemma3-spm",
              dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=64,
                   rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh")),
]}

ARCHITECTURES = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
                 "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM",
                 "Gemma3TextConfig": "Gemma3ForCausalLM", "Gemma2Config": "Gemma2ForCausalLM",
                 "Phi3Config": "Phi3ForCausalLM"}


def _randomize(model: Any, seed: int) -> None:
    """Random weights with a spread that makes every tensor matter (norms included)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                base = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                p.copy_(base + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[-1]))


def build_model(name: str, folder: Path, *, dtype: str = "float32", seed: int = 0,
                max_shard_size: str | None = None) -> Path:
    """Write a tiny random model `name` (see MODELS) into `folder`; returns the folder."""
    import torch
    import transformers

    spec = MODELS[name]
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(spec.tokenizer, folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    cfg_cls = getattr(transformers, spec.config_class)
    kwargs = {**COMMON, **spec.overrides, "vocab_size": len(tok),
              "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id}
    config = cfg_cls(**kwargs)
    config.architectures = [ARCHITECTURES[spec.config_class]]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _randomize(model, seed)
    model = model.to(getattr(torch, dtype))
    save = dict(safe_serialization=True)
    if max_shard_size:
        save["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **save)
    return folder


def hf_logits(folder: Path, token_ids: list[int]) -> np.ndarray:
    """Transformers' float32 logits (n_tokens, n_vocab) for one sequence, on the CPU."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([token_ids]))
    return out.logits[0].float().numpy()


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())
