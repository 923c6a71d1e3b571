"""convert.stages and the pipeline's fast path: reading chunks of rows in a prefetch thread,
quantizing, writing in a writer thread gives the bytes of the plain path (whole tensors
through ConversionPlan.read and registry.quantize); errors of any stage surface once, in
order, and leave no thread and no partial file behind."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from ggforge.convert import pipeline, stages
from ggforge.formats.errors import FormatError, QuantizationError


def _convert_plain(folder, ftype, out):
    """The conversion without row sources: every tensor read whole by plan.read."""
    real = pipeline.plan_conversion

    def plain(*a, **k):
        plan = real(*a, **k)
        plan.row_source = None
        return plan

    pipeline.plan_conversion = plain
    try:
        return pipeline.convert(folder, ftype, out)
    finally:
        pipeline.plan_conversion = real


@pytest.mark.parametrize("arch, dtype", [("llama2", "bfloat16"), ("llama2", "float32"),
                                         ("qwen2", "float16"), ("gemma3", "bfloat16")])
@pytest.mark.parametrize("ftype", ["q8_0", "q4_k_m", "f16", "bf16", "f32"])
def test_fast_path_gives_the_plain_bytes(tiny_model, tmp_path, monkeypatch, arch, dtype, ftype):
    folder = tiny_model(arch, dtype)
    plain = _convert_plain(folder, ftype, tmp_path / "plain.gguf").output
    monkeypatch.setattr(stages, "CHUNK_ELEMENTS", 256 * 24)  # several chunks per tensor
    fast = pipeline.convert(folder, ftype, tmp_path / "fast.gguf").output
    assert fast.read_bytes() == plain.read_bytes()


def _with_nan(tiny_model, tmp_path, name, index):
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = shutil.copytree(tiny_model("llama2"), tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors[name][index] = np.nan
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_nan_in_a_permuted_tensor_names_its_source_index(tiny_model, tmp_path, monkeypatch):
    name = "model.layers.1.self_attn.q_proj.weight"
    folder = _with_nan(tiny_model, tmp_path, name, (3, 5))
    monkeypatch.setattr(stages, "CHUNK_ELEMENTS", 256 * 16)
    threads = threading.active_count()
    with pytest.raises(QuantizationError) as err:
        pipeline.convert(folder, "q4_0", tmp_path / "o.gguf")
    assert name in str(err.value) and "(3, 5)" in str(err.value)
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "o.gguf.partial").exists()
    assert threading.active_count() == threads


def test_writer_error_stops_everything(tiny_model, tmp_path, monkeypatch):
    real, calls = pipeline.GGUFWriter.write_tensor_chunks, []

    def failing(self, name, chunks):
        calls.append(name)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real(self, name, chunks)

    monkeypatch.setattr(pipeline.GGUFWriter, "write_tensor_chunks", failing)
    threads = threading.active_count()
    with pytest.raises((OSError, FormatError), match="No space left"):
        pipeline.convert(tiny_model("llama2"), "q8_0", tmp_path / "o.gguf")
    assert list(tmp_path.iterdir()) == [] and threading.active_count() == threads


def test_interrupt_in_the_main_thread_stops_the_others(tiny_model, tmp_path):
    seen = []

    def progress(t, n):
        seen.append(t.name)
        if len(seen) == 3:
            raise KeyboardInterrupt

    threads = threading.active_count()
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(tiny_model("llama2"), "q4_k_m", tmp_path / "o.gguf", progress=progress)
    assert list(tmp_path.iterdir()) == [] and threading.active_count() == threads


def test_progress_counts_every_element_in_file_order(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "CHUNK_ELEMENTS", 256 * 8)
    counts: dict[str, int] = {}
    order: list[str] = []

    def progress(t, n):
        if t.name not in counts:
            order.append(t.name)
        counts[t.name] = counts.get(t.name, 0) + n

    result = pipeline.convert(tiny_model("llama3"), "q6_k", tmp_path / "o.gguf", progress=progress)
    from ggforge.formats.gguf_reader import GGUFFile

    with GGUFFile.open(result.output) as g:
        assert order == list(g.tensors)
        assert counts == {name: int(np.prod(info.shape)) for name, info in g.tensors.items()}
