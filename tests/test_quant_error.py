"""convert/quant_error.py: each quantized tensor's relative RMS error, collected while the
file is written, against a float64 computation from the written file decoded by libggml
and the F32 conversion of the same float32 checkpoint (the source values, in GGUF order)."""
from __future__ import annotations

import numpy as np
import pytest

from ggforge.convert.pipeline import convert
from ggforge.convert.quant_error import TensorErrors
from ggforge.formats.gguf_reader import GGUFFile
from ggml_oracle import ggml_or_skip


def _reference(src_f32, out, imatrix=None) -> dict[str, float]:
    """float64 sqrt(sum w (x - q)^2 / sum w x^2) per quantized tensor, q by libggml."""
    ggml = ggml_or_skip()
    want = {}
    with GGUFFile.open(src_f32) as a, GGUFFile.open(out) as b:
        for name, t in b.tensors.items():
            if t.type_name in ("F32", "F16", "BF16"):
                continue
            x = np.asarray(a.array(name), np.float64).reshape(-1, t.shape[-1])
            q = ggml.dequantize(t.type_name, np.asarray(b.array(name)), x.shape).astype(np.float64)
            w = np.ones(x.shape[1]) if imatrix is None else imatrix[name].astype(np.float64)
            want[name] = float(np.sqrt(((x - q) ** 2 * w).sum() / ((x * x) * w).sum()))
    return want


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q8_0", "IQ4_XS"])
def test_errors_equal_a_float64_reference(mix, tiny_model, tmp_path):
    folder = tiny_model("llama3")
    f32 = convert(folder, "f32", tmp_path / "f32.gguf").output
    errors = TensorErrors()
    out = convert(folder, mix, tmp_path / "q.gguf", errors=errors).output
    want = _reference(f32, out)
    got = {e.name: e.rel_rms for e in errors.rows()}
    assert set(got) == set(want) and len(got) > 0
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-6), name
    worst = [e.rel_rms for e in errors.rows()]
    assert worst == sorted(worst, reverse=True)


def test_importance_weighted_with_an_imatrix(tiny_model, tmp_path):
    from ggforge.convert.mixes import MixOptions

    folder = tiny_model("llama3")
    f32 = convert(folder, "f32", tmp_path / "f32.gguf").output
    rng = np.random.default_rng(3)
    with GGUFFile.open(f32) as g:
        imatrix = {n: rng.uniform(0.01, 3.0, t.shape[-1]).astype(np.float32)
                   for n, t in g.tensors.items() if len(t.shape) == 2}
    errors = TensorErrors()
    out = convert(folder, "q4_k_m", tmp_path / "q.gguf", imatrix=imatrix,
                  options=MixOptions(has_imatrix=True), errors=errors).output
    want = _reference(f32, out, imatrix)
    rows = errors.rows()
    assert all(e.weighted for e in rows)
    for e in rows:
        assert e.rel_rms == pytest.approx(want[e.name], rel=1e-6), e.name
