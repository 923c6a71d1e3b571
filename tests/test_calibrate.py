"""One-step calibration (convert/calibrate.py): the importance matrix of a source's own weights.

Oracles: llama.cpp's llama-imatrix output for models/pystdlib-6m (tests/data/imatrix, see
the README there: made from the F32 file), `ggforge imatrix` itself (the same code path:
exact equality, the files byte for byte), llama.cpp's llama_model_quantize given the
same matrix (byte-identical tensors), and the Hugging Face tokenizer for token counts.
"""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggforge.convert.calibrate import DEFAULT_CTX, DEFAULT_DATASET, DEFAULT_TEXT, calibrate
from ggforge.convert.mixes import MixOptions
from ggforge.convert.pipeline import convert
from ggforge.formats.errors import FormatError
from ggforge.formats.imatrix import load_imatrix
from ggforge.formats.imatrix_writer import gguf_writer, read_imatrix_stats
from ggforge.tools.imatrix_cli import imatrix_cmd
from test_imatrix import DATA, MODEL, SUM_RTOL, TEXT, THEIRS

# Largest relative difference of a sum to llama-imatrix's (made from the F32 file) when
# the matrix is computed on the BF16 file, whose products round their activations to BF16
# as ggml's do: measured 4.6e-3 (median 1.3e-4) on the project's machine.
BF16_SUM_RTOL = 2e-2


def _hf_token_count(text: str) -> int:
    """pystdlib-6m's own tokenizer (the `tokenizers` library), BOS included."""
    from require import require

    tokenizers = require("tokenizers")
    return len(tokenizers.Tokenizer.from_file(str(MODEL / "tokenizer.json")).encode(text).ids)


@pytest.fixture(scope="module")
def in_data(tmp_path_factory):
    """Run from tests/data/imatrix, so that `calibration.txt` is the dataset name
    llama-imatrix recorded; yields a scratch folder (the calibration's workdir)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(DATA)
        yield tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def cal_f32(in_data):
    # as the committed llama-imatrix file was made: -fa off -ctk f32 -ctv f32
    return calibrate(MODEL, TEXT, n_ctx=64, workdir=in_data, precision="F32", cache_types=("f32", "f32"),
                     flash_attn="off")


@pytest.fixture(scope="module")
def cal_bf16(in_data):
    return calibrate(MODEL, TEXT, n_ctx=64, workdir=in_data)


def _imatrix_cli(model, out: Path, *opts: str) -> Path:
    r = CliRunner().invoke(imatrix_cmd, [str(model), "-f", TEXT, "-c", "64", "-o", str(out),
                                         "--no-progress", *opts], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def _assert_same_matrix(cal, path: Path) -> None:
    """cal equals the imatrix file at path: the means quantize reads, the raw statistics,
    and the file cal.save() writes, byte for byte."""
    theirs = load_imatrix(path)
    assert sorted(cal.imatrix) == sorted(theirs)
    for name, v in theirs.items():
        assert cal.imatrix[name].dtype == np.float32
        assert np.array_equal(cal.imatrix[name], v), name
    assert cal.save(path.with_suffix(".saved.gguf")).read_bytes() == path.read_bytes()


# ---------------------------------------------------------------- the same as `ggforge imatrix`

def test_f32_calibration_is_ggforge_imatrix_of_the_folder(cal_f32, in_data):
    """`ggforge imatrix FOLDER` converts to F32 itself: the same matrix."""
    assert cal_f32.precision == "F32"
    _assert_same_matrix(cal_f32, _imatrix_cli(MODEL, in_data / "cli-f32.gguf",
                                              "-ctk", "f32", "-ctv", "f32", "-fa", "off"))


def test_default_calibration_is_ggforge_imatrix_of_the_bf16_file(cal_bf16, in_data):
    """A BF16 checkpoint is calibrated on its BF16 conversion, as `ggforge imatrix` of it."""
    assert cal_bf16.precision == "BF16"
    bf16 = convert(MODEL, "BF16", in_data / "bf16.gguf").output
    _assert_same_matrix(cal_bf16, _imatrix_cli(bf16, in_data / "cli-bf16.gguf"))
    again = calibrate(bf16, TEXT, n_ctx=64)           # a float GGUF source is used as it is
    assert again.precision == "BF16"
    assert all(np.array_equal(again.imatrix[n], v) for n, v in cal_bf16.imatrix.items())


# ---------------------------------------------------------------- against llama-imatrix

def test_f32_calibration_matches_llama_imatrix(cal_f32, tmp_path):
    theirs = read_imatrix_stats(THEIRS)
    ours = cal_f32.data
    assert sorted(ours.entries) == sorted(theirs.entries) and len(ours.entries) == 42
    assert (ours.datasets, ours.chunk_count, ours.chunk_size) == \
        (theirs.datasets, theirs.chunk_count, theirs.chunk_size) == ([TEXT], 22, 64)
    assert (cal_f32.dataset, cal_f32.n_chunks, cal_f32.n_ctx) == (TEXT, 22, 64)
    assert cal_f32.n_tokens == _hf_token_count((DATA / TEXT).read_text().removesuffix("\n"))
    worst = 0.0
    for name, e in theirs.entries.items():
        assert np.array_equal(ours.entries[name].counts, e.counts), name
        rel = np.abs(ours.entries[name].sums - e.sums) / np.maximum(np.abs(e.sums), 1e-30)
        worst = max(worst, float(rel.max()))
    assert worst < SUM_RTOL, worst
    n = len(gguf_writer(theirs).header_bytes())        # keys, names, shapes, offsets
    assert cal_f32.save(tmp_path / "ours.gguf").read_bytes()[:n] == THEIRS.read_bytes()[:n]
    assert cal_f32.ppl == pytest.approx(13.7860, abs=1e-4)   # llama-imatrix's Final estimate


def test_bf16_calibration_is_near_llama_imatrix_of_the_f32_file(cal_bf16):
    """Not the same file (llama-imatrix ran on F32 weights): the same rows, sums within
    what BF16 rounding of the products' activations moves them."""
    theirs = read_imatrix_stats(THEIRS)
    assert sorted(cal_bf16.data.entries) == sorted(theirs.entries)
    for name, e in theirs.entries.items():
        a = cal_bf16.data.entries[name]
        assert np.array_equal(a.counts, e.counts), name
        np.testing.assert_allclose(a.sums, e.sums, rtol=BF16_SUM_RTOL, err_msg=name)


