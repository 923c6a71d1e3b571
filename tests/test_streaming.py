"""Streaming: converting a ~2.2 GB BF16 checkpoint keeps peak RSS under 1 GB.

Slow (a minute or two, 2.2 GB of disk): run with `pytest --run-slow tests/test_streaming.py -s`.
"""
from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenizer_factory import make_tokenizer

# TinyLlama-1.1B's shape: 1.1 B parameters, 2.2 GB in BF16
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4)


def _tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


def write_bf16_checkpoint(folder: Path, config: dict) -> Path:
    """Stream random BF16 weights into model.safetensors without holding the model in memory."""
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer("llama2-spm", folder)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
           "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", **config}
    (folder / "config.json").write_text(json.dumps(cfg))
    shapes = _tensor_shapes(cfg)
    header, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).view(np.uint32) >> 16
    pool = pool.astype(np.uint16)
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for k, (_, shape) in enumerate(shapes):
            n = int(np.prod(shape))
            for start in range(0, n, pool.size):
                m = min(pool.size, n - start)
                f.write(np.roll(pool, k * 7919 + start)[:m].tobytes())
    return path


@pytest.mark.slow
def test_peak_rss_under_1gb_for_2gb_bf16(tmp_path):
    src = write_bf16_checkpoint(tmp_path / "TinyShape", SHAPE)
    assert src.stat().st_size > 2 * 10**9
    out = tmp_path / "out.gguf"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run([sys.executable, "-m", "ggforge.tools", "quantize", str(src), "q8_0",
                        "-o", str(out), "--no-progress"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib >= before
    print(f"\npeak RSS {peak_kib / 1024:.0f} MiB converting {src.stat().st_size / 1e9:.2f} GB BF16 -> Q8_0")
    assert peak_kib < 1024 * 1024
