"""Issue 4's memory target, measured (runtime/memory_report.py): after load, a prefill and
some decode steps, resident memory grows over a code-only baseline by one copy of the
weights plus the KV cache: at most 1.2 x the file size + the KV cache."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ggforge.convert.pipeline import convert
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.runtime.memory_report import TARGET, write_twin
from ggforge.runtime.model import Model

MiB = 2**20
SLACK = 4 * MiB   # allocator and interpreter noise, whatever the model's size


@pytest.fixture(scope="module")
def wide_gguf(tiny_model, tmp_path_factory):
    """~22 MiB of Q4_K_M/Q5_0 weights (Gemma-3-270M's layer shapes): weights dominate."""
    out = tmp_path_factory.mktemp("gemma3-wide") / "m.gguf"
    return convert(tiny_model("gemma3-wide"), "Q4_K_M", out).output


def test_resident_memory_is_one_copy_of_the_weights_plus_the_kv_cache(wide_gguf):
    # a fresh process: this one holds torch, transformers and other tests' models
    out = subprocess.run([sys.executable, "-m", "ggforge.runtime.memory_report", str(wide_gguf),
                          "-p", "128", "-n", "16", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    size, kv, base = rep["file_bytes"], rep["kv_bytes"], rep["stages"]["baseline"]["rss"]
    assert size > 16 * MiB and kv < size / 8
    grown = rep["growth"] - kv
    # one copy of the weights: the packed copy replaces the mapped pages, not doubles them
    assert grown <= TARGET * size + SLACK, rep
    # and the weights are seen (a baseline holding model data would hide them)
    assert grown >= 0.8 * size, rep
    # never more on the way (packing copies a few MiB at a time, dropping what it copied)
    if rep["peak"]:
        assert rep["peak"] - base - kv <= TARGET * size + SLACK, rep
    # load maps the file: nothing is copied before the first product
    assert rep["stages"]["load"]["rss"] - base <= 0.2 * size + SLACK, rep


def test_twin_has_the_same_tensor_types_and_runs(wide_gguf, tmp_path):
    twin = write_twin(wide_gguf, tmp_path / "twin.gguf")
    with GGUFFile.open(wide_gguf) as g, GGUFFile.open(twin) as t:
        def kinds(f):
            return {(n.split(".", 2)[-1] if n.startswith("blk.") else n, f.tensors[n].ggml_type)
                    for n in f.tensors}
        assert kinds(t) == kinds(g)
        assert 2 <= t.metadata["gemma3.block_count"] < g.metadata["gemma3.block_count"]
        assert t.tensors["token_embd.weight"].shape[0] == 256
        assert not any(k.startswith("tokenizer.") for k in t.metadata)
    assert twin.stat().st_size < wide_gguf.stat().st_size / 2
    m = Model(twin)
    try:
        logits = m.forward(np.arange(5), m.new_cache(8))
        assert logits.shape == (1, 256) and np.all(logits == 0)   # zero weights
    finally:
        m.close()


def test_memory_command_rejects_a_bad_file_in_one_line(tmp_path):
    """`ggforge memory` on a file that is not a GGUF: one error line naming it, exit 1, no
    traceback from the child process that warms the kernels."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    proc = subprocess.run([sys.executable, "-m", "ggforge.tools", "memory", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
