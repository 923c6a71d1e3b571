"""Streaming: converting a ~2.2 GB BF16 checkpoint keeps peak RSS under 1 GB.

Slow (a minute or two, 2.2 GB of disk): run with `pytest --run-slow tests/test_streaming.py -s`.
"""
from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from ggforge.convert.synthetic import SHAPES, write_random_checkpoint

# TinyLlama-1.1B's shape: 1.1 B parameters, 2.2 GB in BF16
SHAPE = SHAPES["1.1b"]
EMBEDDED = Path(__file__).resolve().parent.parent / "models" / "pystdlib-6m"


def write_bf16_checkpoint(folder: Path, config: dict) -> Path:
    """Random BF16 weights streamed into model.safetensors (the model is never in memory)."""
    return write_random_checkpoint(folder, config, EMBEDDED)


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


def test_random_checkpoint_is_what_transformers_and_llama_cpp_load(tmp_path):
    """The generator behind the big-model benchmarks: transformers reads its config and
    weights, and llama.cpp runs our conversion of it (the 4096-entry tokenizer padded to
    the shape's 5000 rows)."""
    import numpy as np

    from llama_oracle import logits
    from model_factory import hf_logits

    shape = dict(vocab_size=5000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    write_random_checkpoint(tmp_path / "src", shape, EMBEDDED)
    out = tmp_path / "f32.gguf"
    p = subprocess.run([sys.executable, "-m", "ggforge.tools", "quantize", str(tmp_path / "src"), "f32",
                        "-o", str(out), "--no-progress"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    ids = [4085, 12, 300, 4000]
    want = hf_logits(tmp_path / "src", ids)
    got = logits(out, ids)
    assert want.shape == (4, 5000)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
