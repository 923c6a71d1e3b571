"""The command line: outputs, refusals, clean-up after errors and interrupts, inspect."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from require import require
from click.testing import CliRunner

from ggforge.formats import atomic
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.tools.cli import cli


def _run(args, **kw):
    return CliRunner().invoke(cli, args, catch_exceptions=False, **kw)


def _one_line_error(result, *needles):
    assert result.exit_code != 0
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture()
def model(tiny_model, tmp_path):
    """A private copy of a tiny llama model folder (tests write into it)."""
    return Path(shutil.copytree(tiny_model("smollm"), tmp_path / "SmolTiny"))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


def test_default_output_name_and_summary(model):
    r = _run(["quantize", str(model / "model.safetensors"), "Q8_0", "--no-progress"])
    assert r.exit_code == 0, r.output
    out = model / "SmolTiny-Q8_0.gguf"
    assert out.is_file() and "bits/weight" in r.output and str(out) in r.output
    with GGUFFile.open(out) as g:
        assert g.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_type_is_case_insensitive_and_folder_source(model):
    r = _run(["quantize", str(model), "q4_1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (model / "SmolTiny-Q4_1.gguf").is_file()


def test_quantize_executable_and_group_alias(model, tmp_path):
    exe = Path(sys.executable).parent / "quantize"
    if not exe.exists():
        pytest.skip("console scripts not installed")
    p = subprocess.run([str(exe), str(model), "f16", "-o", str(tmp_path / "x.gguf"), "--no-progress"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "x.gguf").is_file()


def test_existing_output_refused_then_forced(model, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    r = _run(["quantize", str(model), "q8_0", "-o", str(out), "--no-progress"])
    _one_line_error(r, str(out), "--force")
    assert out.read_bytes() == b"precious"
    r = _run(["quantize", str(model), "q8_0", "-o", str(out), "--force", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:4] == b"GGUF"


def test_output_that_is_the_input_is_refused(model):
    src = model / "model.safetensors"
    before = src.read_bytes()
    for args in (["-o", str(src)], ["-o", str(src), "--force"]):
        r = _run(["quantize", str(src), "q8_0", "--no-progress", *args])
        _one_line_error(r, "input")
    assert src.read_bytes() == before


def test_unknown_type_and_unsupported_architecture(model):
    _one_line_error(_run(["quantize", str(model), "q9_9"]), "q9_9", "Q8_0")
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(cfg))
    _one_line_error(_run(["quantize", str(model), "q8_0"]), "GPT2LMHeadModel", "LlamaForCausalLM")


def test_nan_weight_names_the_tensor_and_leaves_nothing(model):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    r = _run(["quantize", str(model), "q8_0", "--no-progress"])
    _one_line_error(r, "model.layers.1.mlp.up_proj.weight")
    assert not (model / "SmolTiny-Q8_0.gguf").exists() and _leftovers(model) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_interrupt_or_write_error_midway_cleans_up(model, tmp_path, monkeypatch, exc):
    from ggforge.convert import pipeline

    out = tmp_path / "keep.gguf"
    out.write_bytes(b"old model")
    real, calls = pipeline.quantize, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "quantize", flaky)
    r = CliRunner().invoke(cli, ["quantize", str(model), "q8_0", "-o", str(out), "--force", "--no-progress"])
    assert r.exit_code != 0
    assert out.read_bytes() == b"old model" and _leftovers(tmp_path) == []
    if isinstance(exc, OSError):
        _one_line_error(r, "No space left")


def test_not_enough_disk_space_is_checked_first(model, tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    out.mkdir()
    r = _run(["quantize", str(model), "f32", "-o", str(out / "o.gguf"), "--no-progress"])
    _one_line_error(r, "free disk space", "MiB")
    assert list(out.iterdir()) == []


def test_missing_output_folder(model, tmp_path):
    r = _run(["quantize", str(model), "q8_0", "-o", str(tmp_path / "nope" / "o.gguf")])
    _one_line_error(r, "does not exist")


def test_meta_overrides(model, tmp_path):
    out = tmp_path / "m.gguf"
    r = _run(["quantize", str(model), "q8_0", "-o", str(out), "--no-progress",
              "--meta", "general.name=My Model", "--meta", "general.author=me",
              "--meta", "custom.count=int:-3", "--meta", "custom.flag=true"])
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(out)  # gguf-py as the oracle for types and values
    f = reader.fields
    assert f["general.name"].contents() == "My Model" and f["general.author"].contents() == "me"
    assert f["custom.count"].types == [gguf.GGUFValueType.INT32] and f["custom.count"].contents() == -3
    assert f["custom.flag"].contents() is True


def test_inspect_gguf_matches_gguf_py(model, tmp_path):
    out = tmp_path / "m.gguf"
    assert _run(["quantize", str(model), "q4_0", "-o", str(out), "--no-progress"]).exit_code == 0
    r = _run(["inspect", str(out), "--json"])
    assert r.exit_code == 0
    s = json.loads(r.output)
    ref = gguf.GGUFReader(out)
    assert [t["name"] for t in s["tensors"]] == [t.name for t in ref.tensors]
    for t, rt in zip(s["tensors"], ref.tensors):
        assert t["type"] == rt.tensor_type.name and t["bytes"] == int(rt.n_bytes)
        assert t["shape"] == [int(d) for d in reversed(rt.shape)]
    assert s["params"] == sum(int(t.n_elements) for t in ref.tensors)
    assert s["metadata"]["tokenizer.ggml.tokens"]["array_length"] == len(ref.fields["tokenizer.ggml.tokens"].data)
    text = _run(["inspect", str(out)]).output
    assert "totals by type" in text and "Q4_0" in text and "bits per weight" in text


def test_inspect_reads_llama_cpp_files(model, tmp_path):
    llama_cpp = require("llama_cpp")
    f32 = tmp_path / "f32.gguf"
    assert _run(["quantize", str(model), "f32", "-o", str(f32), "--no-progress"]).exit_code == 0
    theirs = tmp_path / "theirs-q8.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf.LlamaFileType.MOSTLY_Q8_0
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
    s = json.loads(_run(["inspect", str(theirs), "--json"]).output)
    ref = gguf.GGUFReader(theirs)
    assert [t["name"] for t in s["tensors"]] == [t.name for t in ref.tensors]
    assert s["totals_by_type"]["Q8_0"]["tensors"] > 0


def test_inspect_safetensors_and_bad_files(model, tmp_path):
    s = json.loads(_run(["inspect", str(model / "model.safetensors"), "--json"]).output)
    assert s["format"] == "safetensors" and s["params"] > 0
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x07\x00\x00\x00" + b"\0" * 16)
    _one_line_error(_run(["inspect", str(bad)]), str(bad))
    _one_line_error(_run(["inspect", str(tmp_path / "missing.gguf")]), "missing.gguf")


def test_inspect_escapes_control_characters(tmp_path):
    """A hostile file's strings (ANSI escapes, bells) are shown escaped, not sent to the terminal."""
    path = tmp_path / "evil.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "x\x1b[2J\x07y")
    w.add_tensor("t\x1b[31m", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = _run(["inspect", str(path)])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output
    assert "x\\x1b[2J\\x07y" in r.output and "t\\x1b[31m" in r.output


# -- what users type and nothing else checked: bench, bench-quantize, memory, q4 -------------------
@pytest.fixture(scope="module")
def q8_file(tiny_model, tmp_path_factory):
    from ggforge.convert.pipeline import convert

    return convert(tiny_model("llama2"), "Q8_0", tmp_path_factory.mktemp("q8") / "m.gguf").output


def _table(output: str) -> dict[str, list[str]]:
    """Rows of a tools/table.py table by their first cell."""
    rows = [ln.split("  ") for ln in output.splitlines()]
    return {cells[0].strip(): [c.strip() for c in cells[1:] if c.strip()] for cells in rows if cells and cells[0].strip()}


def test_quantize_q4_default_name_is_llama_cpp_s_q4_k_m(model):
    """`quantize FOLDER q4`: <folder>-Q4_K_M.gguf beside the model, llama.cpp's Q4_K_M type."""
    r = _run(["quantize", str(model), "q4", "--no-progress"])
    assert r.exit_code == 0, r.output
    out = model / "SmolTiny-Q4_K_M.gguf"
    assert out.is_file()
    llama_cpp = require("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=32, verbose=False)
    try:
        assert llm.metadata["general.file_type"] == str(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    finally:
        llm.close()


def test_bench_prints_both_engines_and_their_ratio(q8_file):
    require("llama_cpp")
    r = _run(["bench", str(q8_file), "-p", "8", "-n", "4", "-r", "1", "-t", "1"])
    assert r.exit_code == 0, r.output
    rows = _table(r.output)
    ours, theirs, ratio = ([float(v.replace(",", "")) for v in rows[k]] for k in ("ggforge", "llama.cpp", "ratio"))
    assert all(v > 0 for v in ours + theirs)
    assert ratio == pytest.approx([ours[0] / theirs[0], ours[1] / theirs[1]], abs=0.01, rel=0.02)


def test_bench_quantize_prints_a_row_per_type(tiny_model, tmp_path):
    require("llama_cpp")
    r = _run(["bench-quantize", str(tiny_model("llama2")), "--types", "q8_0,q4_k_m", "--repeat", "1",
              "--workdir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = _table(r.output)
    for t in ("Q8_0", "Q4_K_M"):
        params, *figures = (float(v.replace(",", "")) for v in rows[t])
        assert params > 0 and all(v > 0 for v in figures)   # seconds, rates and their ratio
    assert list(tmp_path.iterdir()) == []


def test_memory_json_on_a_good_file(q8_file):
    r = _run(["memory", str(q8_file), "-p", "8", "-n", "4", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["growth"] > 0 and rep["ratio"] > 0


def test_dry_run_prints_the_plan_and_writes_nothing(model, tmp_path):
    """quantize --dry-run: each tensor's type and size as the conversion writes them."""
    before = sorted(p.name for p in model.iterdir())
    r = _run(["quantize", str(model), "q4", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in model.iterdir()) == before
    planned = {}
    for line in r.output.splitlines():
        cells = line.split()
        if len(cells) >= 4 and cells[0].startswith(("blk.", "token_embd", "output")):
            planned[cells[0]] = cells[2]
    out = _run(["quantize", str(model), "q4", "-o", str(tmp_path / "q4.gguf"), "--no-progress"])
    assert out.exit_code == 0, out.output
    with GGUFFile.open(tmp_path / "q4.gguf") as g:
        assert planned == {n: t.type_name for n, t in g.tensors.items()}
