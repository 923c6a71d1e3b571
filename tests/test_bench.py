"""convert.bench: ggforge's and llama.cpp's quantization timed in turns on the same model."""
from __future__ import annotations

import pytest

from require import require

from ggforge.convert import bench
from ggforge.convert.bench import bench_quantize


def test_bench_quantize_times_both_tools_in_turns(tiny_model, tmp_path, monkeypatch):
    require("llama_cpp")
    runs: list[str] = []
    real = bench._timed

    def timed(fn, output):
        runs.append(output.name.split("-")[0])

        def run():
            assert not output.exists()  # every run starts without its output
            fn()
            assert output.exists()
        return real(run, output)

    monkeypatch.setattr(bench, "_timed", timed)
    seen = []
    results = bench_quantize(tiny_model("llama2"), ["q8_0", "q4_k_m"], threads=2, repeat=2,
                             workdir=tmp_path, on_result=seen.append)
    assert [r.file_type for r in results] == ["Q8_0", "Q4_K_M"] and seen == results
    assert runs == ["ggforge", "llama", "ggforge", "llama"] * 2
    for r in results:
        assert r.n_params > 0 and r.ggforge_s > 0 and r.llama_cpp_s > 0
        assert r.ratio == pytest.approx(r.llama_cpp_s / r.ggforge_s)
        assert r.ggforge_rate == pytest.approx(r.n_params / r.ggforge_s)
    assert list(tmp_path.iterdir()) == []  # its temporary folder is gone
