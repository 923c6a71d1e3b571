"""Random-weight Llama checkpoints of any shape, for benchmarks of big models.

    write_random_checkpoint(folder, SHAPES["1.1b"], tokenizer_from="models/pystdlib-6m")

writes ``config.json``, a BF16 ``model.safetensors`` of random weights (std 0.02) and the
tokenizer files of ``tokenizer_from`` (a Hugging Face folder; the vocabulary is padded to
the shape's ``vocab_size`` by the converter, as for any checkpoint whose embedding has
more rows than its tokenizer). The weights are streamed to disk a pool at a time: a 6 GB
checkpoint needs a few MiB of memory. The values are deterministic.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

# the shapes the benchmarks use: TinyLlama-1.1B's and Llama-2-7B's widths (8 kv heads)
SHAPES = {
    "1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model")


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The Hugging Face Llama tensors of config ``c``, in file order."""
    h, f = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


def write_random_checkpoint(folder: str | Path, shape: dict, tokenizer_from: str | Path) -> Path:
    """A LlamaForCausalLM checkpoint of ``shape`` (SHAPES or the same keys) in ``folder``;
    returns the path of its model.safetensors."""
    folder, src = Path(folder), Path(tokenizer_from)
    folder.mkdir(parents=True, exist_ok=True)
    found = [n for n in _TOKENIZER_FILES if (src / n).is_file()]
    if not found:
        raise FileNotFoundError(f"{src}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    for n in found:
        shutil.copyfile(src / n, folder / n)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
           "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", **shape}
    (folder / "config.json").write_text(json.dumps(cfg))
    shapes = tensor_shapes(cfg)
    header, offset = {}, 0
    for name, dims in shapes:
        n = int(np.prod(dims)) * 2
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    rng = np.random.default_rng(0)
    # a pool of 4M BF16 values, rolled differently for each stretch of each tensor
    pool = ((rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for k, (_, dims) in enumerate(shapes):
            n = int(np.prod(dims))
            for start in range(0, n, pool.size):
                m = min(pool.size, n - start)
                f.write(np.roll(pool, k * 7919 + start)[:m].tobytes())
    return path