# ---------------------------------------------------------------- quantizing with it

@pytest.mark.parametrize("mix", ["Q4_K_M", "IQ4_XS"])
def test_quantize_with_calibration_is_llama_quantize(tiny_model, tmp_path, mix):
    """A BF16 checkpoint, calibrated on the default text, quantized in one step: the
    tensors llama_model_quantize makes of its F32 file with the same matrix."""
    from test_mixes import assert_same_tensors, llama_quantize   # needs llama_cpp

    folder = tiny_model("llama3", "bfloat16")
    cal = calibrate(folder, n_ctx=64, n_chunks=4, workdir=tmp_path / "work")
    assert (cal.precision, cal.n_chunks, cal.dataset) == ("BF16", 4, DEFAULT_DATASET)
    assert len(cal.imatrix) == 2 * 7
    ours = convert(folder, mix, tmp_path / "ours.gguf", imatrix=cal.imatrix,
                   options=MixOptions(has_imatrix=True)).output
    f32 = convert(folder, "F32", tmp_path / "f32.gguf").output
    llama_quantize(f32, tmp_path / "theirs.gguf", mix, imatrix=cal.imatrix)
    assert_same_tensors(ours, tmp_path / "theirs.gguf")
    assert list((tmp_path / "work").iterdir()) == []


# ---------------------------------------------------------------- the default text

def test_default_text_mixes_languages_scripts_and_formats():
    raw = DEFAULT_TEXT.read_bytes()
    assert 20_000 <= len(raw) <= 40_000
    text = raw.decode("utf-8")                          # strict: raises if not UTF-8
    assert (DEFAULT_TEXT.parent / "README.md").is_file()

    def script(ch: str) -> str:
        return unicodedata.name(ch, "").split(" ")[0]
    scripts = {script(c) for c in text if ord(c) > 127}
    assert {"CYRILLIC", "CJK", "HIRAGANA", "KATAKANA", "HANGUL", "LATIN"} <= scripts, scripts
    for word in ("Lindenstraße", "Märchen", "châtaignier", "señal", "caffè", "coisa",   # de fr es it pt
                 "замерзает", "绿茶", "商店街", "부침개"):                        # ru zh ja ko
        assert word in text, word
    for marker in ("```python", "def ", "```c", "#include <stdio.h>", "```javascript",
                   "addEventListener", "```sql", "SELECT", "```bash", "set -euo pipefail",
                   "\n# ", "\n## ", "|---", "\nUser: ", "\nAssistant: "):
        assert marker in text, marker
    (block,) = re.findall(r"```json\n(.*?)```", text, re.S)
    assert json.loads(block)["sensors"][0]["kind"] == "temperature"


def test_default_text_gives_two_chunks_of_the_default_context_on_pystdlib_6m():
    text = DEFAULT_TEXT.read_text(encoding="utf-8").removesuffix("\n")
    assert _hf_token_count(text) >= 2 * DEFAULT_CTX


# ---------------------------------------------------------------- errors, and nothing left behind

def test_short_text_is_one_error_naming_it_and_its_tokens(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x + 1\n")
    n = _hf_token_count("def f(x):\n    return x + 1")
    work = tmp_path / "work"
    with pytest.raises(ValueError) as e:
        calibrate(MODEL, short, workdir=work)
    msg = str(e.value)
    assert "\n" not in msg and str(short) in msg and f"to {n} tokens" in msg and "512" in msg, msg
    assert list(work.iterdir()) == []


def test_quantized_gguf_source_is_refused(tmp_path):
    q4 = convert(MODEL, "Q4_K_M", tmp_path / "pystdlib-6m-Q4_K_M.gguf").output
    with pytest.raises(FormatError, match=r"pystdlib-6m-Q4_K_M\.gguf: tensor .* is Q"):
        calibrate(q4, DATA / TEXT, n_ctx=64)


@pytest.mark.parametrize("stage", ["convert", "imatrix"])
def test_interrupt_leaves_no_temporary_file(tmp_path, stage):
    """Ctrl-C while converting or while evaluating: the temporary folder is gone."""
    def progress(s: str, done: int, total: int) -> None:
        assert 0 < done <= total
        if s == stage and done * 2 >= total:
            raise KeyboardInterrupt
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        calibrate(MODEL, DATA / TEXT, n_ctx=64, workdir=work, progress=progress)
    assert list(work.iterdir()) == []


def test_bad_arguments_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="context 8 is below 16"):
        calibrate(MODEL, DATA / TEXT, n_ctx=8)
    with pytest.raises(ValueError, match="0 chunks"):
        calibrate(MODEL, DATA / TEXT, n_chunks=0)
    with pytest.raises(FormatError, match="missing.txt"):
        calibrate(MODEL, tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="precision 'Q8_0'"):
        calibrate(MODEL, DATA / TEXT, precision="Q8_0")
