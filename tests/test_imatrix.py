"""`ggforge imatrix` (runtime/imatrix.py, formats/imatrix_writer.py, tools/imatrix_cli.py).

The oracle is llama.cpp's llama-imatrix (0.3.36, as bundled with llama-cpp-python), which
CI does not build: its output for the project's trained model models/pystdlib-6m and a
committed text is committed in tests/data/imatrix (README there says how it was made).
Our file must have the same entries, counts, metadata and header bytes, sums equal to
float32 noise, and give the same quantized bytes through `quantize --imatrix`; written from
llama.cpp's own sums our writers give its bytes (GGUF, and the legacy .dat by checksum).
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGML_QUANT_SIZES

from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.imatrix import load_imatrix
from ggforge.formats.imatrix_writer import (ImatrixData, ImatrixEntry, gguf_writer, legacy_bytes,
                                            read_imatrix_stats, write_imatrix)
from ggforge.runtime.imatrix import MIN_ROWS, Collector, make_chunks
from ggforge.tools.imatrix_cli import imatrix_cmd

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "pystdlib-6m"
DATA = Path(__file__).parent / "data" / "imatrix"
TEXT = "calibration.txt"                      # relative to DATA: imatrix.datasets as written
THEIRS = DATA / "pystdlib-6m-c64.imatrix.gguf"
# sha256 of llama-imatrix's --output-format dat file of the same run (README)
THEIRS_DAT_SHA256 = "2b87746c2c89ec60ea410550f6bcbe6807c9da8d7d7bc21195b4ae5ffb3dbbba"
# Largest relative difference of a sum to llama.cpp's, measured: see test_sums_match
SUM_RTOL = 1e-5
# how the committed file was made: llama-imatrix with -fa off and an F32 cache
ORACLE_OPTS = ["-ctk", "f32", "-ctv", "f32", "-fa", "off"]
THEIRS_DEFAULTS = DATA / "pystdlib-6m-c64-defaults.imatrix.gguf"   # llama-imatrix's defaults


def _run(args):
    return CliRunner().invoke(imatrix_cmd, args, catch_exceptions=False)


from test_cli import _one_line_error  # noqa: E402  (the CLI's one-line error check)


@pytest.fixture(scope="module")
def f32(tmp_path_factory) -> Path:
    """models/pystdlib-6m as an F32 GGUF (the converter is deterministic: the file the
    committed llama-imatrix output was made from)."""
    from ggforge.convert.pipeline import convert

    return convert(MODEL, "F32", tmp_path_factory.mktemp("f32") / "F32.gguf").output


@pytest.fixture(scope="module")
def ours(f32, tmp_path_factory) -> dict[str, Path]:
    """Our imatrix of the committed text, GGUF and .dat, made as the committed one was."""
    out = tmp_path_factory.mktemp("ours")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(DATA)       # -f calibration.txt: the dataset name llama-imatrix recorded
        files = {}
        for fmt in ("gguf", "dat"):
            files[fmt] = out / f"ours.{fmt}"
            r = _run([str(f32), "-f", TEXT, "-c", "64", "-o", str(files[fmt]),
                      "--output-format", fmt, "--no-progress", *ORACLE_OPTS])
            assert r.exit_code == 0, r.output
            assert "22 chunks of 64 tokens" in r.output and "PPL = " in r.output
    return files


# ---------------------------------------------------------------- against llama-imatrix

def test_entries_counts_and_metadata_match(ours):
    a, b = read_imatrix_stats(ours["gguf"]), read_imatrix_stats(THEIRS)
    assert sorted(a.entries) == sorted(b.entries)
    # every product of the layers, none of token_embd / the tied head
    assert len(a.entries) == 6 * 7 and all(n.startswith("blk.") for n in a.entries)
    for name, e in b.entries.items():
        assert np.array_equal(a.entries[name].counts, e.counts), name
        assert a.entries[name].sums.shape == e.sums.shape, name
    assert (a.datasets, a.chunk_count, a.chunk_size) == (b.datasets, b.chunk_count, b.chunk_size) \
        == ([TEXT], 22, 64)
    assert all(int(e.counts[0]) == 22 * 64 for e in a.entries.values())


def test_header_bytes_match(ours):
    """Same keys, order, types, tensor names, shapes and offsets: the bytes before the data."""
    n = len(gguf_writer(read_imatrix_stats(THEIRS)).header_bytes())
    assert ours["gguf"].read_bytes()[:n] == THEIRS.read_bytes()[:n]
    assert ours["gguf"].stat().st_size == THEIRS.stat().st_size


def test_sums_match(ours):
    """Our forward is not llama.cpp's bit for bit (logits agree to ~1e-6 relative on F32
    files, tests/test_runtime.py), and its products group the rows otherwise (ubatches of
    several chunks); measured on the project's machine: largest relative difference of a
    sum 2.7e-6 (median 4.5e-7, the float32 accumulation of ~1400 rows). SUM_RTOL keeps a
    margin without hiding a missed row (1/1408 = 7e-4) or a wrong column."""
    a, b = read_imatrix_stats(ours["gguf"]), read_imatrix_stats(THEIRS)
    worst = 0.0
    for name, e in b.entries.items():
        rel = np.abs(a.entries[name].sums - e.sums) / np.maximum(np.abs(e.sums), 1e-30)
        worst = max(worst, float(rel.max()))
    assert worst < SUM_RTOL, worst


def _quantized(source, imatrix: Path, qtype: str, out: Path) -> GGUFFile:
    from ggforge.convert.pipeline import convert

    return GGUFFile.open(convert(source, qtype, out, imatrix=load_imatrix(imatrix)).output)


def _differing_blocks(a: GGUFFile, b: GGUFFile):
    """(tensor name, type name, block bytes a (k, size), b, block indices) per tensor."""
    for name, t in a.tensors.items():
        size = GGML_QUANT_SIZES[t.ggml_type][1]
        ra, rb = (np.asarray(g.raw(name)).reshape(-1, size) for g in (a, b))
        yield name, t, ra, rb, np.flatnonzero((ra != rb).any(axis=1))


# Quantized blocks that differ between `quantize --imatrix ours` and `--imatrix theirs`,
# measured on the project's machine (of 25856 / 25856 / 154880 blocks): Q4_K_M 245,
# IQ4_XS 29, Q4_0 132. Why they differ at all: the quantizers are llama-quantize's byte
# for byte (tests/test_kquants.py, test_legacy_imatrix.py; also checked with both imatrix
# files against llama-quantize itself: 0 blocks differ), and they are this sensitive to
# the last bits of the sums: llama-quantize given llama-imatrix's file with every sum moved
# up by ONE float32 ulp changes 216 Q4_K_M blocks. Q4_0 shows the mechanism (checked in
# test_q4_0_blocks_differ_only_at_ties): a block differs when its fp16 scale lies at a
# rounding midpoint, or when two of the 19 scales make_qx_quants tries score within ~1e-7
# of each other. A wrong matrix is far outside: one chunk less (5% of the rows) changes
# 7486 Q4_K_M blocks (29%).
MAX_DIFFERING = 0.02


@pytest.mark.parametrize("qtype", ["Q4_K_M", "IQ4_XS", "Q4_0"])
def test_quantize_with_ours_is_quantize_with_theirs_up_to_ties(ours, tmp_path, qtype):
    a = _quantized(MODEL, ours["gguf"], qtype, tmp_path / "ours.gguf")
    b = _quantized(MODEL, THEIRS, qtype, tmp_path / "theirs.gguf")
    with a, b:
        assert list(a.metadata) == list(b.metadata)
        assert [(n, t.ggml_type, t.dims) for n, t in a.tensors.items()] == \
            [(n, t.ggml_type, t.dims) for n, t in b.tensors.items()]
        n = differ = 0
        for name, t, ra, rb, bad in _differing_blocks(a, b):
            n += ra.shape[0]
            differ += bad.size
            if name not in load_imatrix(THEIRS):   # no imatrix entry: the same bytes
                assert bad.size == 0, name
        assert differ <= MAX_DIFFERING * n, (differ, n)


def test_q4_0_blocks_differ_only_at_ties(ours, f32, tmp_path):
    """Each Q4_0 block that differs either has the same levels and fp16 scales one ulp
    apart (the float scale at a rounding midpoint), or other levels whose score in
    make_qx_quants' search, (sum w x l)^2 / sum w l^2 with w = imatrix * sqrt(sigma2 + x^2),
    is within SUM_RTOL of the levels llama.cpp's sums choose: a near-tie that a sum's last
    bits decide, not a different matrix."""
    means = load_imatrix(THEIRS)
    a = _quantized(MODEL, ours["gguf"], "Q4_0", tmp_path / "ours.gguf")
    b = _quantized(MODEL, THEIRS, "Q4_0", tmp_path / "theirs.gguf")
    with a, b, GGUFFile.open(f32) as src:
        for name, t, ra, rb, bad in _differing_blocks(a, b):
            if not bad.size:
                continue
            assert t.type_name == "Q4_0", name
            n_in = t.dims[0]
            x = np.asarray(src.array(name), np.float64).reshape(-1, n_in)
            for i in bad:
                if (ra[i, 2:] == rb[i, 2:]).all():
                    da, db = (int(r[i, :2].view("<u2")[0]) for r in (ra, rb))
                    assert abs(da - db) == 1, (name, i)
                    continue
                row, col = divmod(int(i) * 32, n_in)
                xb = x[row, col:col + 32]
                w = means[name][col:col + 32] * np.sqrt((x[row] ** 2).mean() + xb * xb)
                score = [(w * xb * lv).sum() ** 2 / (w * lv * lv).sum()
                         for lv in (_q4_0_levels(ra[i]), _q4_0_levels(rb[i]))]
                assert abs(score[0] - score[1]) <= SUM_RTOL * max(score), (name, i, score)


def _q4_0_levels(block: np.ndarray) -> np.ndarray:
    q = block[2:]
    return np.concatenate([q & 15, q >> 4]).astype(np.float64) - 8


# ---------------------------------------------------------------- the writers

def test_gguf_writer_gives_llama_cpp_bytes(tmp_path):
    """llama.cpp's sums through our writer: its file, byte for byte."""
    out = write_imatrix(read_imatrix_stats(THEIRS), tmp_path / "again.gguf")
    assert out.read_bytes() == THEIRS.read_bytes()


