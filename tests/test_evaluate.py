"""`ggforge eval` (runtime/evaluate.py, tools/eval_cli.py) against llama.cpp.

The oracle: llama.cpp's tokens for the text (llama-cpp-python's tokenize, as
llama-perplexity's common_tokenize), llama.cpp's logits for each chunk (the first token
replaced by BOS), and llama-perplexity's formulas written out here in float64 over them.
Our figures must agree within what our logits' distance from llama.cpp's on the same
chunks allows.

On quantized files, llama.cpp's CPU logits and ours part now and then by about 1e-2 (a
last-bit difference flips a rounding of the activations to Q8_0/Q8_K in a later layer,
which random tiny models amplify; llama.cpp's own batched and one-token paths part the
same way). Measured here (x86-64, llama-cpp-python 0.3.36) on this text's 11 chunks of 32:
Q8_0 agrees with llama.cpp's batched logits within 5e-7 on 6 chunks and parts by 2e-3 to
5e-2 on 5; F32 agrees within 1e-5 everywhere. A bound derived from a 5e-2 distance would
let any KL divergence pass, so the quantized comparisons run over the chunks where the two
agree within 1e-4 (chunks are independent: their tokens, concatenated, are a text of their
own), and fail if fewer than three do.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

import llama_oracle
from model_factory import build_model
from ggforge.convert.pipeline import convert
from ggforge.runtime.evaluate import evaluate, perplexity_tokens
from ggforge.runtime.generate import load as _load
from ggforge.runtime.model import Model
from ggforge.tools.eval_cli import eval_cmd

N_CTX = 32
F32_CACHE = ["-ctk", "f32", "-ctv", "f32"]    # llama_oracle's cache, no flash attention


def load(path, n_ctx: int | None = None):
    """Our model with the oracle's KV cache (F32: llama.cpp's logits without flash attention)."""
    return _load(path, n_ctx=n_ctx, cache_type_k="f32", cache_type_v="f32")
ARCH = "llama3"   # byte-level BPE that adds BOS
TEXT = ("Once upon a time, there was a little girl who lived in a village near the forest. "
        "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
        "        self.x = x\nNumbers: 0 1 2 3 42 123 3.14159. Hello world! How are you doing? "
        "The quick brown fox jumps over the lazy dog; I'm fine, thanks, and you?\n") * 3


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    folder = tiny_model(ARCH)
    out = tmp_path_factory.mktemp("eval")
    paths = {t: convert(folder, t, out / f"{t}.gguf").output for t in ("F32", "Q8_0")}
    # the same tokenizer, other random weights: a large KL divergence with F32 precision
    other = build_model(ARCH, out / "seed1", seed=1)
    paths["F32-seed1"] = convert(other, "F32", out / "F32-seed1.gguf").output
    text = out / "text.txt"
    text.write_text(TEXT + "\n")   # -f drops one trailing newline, as llama-perplexity's
    return folder, paths, text


def _llama_tokens(path, text: str) -> list[int]:
    llm = llama_oracle.llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True, special=False)
    finally:
        llm.close()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def _oracle_rows(path, tokens: list[int], bos: int, n_chunks: int):
    """Per chunk: llama.cpp's scored logit rows (positions n_ctx/2 .. n_ctx-2) and targets."""
    first = N_CTX // 2
    out = []
    for i in range(n_chunks):
        chunk = list(tokens[i * N_CTX:(i + 1) * N_CTX])
        chunk[0] = bos
        rows = llama_oracle.logits(path, chunk)[first:N_CTX - 1]
        out.append((rows, np.asarray(tokens[i * N_CTX + first + 1:(i + 1) * N_CTX])))
    return out


