"""The quality card (convert/card.py) and the quality report (convert/report.py): keys that
llama.cpp reads past and runs unchanged, llama-quantize's own imatrix keys from the file
llama-imatrix wrote, and a report whose KL divergence is llama.cpp's logits' (float64
formula over llama.cpp's logits of the file and of its reference, same chunks)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from ggforge.convert.card import card_of
from ggforge.convert.pipeline import convert
from ggforge.convert.report import REPORT_CHUNKS, REPORT_CTX, REPORT_TEXT
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.tools.cli import cli
from require import require

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "models" / "pystdlib-6m"
THEIRS = ROOT / "tests" / "data" / "imatrix" / "pystdlib-6m-c64.imatrix.gguf"   # llama-imatrix's


@pytest.fixture()
def model(tmp_path):
    dst = tmp_path / "pystdlib-6m"
    shutil.copytree(EMBEDDED, dst, ignore=shutil.ignore_patterns("*.gguf"))
    return dst


def _tensors(path) -> dict[str, bytes]:
    with GGUFFile.open(path) as g:
        return {n: np.asarray(g.array(n)).tobytes() for n in g.tensors}


def test_card_keys_change_no_tensor_and_llama_cpp_reads_past_them(model, tmp_path):
    llama_cpp = require("llama_cpp")
    plain = convert(model, "q4_k_m", tmp_path / "plain.gguf", card=False).output
    carded = convert(model, "q4_k_m", tmp_path / "card.gguf").output
    assert _tensors(plain) == _tensors(carded)
    with GGUFFile.open(carded) as g:
        card = card_of(g.metadata)
    assert card["ggforge.mix"] == "Q4_K_M" and card["ggforge.source"] == "pystdlib-6m"
    assert card["ggforge.source.files"] == ["model.safetensors"]
    reader = gguf.GGUFReader(carded)                          # gguf-py reads the same keys
    assert reader.fields["ggforge.mix"].contents() == "Q4_K_M"
    ids = [4085, 300, 12, 77]
    logits = []
    for path in (plain, carded):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, verbose=False)
        llm.eval(ids)
        logits.append(np.array(llm.scores[:4]))
        if path == carded:
            assert llm.metadata["ggforge.mix"] == "Q4_K_M"
        llm.close()
    assert np.array_equal(*logits)


def test_imatrix_keys_are_llama_quantize_s(model, tmp_path):
    """quantize --imatrix records llama-quantize's quantize.imatrix.* keys (its
    tools/quantize: file, first dataset, entry count, chunk count) from llama-imatrix's
    own file, read here by gguf-py, and the card adds its digest."""
    import hashlib

    r = CliRunner().invoke(cli, ["quantize", str(model), "q4", "--imatrix", str(THEIRS), "--no-progress"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    theirs = gguf.GGUFReader(THEIRS)
    datasets = theirs.fields["imatrix.datasets"].contents()
    chunks = theirs.fields["imatrix.chunk_count"].contents()
    entries = sum(1 for t in theirs.tensors if t.name.endswith(".in_sum2"))
    with GGUFFile.open(model / "pystdlib-6m-Q4_K_M.gguf") as g:
        md = g.metadata
    assert md["quantize.imatrix.file"] == str(THEIRS)
    assert md["quantize.imatrix.dataset"] == datasets[0]
    assert md["quantize.imatrix.entries_count"] == entries
    assert md["quantize.imatrix.chunks_count"] == chunks
    assert md["ggforge.imatrix.sha256"] == hashlib.sha256(THEIRS.read_bytes()).hexdigest()
    assert md["ggforge.imatrix.chunks"] == chunks and md["ggforge.mix"] == "Q4_K_M --imatrix"


def test_requantizing_replaces_the_card(model, tmp_path):
    f16 = convert(model, "f16", tmp_path / "f16.gguf", report=True).output
    with GGUFFile.open(f16) as g:
        assert "ggforge.report.kld_mean" in g.metadata
    q8 = convert(f16, "q8_0", tmp_path / "q8.gguf").output
    with GGUFFile.open(q8) as g:
        card = card_of(g.metadata)
    assert card["ggforge.mix"] == "Q8_0" and not any(k.startswith("ggforge.report") for k in card)


def _kld_from_llama(path, ref_path, ids_chunks) -> tuple[float, float]:
    """Mean KL divergence and top-1 agreement over the scored positions, in float64, from
    llama.cpp's logits (its defaults: F16 cache, flash attention) of both files."""
    llama_cpp = require("llama_cpp")
    rows = {}
    for name, p in (("q", path), ("ref", ref_path)):
        llm = llama_cpp.Llama(model_path=str(p), n_ctx=REPORT_CTX, n_batch=REPORT_CTX, logits_all=True,
                              verbose=False, flash_attn=True, n_threads=2)
        out = []
        for ids in ids_chunks:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[REPORT_CTX // 2:REPORT_CTX - 1], np.float64))
        rows[name] = np.concatenate(out)
        llm.close()

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lq, lr = log_softmax(rows["q"]), log_softmax(rows["ref"])
    kld = (np.exp(lr) * (lr - lq)).sum(-1)
    return float(kld.mean()), float((lq.argmax(-1) == lr.argmax(-1)).mean())


def test_report_kld_is_llama_cpp_s(model, tmp_path):
    res = convert(model, "q4_k_m", tmp_path / "q4.gguf", report=True)
    rep = res.report
    f32 = convert(model, "f32", tmp_path / "f32.gguf", card=False).output
    from ggforge.runtime.generate import load

    with load(res.output, n_ctx=REPORT_CTX) as m:
        toks = m.tokenize(REPORT_TEXT.read_text("utf-8"))
    n = min(REPORT_CHUNKS, len(toks) // REPORT_CTX)
    chunks = [[toks[0]] + toks[i * REPORT_CTX + 1:(i + 1) * REPORT_CTX] for i in range(n)]
    want_kld, want_top = _kld_from_llama(res.output, f32, chunks)
    assert rep.n_scored == n * (REPORT_CTX - 1 - REPORT_CTX // 2)
    assert rep.kld.kld.value == pytest.approx(want_kld, rel=0.05)
    assert abs(rep.kld.same_top.value - want_top) <= 3 / rep.n_scored + 0.01
    with GGUFFile.open(res.output) as g:        # the card holds the report's figures
        md = g.metadata
    assert md["ggforge.report.kld_mean"] == pytest.approx(rep.kld.kld.value, rel=1e-6)
    assert md["ggforge.report.top1"] == pytest.approx(rep.kld.same_top.value, rel=1e-6)
    assert md["ggforge.report.worst_rel_rms"] == pytest.approx(rep.tensors[0].rel_rms, rel=1e-6)
    assert not any(math.isnan(v) for k, v in md.items() if k.startswith("ggforge.report.") and isinstance(v, float))


def test_inspect_shows_the_card_and_quantize_the_report(model, tmp_path):
    out = tmp_path / "q.gguf"
    r = CliRunner().invoke(cli, ["quantize", str(model), "q8_0", "-o", str(out), "--report", "--no-progress"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "mean KLD" in r.output and "tensors that lost most" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(out)], catch_exceptions=False)
    assert r.exit_code == 0 and "how it was made" in r.output and "Q8_0" in r.output
    assert "mean KLD" in r.output


def test_quantize_calibrate_in_one_step(model, tmp_path):
    """quantize SRC q4 --calibrate FILE: the importance matrix of the source's own weights
    over FILE (as ggforge imatrix computes it: convert/calibrate.py), then llama-quantize's
    bytes with it (llama_model_quantize of the F32 file, the same matrix), and a card that
    names the text and its digest."""
    import hashlib

    from ggforge.convert.calibrate import calibrate
    from test_mixes import assert_same_tensors, llama_quantize

    text = ROOT / "tests" / "data" / "imatrix" / "calibration.txt"
    out = tmp_path / "q4.gguf"
    r = CliRunner().invoke(cli, ["quantize", str(model), "q4", "--calibrate", str(text), "--calibrate-ctx", "64",
                                 "-o", str(out), "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    cal = calibrate(model, text, n_ctx=64, workdir=tmp_path)
    f32 = convert(model, "f32", tmp_path / "f32.gguf", card=False).output
    theirs = tmp_path / "theirs.gguf"
    llama_quantize(f32, theirs, "Q4_K_M", imatrix=cal.imatrix)
    assert_same_tensors(out, theirs)
    with GGUFFile.open(out) as g:
        md = g.metadata
    assert md["ggforge.mix"] == "Q4_K_M --calibrate"
    assert md["ggforge.imatrix.dataset_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert md["ggforge.imatrix.chunks"] == cal.n_chunks == md["quantize.imatrix.chunks_count"]
    assert "quantize.imatrix.file" not in md and list(md["ggforge.imatrix.dataset"]) == [str(text)]
    r = CliRunner().invoke(cli, ["quantize", str(model), "q4", "--calibrate", "--imatrix", str(THEIRS),
                                 "-o", str(tmp_path / "x.gguf")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:") and "give one of them" in lines[0]