def test_dat_writer_gives_llama_cpp_bytes():
    """save_imatrix_legacy of the same run (the .dat is not committed: its checksum is)."""
    assert hashlib.sha256(legacy_bytes(read_imatrix_stats(THEIRS))).hexdigest() == THEIRS_DAT_SHA256


def test_dat_round_trips_to_the_gguf_means(ours):
    """load_imatrix (what quantize reads) of our .dat equals the means of our GGUF: the
    .dat stores mean * ncall, read back / ncall (one float32 rounding each way)."""
    dat, gg = load_imatrix(ours["dat"]), load_imatrix(ours["gguf"])
    assert sorted(dat) == sorted(gg)
    for name, v in gg.items():
        np.testing.assert_allclose(dat[name], v, rtol=3e-7, err_msg=name)
    raw = ours["dat"].read_bytes()
    assert raw.endswith(b"\x16\x00\x00\x00" + len(TEXT).to_bytes(4, "little") + TEXT.encode())


def test_dat_skips_entries_without_data_and_gguf_keeps_them(tmp_path):
    e = {"blk.0.a.weight": ImatrixEntry(np.ones((2, 32), np.float32), np.array([3, 0])),
         "blk.0.b.weight": ImatrixEntry.empty(32)}
    d = ImatrixData(e, ["t.txt"], 1, 3)
    raw = legacy_bytes(d)
    assert raw[:4] == (1).to_bytes(4, "little")
    back = load_imatrix(write_imatrix(d, tmp_path / "x.dat", "dat"))
    assert list(back) == ["blk.0.a.weight"]       # the expert without rows stores 1
    np.testing.assert_array_equal(back["blk.0.a.weight"], np.r_[np.full(32, 1 / 3, np.float32), np.ones(32)])
    stats = read_imatrix_stats(write_imatrix(d, tmp_path / "x.gguf"))
    assert sorted(stats.entries) == sorted(e) and stats.entries["blk.0.a.weight"].sums.shape == (2, 32)