def _our_rows(path, tokens: list[int], bos: int, n_chunks: int) -> list[np.ndarray]:
    with load(path, n_ctx=N_CTX) as m:
        return [m.eval([bos] + tokens[i * N_CTX + 1:(i + 1) * N_CTX])[N_CTX // 2:N_CTX - 1]
                for i in range(n_chunks)]


def _ppl_oracle(nll: np.ndarray) -> tuple[float, float]:
    """llama-perplexity's final estimate: exp(mean) and ppl * sqrt(var / (n - 1))."""
    mean = nll.mean()
    var = (nll ** 2).mean() - mean ** 2
    return math.exp(mean), math.exp(mean) * math.sqrt(var / (nll.size - 1))


@pytest.fixture(scope="module")
def oracle(files):
    """llama.cpp's tokens and scored rows for both files, and our logits' distance from them."""
    _, paths, _ = files
    tokens = _llama_tokens(paths["F32"], TEXT)
    with load(paths["F32"]) as m:
        bos = m.tokenizer.bos_id
    n_chunks = len(tokens) // N_CTX
    rows = {t: _oracle_rows(p, tokens, bos, n_chunks) for t, p in paths.items()}
    dist = {t: [float(np.abs(o - r).max()) for o, (r, _) in zip(_our_rows(p, tokens, bos, n_chunks), rows[t])]
            for t, p in paths.items()}    # per chunk
    return tokens, n_chunks, rows, dist


def test_tokens_are_llama_perplexitys(files, oracle):
    _, paths, _ = files
    with load(paths["F32"]) as m:
        assert perplexity_tokens(m, TEXT) == oracle[0]


def _agreeing(oracle, ftypes) -> list[int]:
    """The chunks where our logits of every file in ``ftypes`` are within 1e-4 of llama.cpp's."""
    dist = oracle[3]
    keep = [i for i in range(oracle[1]) if all(dist[t][i] < 1e-4 for t in ftypes)]
    assert len(keep) >= 3, f"our logits part from llama.cpp's on all but {len(keep)} chunks: {dist}"
    return keep


def _subset(oracle, keep: list[int]):
    """The tokens of chunks ``keep`` (a text of len(keep) chunks) and llama.cpp's rows of each
    file on them, and our largest distance from those rows."""
    tokens, _, rows, dist = oracle
    sub = [t for i in keep for t in tokens[i * N_CTX:(i + 1) * N_CTX]]
    return (sub, {t: [r[i] for i in keep] for t, r in rows.items()},
            {t: max(d[i] for i in keep) for t, d in dist.items()})


def _nll(rows) -> np.ndarray:
    return np.concatenate([-_log_softmax(r)[np.arange(len(t)), t] for r, t in rows])


def test_perplexity_equals_llama_cpp_formula(files, oracle):
    """Over the whole text (F32: every chunk within 1e-5 of llama.cpp), and --chunks."""
    _, paths, _ = files
    tokens, n_chunks, rows, dist = oracle
    assert n_chunks >= 3 and len(tokens) % N_CTX     # a tail that is no chunk: not scored
    nll = _nll(rows["F32"])
    ppl, unc = _ppl_oracle(nll)
    with load(paths["F32"], n_ctx=N_CTX) as m:
        res = evaluate(m, tokens, N_CTX)
        two = evaluate(m, tokens, N_CTX, n_chunks=2)
    raw = Model(paths["F32"])             # a runtime Model: F32 cache, its file's tokenizer
    try:
        assert perplexity_tokens(raw, TEXT) == tokens
        bare = evaluate(raw, tokens, N_CTX)
    finally:
        raw.close()
    assert (res.n_chunks, res.n_scored, res.n_tokens) == (n_chunks, nll.size, len(tokens))
    # each nll moves by at most twice the largest logit difference
    tol = max(1e-6, 2 * max(dist["F32"]))
    assert abs(math.log(res.ppl.value / ppl)) < tol, (res.ppl, ppl, dist["F32"])
    assert abs(res.ppl.unc / unc - 1) < 1e-3, (res.ppl, unc)
    assert abs(math.log(bare.ppl.value / ppl)) < tol and bare.n_scored == nll.size
    m2 = 2 * (N_CTX - 1 - N_CTX // 2)
    assert (two.n_chunks, two.n_scored) == (2, m2)
    assert abs(math.log(two.ppl.value) - nll[:m2].mean()) < tol


def test_perplexity_of_quantized_file_equals_llama_cpp_formula(files, oracle):
    _, paths, _ = files
    sub, rows, dist = _subset(oracle, _agreeing(oracle, ["Q8_0"]))
    nll = _nll(rows["Q8_0"])
    ppl, unc = _ppl_oracle(nll)
    with load(paths["Q8_0"], n_ctx=N_CTX) as m:
        res = evaluate(m, sub, N_CTX)
    assert res.n_scored == nll.size
    assert abs(math.log(res.ppl.value / ppl)) < max(1e-6, 2 * dist["Q8_0"])
    assert abs(res.ppl.unc / unc - 1) < 1e-3


def _kld_oracle(q_rows, base_rows):
    """kl_divergence()'s per-position values from llama.cpp's logits of both files."""
    out = {k: [] for k in ("nll", "nll_base", "kld", "p_diff", "same", "gap")}
    for (q, t), (b, _) in zip(q_rows, base_rows):
        lq, lb = _log_softmax(q), _log_softmax(b)
        idx = np.arange(len(t))
        out["nll"].append(-lq[idx, t])
        out["nll_base"].append(-lb[idx, t])
        out["kld"].append((np.exp(lb) * (lb - lq)).sum(axis=1))
        out["p_diff"].append(np.exp(lq[idx, t]) - np.exp(lb[idx, t]))
        out["same"].append(q.argmax(axis=1) == b.argmax(axis=1))
        top2 = np.sort(q, axis=1)[:, -2:]
        out["gap"].append(top2[:, 1] - top2[:, 0])      # a near-tie may flip the top-1
    return {k: np.concatenate(v) for k, v in out.items()}


def _check_kld(res, o, dist_q: float, dist_b: float) -> None:
    """Every statistic of kl_divergence()'s final report, from the oracle's per-position
    values. Tolerances from the logits' distance: a log-probability, nll or KLD moves by at
    most twice it per position, so a mean does too, and a standard error by less."""
    n = o["kld"].size
    tol = 4 * (dist_q + dist_b) + 1e-6

    def mean(x):
        return float(x.mean())

    def se(x):                 # llama-perplexity's mean_and_uncertainty (n > 10)
        return math.sqrt((mean(x * x) - mean(x) ** 2) / (n - 1))

    def near(got, want, abs_tol=tol, rel=1e-6):
        assert abs(got - want) <= abs_tol + rel * abs(want), (got, want, abs_tol)

    near(res.kld.value, mean(o["kld"]))
    near(res.kld.unc, se(o["kld"]))
    s = np.sort(o["kld"])
    for name, f in [("max", 1), ("99.9%", .999), ("99.0%", .99), ("95.0%", .95), ("90.0%", .9),
                    ("10.0%", .1), ("5.0%", .05), ("1.0%", .01), ("0.1%", .001), ("min", 0)]:
        p = f * (n - 1)
        ip = min(int(p), n - 2)
        near(res.kld_percentiles[name], (1 - (p - ip)) * s[ip] + (p - ip) * s[ip + 1])
    near(res.kld_percentiles["median"], 0.5 * (s[n // 2] + s[n // 2 - 1]) if n % 2 == 0 else s[n // 2])
    lq, lb = o["nll"], o["nll_base"]
    d_q, d_b = 2 * dist_q + 1e-6, 2 * dist_b + 1e-6
    near(math.log(res.ppl_q.value), mean(lq), d_q)
    near(math.log(res.ppl_base.value), mean(lb), d_b)
    near(res.ppl_q.unc / res.ppl_q.value, se(lq), d_q)
    near(res.ppl_base.unc / res.ppl_base.value, se(lb), d_b)
    cov = (mean(lq * lb) - mean(lq) * mean(lb)) / (n - 1)
    near(res.cor, cov / (se(lq) * se(lb)), d_q + d_b)
    near(res.ln_ratio.value, mean(lq) - mean(lb), d_q + d_b)
    near(res.ln_ratio.unc, math.sqrt(se(lq) ** 2 + se(lb) ** 2 - 2 * cov), d_q + d_b)
    near(res.ratio.value, math.exp(mean(lq) - mean(lb)), 2 * (d_q + d_b))
    pq, pb = math.exp(mean(lq)), math.exp(mean(lb))
    near(res.ppl_diff.value, pq - pb, 2 * (d_q + d_b) * pq)
    near(res.ppl_diff.unc, math.sqrt((pq * se(lq)) ** 2 + (pb * se(lb)) ** 2 - 2 * pq * pb * cov),
         2 * (d_q + d_b) * pq)
    near(res.p_diff.value, mean(o["p_diff"]))
    near(res.p_diff.unc, se(o["p_diff"]))
    sp = np.sort(o["p_diff"])
    near(res.p_diff_percentiles["max"], sp[-1])
    near(res.p_diff_percentiles["min"], sp[0])
    near(res.p_diff_percentiles["median"], 0.5 * (sp[n // 2] + sp[n // 2 - 1]) if n % 2 == 0 else sp[n // 2])
    rms = math.sqrt(mean(o["p_diff"] ** 2))
    near(res.rms_p_diff.value, rms)
    near(res.rms_p_diff.unc, 0.5 / rms * se(o["p_diff"] ** 2))
    ties = int((o["gap"] <= 2 * (dist_q + dist_b)).sum())   # top-1 may flip at a near-tie
    assert abs(res.same_top.value * n - o["same"].sum()) <= ties
    if ties == 0:
        top = o["same"].mean()
        near(res.same_top.unc, math.sqrt(top * (1 - top) / (n - 1)), 1e-12)


def test_kld_of_other_model_equals_llama_cpp_formula(files, oracle):
    """Two F32 models of the same vocabulary (other random weights): a KL divergence near 1
    and top-1 agreement far from 100%, every chunk within F32 precision of llama.cpp."""
    _, paths, _ = files
    tokens, n_chunks, rows, dist = oracle
    with load(paths["F32-seed1"], n_ctx=N_CTX) as m, load(paths["F32"], n_ctx=N_CTX) as ref:
        for k in (n_chunks, n_chunks - 1):    # an odd and an even count of positions
            o = _kld_oracle(rows["F32-seed1"][:k], rows["F32"][:k])
            assert o["kld"].mean() > 0.1 and o["same"].mean() < 0.9
            res = evaluate(m, tokens, N_CTX, ref=ref, n_chunks=k).kld
            _check_kld(res, o, max(dist["F32-seed1"]), max(dist["F32"]))


def test_kld_of_quantized_file_equals_llama_cpp_formula(files, oracle):
    _, paths, _ = files
    sub, rows, dist = _subset(oracle, _agreeing(oracle, ["Q8_0", "F32"]))
    o = _kld_oracle(rows["Q8_0"], rows["F32"])
    assert o["kld"].mean() > 1e-4 and o["same"].mean() < 1    # a real difference to measure
    with load(paths["Q8_0"], n_ctx=N_CTX) as m, load(paths["F32"], n_ctx=N_CTX) as ref:
        res = evaluate(m, sub, N_CTX, ref=ref).kld
    _check_kld(res, o, dist["Q8_0"], dist["F32"])


def test_kld_of_file_against_itself_is_zero(files, oracle):
    _, paths, _ = files
    tokens = oracle[0]
    with load(paths["F32"], n_ctx=N_CTX) as m, load(paths["F32"], n_ctx=N_CTX) as ref:
        res = evaluate(m, tokens, N_CTX, ref=ref)
    k = res.kld
    assert abs(k.kld.value) < 1e-12 and k.kld_percentiles["max"] < 1e-12
    assert k.same_top.value == 1.0 and k.ln_ratio.value == 0.0 and k.p_diff.value == 0.0
    assert k.ppl_q.value == k.ppl_base.value == pytest.approx(res.ppl.value, rel=1e-12)


def test_cli_json_with_hugging_face_reference(files, oracle):
    """--ref a Hugging Face folder: converted to a temporary F32 GGUF, the same file as the
    F32 MODEL, so KL(p || p) = 0; --json parses and carries llama.cpp's perplexity."""
    folder, paths, text = files
    tokens, n_chunks, rows, dist = oracle
    r = CliRunner().invoke(eval_cmd, [str(paths["F32"]), "-f", str(text), "--ref", str(folder),
                                      "-c", str(N_CTX), "--json", "--no-progress", *F32_CACHE])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["n_chunks"], d["n_tokens"], d["ref"]) == (n_chunks, len(tokens), str(folder))
    nll = _nll(rows["F32"])
    tol = max(1e-6, 2 * max(dist["F32"]))
    for ppl in (d["ppl"], d["kld"]["ppl_q"], d["kld"]["ppl_base"]):
        assert abs(math.log(ppl["value"]) - nll.mean()) < tol
    k = d["kld"]
    assert abs(k["kld"]["value"]) < 1e-12 and k["same_top"]["value"] == 1.0
    assert k["kld_percentiles"]["max"] < 1e-12 and abs(k["ln_ratio"]["value"]) < 1e-12


def test_cli_table(files, oracle):
    _, paths, text = files
    r = CliRunner().invoke(eval_cmd, [str(paths["Q8_0"]), "-f", str(text), "--ref", str(paths["F32"]),
                                      "-c", str(N_CTX), "--chunks", "2", "--no-progress", *F32_CACHE])
    assert r.exit_code == 0, r.output
    for label in ("PPL", "Mean KLD", "99.0% KLD", "Median KLD", "Same top p", "Mean PPL(Q)-PPL(base)"):
        assert label in r.stdout
    assert "2 chunks of 32" in r.stdout


def test_text_too_short_is_one_line(files, tmp_path):
    """llama-perplexity: "you need at least 2*n_ctx tokens"; so do we, naming the file and
    the count (llama.cpp's own token count)."""
    _, paths, _ = files
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:150])
    n = len(_llama_tokens(paths["F32"], TEXT[:150]))
    assert N_CTX <= n < 2 * N_CTX
    r = CliRunner().invoke(eval_cmd, [str(paths["F32"]), "-f", str(short), "-c", str(N_CTX)])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(short) in lines[0] and f"only {n} tokens" in lines[0], r.stderr
    assert f"at least {2 * N_CTX}" in lines[0]


def test_reference_with_other_vocabulary_is_refused(files, tiny_model, tmp_path):
    _, paths, text = files
    other = convert(tiny_model("llama2"), "Q8_0", tmp_path / "other.gguf").output
    r = CliRunner().invoke(eval_cmd, [str(paths["F32"]), "-f", str(text), "--ref", str(other),
                                      "-c", str(N_CTX)])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "vocabulary" in lines[0] and str(other) in lines[0], r.stderr

