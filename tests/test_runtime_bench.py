"""runtime.bench: ggforge and llama.cpp timed in turns on the same file."""
from __future__ import annotations

from pathlib import Path


from require import require

from ggforge.convert.pipeline import convert
from ggforge.runtime import bench


def test_engines_take_turns_and_llama_figures_are_kept(tiny_model, tmp_path, monkeypatch):
    require("llama_cpp")
    path = convert(tiny_model("llama2"), "Q8_0", tmp_path / "m.gguf").output
    runs: list[str] = []

    def recording(make, name):
        def timers(*args):
            pp, tg = make(*args)
            return (lambda: runs.append(name + " pp") or pp(),
                    lambda: runs.append(name + " tg") or tg())
        return timers

    monkeypatch.setattr(bench, "_ggforge_timers", recording(bench._ggforge_timers, "ours"))
    monkeypatch.setattr(bench, "_llama_timers", recording(bench._llama_timers, "llama"))
    ours = bench.bench_ggforge(Path(path), 8, 4, 2, 1)
    turn = ["ours pp", "ours tg", "llama pp", "llama tg"]
    assert runs == turn * 3          # a warm-up, then the repeats, in turns
    assert ours.engine == "ggforge" and ours.pp_tps > 0 and ours.tg_tps > 0
    theirs = bench.bench_llama_cpp(Path(path), 8, 4, 2, 1)
    assert theirs.engine == "llama.cpp" and theirs.tg_tps > 0 and len(runs) == 12  # kept, not re-run
    again = bench.bench_llama_cpp(Path(path), 8, 4, 2, 1)          # nothing kept: measured now
    assert again.engine == "llama.cpp" and len(runs) == 12 + 6