# ---------------------------------------------------------------- what is collected

def test_collector_filters_as_collect_imatrix():
    rng = np.random.default_rng(0)
    c = Collector()
    x = rng.standard_normal((MIN_ROWS, 8), dtype=np.float32)
    c("blk.0.attn_q.weight", x)
    c("blk.0.attn_q.weight", x[:MIN_ROWS - 1])      # fewer than 16 rows: ignored
    c("output.weight", x)                          # only with process_output
    c("token_embd.weight", x)                      # never (a tied head)
    assert list(c.entries) == ["blk.0.attn_q.weight"]
    e = c.entries["blk.0.attn_q.weight"]
    assert e.counts.tolist() == [MIN_ROWS]
    ref = np.zeros(8, np.float32)
    for row in x:                                  # C's loop: acc += x*x, row by row
        ref += row * row
    np.testing.assert_array_equal(e.sums[0], ref)
    c2 = Collector(process_output=True)
    c2("output.weight", x)
    assert list(c2.entries) == ["output.weight"]


def test_collect_experts_as_mul_mat_id():
    """The MUL_MAT_ID branch transcribed: slot-major, each (token, slot) to its expert."""
    rng = np.random.default_rng(1)
    n_tok, n_used, n_exp, n_in = 5, 2, 4, 8
    ids = np.stack([rng.permutation(n_exp)[:n_used] for _ in range(n_tok)])  # (n_tok, n_used)
    for n_x in (1, n_used):            # gate/up see one row per token, down one per slot
        x = rng.standard_normal((n_tok, n_x, n_in), dtype=np.float32)
        c = Collector()
        c.collect_experts("blk.0.ffn_up_exps.weight", x, ids, n_exp)
        sums, counts = np.zeros((n_exp, n_in), np.float32), np.zeros(n_exp, np.int64)
        for slot in range(n_used):
            for row in range(n_tok):
                ex, v = ids[row, slot], x[row, slot % n_x]
                counts[ex] += 1
                sums[ex] += v * v
        e = c.entries["blk.0.ffn_up_exps.weight"]
        np.testing.assert_array_equal(e.sums, sums)
        np.testing.assert_array_equal(e.counts, counts)
        assert c.data(4, ["t"]).chunk_count == counts.max() // 4


def test_untied_head_collected_with_process_output(tiny_model, tmp_path):
    """llama2's tiny model has its own output.weight: collected with --process-output,
    over every row (all logits are asked for)."""
    from ggforge.convert.pipeline import convert

    f = convert(tiny_model("llama2"), "F32", tmp_path / "l2.gguf").output
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "l2.imatrix.gguf"
    r = _run([str(f), "-f", str(text), "-c", "32", "--chunks", "2", "-o", str(out),
              "--process-output", "--no-ppl", "--no-progress"])
    assert r.exit_code == 0, r.output
    d = read_imatrix_stats(out)
    assert "output.weight" in d.entries and d.entries["output.weight"].counts.tolist() == [64]
    assert d.chunk_count == 2 and "PPL" not in r.output


def test_chunks_take_bos_and_whole_chunks():
    toks = np.arange(100, 100 + 70)
    ch = make_chunks(toks, 16, bos=1)
    assert ch.shape == (4, 16) and (ch[:, 0] == 1).all() and ch[1, 1] == 117
    assert make_chunks(toks, 16, n_chunks=2).shape == (2, 16)
    assert make_chunks(toks, 16, from_chunk=1, bos=None)[0, 0] == 116


# ---------------------------------------------------------------- bad input: one line

def test_hf_folder_gives_the_same_file(ours, tmp_path):
    out = tmp_path / "hf.gguf"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(DATA)
        r = _run([str(MODEL), "-f", TEXT, "-c", "64", "-o", str(out), "--no-ppl", "--no-progress",
                  *ORACLE_OPTS])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == ours["gguf"].read_bytes()


def test_bad_input_is_one_line(f32, tmp_path):
    text = DATA / TEXT
    short = tmp_path / "short.txt"
    short.write_text("def f():\n    return 1\n" * 5)
    _one_line_error(_run([str(f32), "-f", str(short), "-c", "64", "-o", str(tmp_path / "a.gguf")]),
                    "short.txt", "tokens", "needs at least 128")
    _one_line_error(_run([str(f32), "-f", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "b.gguf")]),
                    "missing.txt", "cannot read")
    _one_line_error(_run([str(THEIRS), "-f", str(text), "-o", str(tmp_path / "c.gguf")]),
                    "not a model", "imatrix")
    _one_line_error(_run([str(text), "-f", str(text), "-o", str(tmp_path / "d.gguf")]), "not a GGUF")
    _one_line_error(_run([str(f32), "-f", str(text), "-ngl", "2", "-o", str(tmp_path / "e.gguf")]),
                    "CPU only")
    _one_line_error(_run([str(f32), "-f", str(text), "-c", "8", "-o", str(tmp_path / "f.gguf")]),
                    "below 16")
    _one_line_error(_run([str(f32), "-f", str(text), "-c", "64", "--chunks", "0", "-o", str(tmp_path / "g.gguf")]),
                    "--chunks 0")
    _one_line_error(_run([str(tmp_path / "nope.gguf"), "-f", str(text), "-o", str(tmp_path / "h.gguf")]),
                    "nope.gguf", "no such model")
    existing = tmp_path / "exists.gguf"
    shutil.copy(THEIRS, existing)
    _one_line_error(_run([str(f32), "-f", str(text), "-o", str(existing)]), "--force")
    assert existing.read_bytes() == THEIRS.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_defaults_match_llama_imatrix_defaults(f32, tmp_path):
    """Both with their defaults (an F16 cache, flash attention on the CPU): the same counts,
    and sums within 1e-3 worst, 1e-4 median (measured 2.2e-4 and 1.9e-5: the F16 cache
    rounds keys and values that differ in their last float32 bits now and then to
    different halves; without flash attention ggforge's were 5.1e-4 and 2.3e-5 from
    llama.cpp's defaults)."""
    out = tmp_path / "default.gguf"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(DATA)
        r = _run([str(f32), "-f", TEXT, "-c", "64", "-o", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    a, b = read_imatrix_stats(out), read_imatrix_stats(THEIRS_DEFAULTS)
    assert list(a.entries) == list(b.entries)
    rel = []
    for name, e in b.entries.items():
        assert np.array_equal(a.entries[name].counts, e.counts), name
        rel.append(float(np.abs(a.entries[name].sums - e.sums).max() / np.abs(e.sums).max()))
    assert max(rel) < 1e-3 and float(np.median(rel)) < 1e-4, (max(rel), np.median(rel))
