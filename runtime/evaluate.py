"""Perplexity and KL divergence of a model over a text, as llama.cpp's `llama-perplexity`.

    m = ggforge.load("model-Q4_K_M.gguf", n_ctx=512)
    ref = ggforge.load("model-F32.gguf", n_ctx=512)
    tokens = perplexity_tokens(m, open("text.txt", "rb").read())
    r = evaluate(m, tokens, 512, ref=ref)
    r.ppl.value, r.ppl.unc              # "Final estimate: PPL = ... +/- ..."
    r.kld.kld.value, r.kld.same_top     # "Mean KLD", "Same top p"

The definitions are llama-perplexity's (tools/perplexity/perplexity.cpp, perplexity() and
kl_divergence()): the text is tokenized once with BOS; it is cut into chunks of n_ctx
tokens; each chunk is evaluated from an empty cache with its first token replaced by BOS
when the vocabulary adds one; only the second half is scored, the logits at positions
n_ctx/2 .. n_ctx-2 predicting the next token. The statistics (means, uncertainties,
covariance, percentiles) are its formulas, evaluated in float64.

One deliberate difference: llama-perplexity stores the reference's log-probabilities as 16
bits over a 16-nat window below the top (its --kl-divergence-base file) and drops terms
with a reference probability under e^-16. We recompute the reference chunk by chunk beside
the model, so its log-probabilities are exact: the KL divergence of a file against itself
is exactly 0 and its top-1 agreement 100% (llama-perplexity gives about 1e-6 and can miss
a near-tie).

Memory is bounded: one chunk's logits at a time (the scored rows worked on in blocks), and
per scored position a few float64 scalars.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

F64 = np.float64
BLOCK_ELEMENTS = 1 << 22   # log-softmax rows are worked on in blocks of this many float64s
KLD_PERCENTILES = (("max", 1.0), ("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95),
                   ("90.0%", 0.9), ("median", None), ("10.0%", 0.1), ("5.0%", 0.05),
                   ("1.0%", 0.01), ("0.1%", 0.001), ("min", 0.0))
P_DIFF_PERCENTILES = (KLD_PERCENTILES[:5] + (("75.0%", 0.75), ("median", None), ("25.0%", 0.25))
                      + KLD_PERCENTILES[6:])


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A value and its ± (one standard error, as llama-perplexity prints it)."""
    value: float
    unc: float


@dataclasses.dataclass(frozen=True)
class KldResult:
    """MODEL against REF over the scored positions: llama-perplexity --kl-divergence's
    final statistics. Probabilities (p_diff, rms_p_diff, same_top) are fractions, not %."""
    ppl_q: Estimate
    ppl_base: Estimate
    cor: float                  # Cor(ln(PPL(Q)), ln(PPL(base)))
    ln_ratio: Estimate          # Mean ln(PPL(Q)/PPL(base))
    ratio: Estimate             # Mean PPL(Q)/PPL(base)
    ppl_diff: Estimate          # Mean PPL(Q)-PPL(base)
    kld: Estimate               # Mean KLD
    kld_percentiles: dict[str, float]
    p_diff: Estimate            # Mean Δp: p(Q, next token) - p(base, next token)
    p_diff_percentiles: dict[str, float]
    rms_p_diff: Estimate
    same_top: Estimate          # top-1 agreement


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Perplexity of the model ("Final estimate: PPL = value +/- unc") and, with a
    reference, the KL divergence statistics."""
    ppl: Estimate
    n_ctx: int
    n_tokens: int               # tokens of the whole text (BOS included)
    n_chunks: int
    n_scored: int               # positions scored: n_chunks * (n_ctx - 1 - n_ctx // 2)
    kld: KldResult | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- the model ------------------------------------------------------------------------------
class _ModelView:
    """A runtime.model.Model seen as a LoadedModel: its file's tokenizer, and eval() of one
    sequence from an empty cache (F32, as Model.new_cache's default)."""

    def __init__(self, model):
        from ggforge.runtime.tokenizer import Tokenizer

        self.model = model
        self.tokenizer = Tokenizer.from_metadata(model.gguf.metadata)
        self.n_ctx = 1 << 30      # no cache of its own: each eval() makes one of its length

    def eval(self, ids) -> np.ndarray:
        cache = self.model.new_cache(len(ids))
        return self.model.forward(np.asarray(ids), cache, all_logits=True)    # (n, n_vocab)


def _evaluable(model):
    """A LoadedModel (ggforge.load) as it is; a runtime.model.Model wrapped."""
    from ggforge.runtime.model import Model

    return _ModelView(model) if isinstance(model, Model) else model


# -- tokens and chunks ---------------------------------------------------------------------
def perplexity_tokens(model, text: str | bytes) -> list[int]:
    """The text's token ids as llama-perplexity takes them: common_tokenize(text,
    add_special=true, parse_special=false), i.e. BOS first when the vocabulary adds one
    (never EOS: llama-perplexity refuses such a vocabulary), special-token texts as text."""
    tok = _evaluable(model).tokenizer
    ids = tok.encode(text, add_special=False, parse_special=False)
    return ([tok.bos_id] if tok.add_bos else []) + ids


def check_tokens(n_tokens: int, n_ctx: int, source: str = "the text") -> int:
    """The number of chunks llama-perplexity evaluates, or a ValueError naming ``source``
    when the text is too short (it asks for 2 * n_ctx tokens) or n_ctx too small."""
    if n_ctx < 4:
        raise ValueError(f"context size {n_ctx} is too small for perplexity: each chunk's second "
                         "half is scored; use -c 4 or more")
    if n_tokens < 2 * n_ctx:
        raise ValueError(f"{source}: tokenizes to only {n_tokens} tokens; perplexity with a "
                         f"context of {n_ctx} needs at least {2 * n_ctx} (2*n_ctx, as "
                         "llama-perplexity); give more text or a smaller -c")
    return n_tokens // n_ctx


def check_same_vocab(model, ref, model_name: str = "the model", ref_name: str = "the reference") -> None:
    """KL divergence compares distributions over the same tokens: refuse a reference whose
    vocabulary (token texts, in order) or BOS differs, naming the first difference."""
    a, b = model.tokenizer, ref.tokenizer
    if a.n_vocab != b.n_vocab or model.model.config.n_vocab != ref.model.config.n_vocab:
        raise ValueError(f"{ref_name}: its vocabulary has {b.n_vocab} tokens "
                         f"(logits {ref.model.config.n_vocab}), {model_name}'s has {a.n_vocab} "
                         f"(logits {model.model.config.n_vocab}); KL divergence needs the same vocabulary")
    ta, tb = a.vocab.tokens, b.vocab.tokens
    if ta != tb:
        i = next(i for i, (x, y) in enumerate(zip(ta, tb)) if x != y)
        raise ValueError(f"{ref_name}: token {i} is {tb[i]!r}, in {model_name} it is {ta[i]!r}; "
                         "KL divergence needs the same vocabulary")
    if (a.add_bos, a.bos_id) != (b.add_bos, b.bos_id):
        raise ValueError(f"{ref_name}: BOS {b.bos_id} (added: {b.add_bos}) differs from "
                         f"{model_name}'s {a.bos_id} (added: {a.add_bos}); the chunks would differ")


def chunks(tokens: Sequence[int], n_ctx: int, n_chunks: int, bos: int | None):
    """(chunk ids as evaluated, the original ids) per chunk: the first replaced by ``bos``."""
    for i in range(n_chunks):
        orig = np.asarray(tokens[i * n_ctx:(i + 1) * n_ctx], dtype=np.int64)    # (n_ctx,)
        ids = orig.copy()
        if bos is not None:
            ids[0] = bos
        yield ids, orig


# -- per-position scalars ------------------------------------------------------------------
def _log_softmax(rows: np.ndarray) -> np.ndarray:
    """(m, n_vocab) float32 logits -> float64 log-probabilities."""
    x = rows.astype(F64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


class _Positions:
    """Per scored position: nll of the model, and with a reference its nll, the KL
    divergence, Δp and top-1 agreement. Lists of per-chunk arrays, float64."""

    def __init__(self, with_ref: bool):
        self.with_ref = with_ref
        self.nll: list[np.ndarray] = []
        self.nll_base: list[np.ndarray] = []
        self.kld: list[np.ndarray] = []
        self.p_diff: list[np.ndarray] = []
        self.same_top: list[np.ndarray] = []
        self._sum, self._n = 0.0, 0    # running sum of nll, for the progress line

    def add(self, rows: np.ndarray, targets: np.ndarray, ref_rows: np.ndarray | None) -> None:
        """rows, ref_rows: (m, n_vocab) float32 logits; targets: (m,) the next tokens."""
        block = max(1, BLOCK_ELEMENTS // rows.shape[1])
        for a in range(0, rows.shape[0], block):
            r, t = rows[a:a + block], targets[a:a + block]
            logq = _log_softmax(r)                                      # (b, n_vocab)
            nll = -logq[np.arange(len(t)), t]                           # (b,)
            self.nll.append(nll)
            self._sum, self._n = self._sum + float(nll.sum()), self._n + nll.size
            if ref_rows is None:
                continue
            rr = ref_rows[a:a + block]
            logp = _log_softmax(rr)                                     # (b, n_vocab)
            nll_base = -logp[np.arange(len(t)), t]
            p = np.exp(logp)
            # KL(base || Q) = sum_i p_i (log p_i - log q_i); 0 * log 0 terms are 0
            self.kld.append(np.einsum("ij,ij->i", p, logp - logq))
            self.nll_base.append(nll_base)
            self.p_diff.append(np.exp(-nll) - np.exp(-nll_base))
            self.same_top.append(np.argmax(r, axis=1) == np.argmax(rr, axis=1))

    def running_ppl(self) -> float:
        return math.exp(self._sum / self._n)


# -- llama-perplexity's statistics ---------------------------------------------------------
def perplexity_estimate(nll: np.ndarray) -> Estimate:
    """perplexity()'s "Final estimate: PPL = exp(mean nll) +/- ppl * sqrt(var / (n - 1))"
    (the ± is 0 where llama-perplexity finds no positive variance)."""
    n = nll.size
    mean = float(nll.sum(dtype=F64)) / n
    var = float((nll * nll).sum(dtype=F64)) / n - mean * mean
    ppl = math.exp(mean)
    return Estimate(ppl, math.sqrt(var / (n - 1)) * ppl if var > 0 and n > 1 else 0.0)


def mean_and_uncertainty(values: np.ndarray) -> Estimate:
    """kl_divergence()'s mean_and_uncertainty: mean, and sqrt(var / (n - 1)) when n > 10."""
    n = values.size
    if n < 1:
        return Estimate(0.0, 0.0)
    f = float(values.sum(dtype=F64)) / n
    df = float((values * values).sum(dtype=F64)) / n - f * f
    return Estimate(f, math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def covariance(a: np.ndarray, b: np.ndarray) -> float:
    """kl_divergence()'s covariance of the two means (0 under 10 values)."""
    n = a.size
    if n < 10:
        return 0.0
    return (float((a * b).sum(dtype=F64)) / n
            - float(a.sum(dtype=F64)) / n * (float(b.sum(dtype=F64)) / n)) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear between the two nearest of the sorted values."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (sorted_values.size - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * sorted_values[ip] + p * sorted_values[min(ip + 1, sorted_values.size - 1)])


def median(sorted_values: np.ndarray) -> float:
    n = sorted_values.size
    return float(0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]) if n % 2 == 0
                 else sorted_values[n // 2])


def _percentiles(values: np.ndarray, table) -> dict[str, float]:
    s = np.sort(values)
    return {name: (median(s) if f is None else percentile(s, f)) for name, f in table}


def kld_statistics(nll: np.ndarray, nll_base: np.ndarray, kld: np.ndarray, p_diff: np.ndarray,
                   same_top: np.ndarray) -> KldResult:
    """kl_divergence()'s final statistics from the per-position values (all (n,))."""
    n = nll.size
    lq, lb = mean_and_uncertainty(nll), mean_and_uncertainty(nll_base)
    ppl_q = Estimate(math.exp(lq.value), math.exp(lq.value) * lq.unc)
    ppl_b = Estimate(math.exp(lb.value), math.exp(lb.value) * lb.unc)
    cov = covariance(nll, nll_base)
    cor = cov / (lq.unc * lb.unc) if lq.unc * lb.unc > 0 else float("nan")
    ln_ratio = Estimate(lq.value - lb.value, math.sqrt(max(lq.unc ** 2 + lb.unc ** 2 - 2 * cov, 0.0)))
    ratio = Estimate(math.exp(ln_ratio.value), math.exp(ln_ratio.value) * ln_ratio.unc)
    ppl_cov = ppl_q.value * ppl_b.value * cov
    diff = Estimate(ppl_q.value - ppl_b.value,
                    math.sqrt(max(ppl_q.unc ** 2 + ppl_b.unc ** 2 - 2 * ppl_cov, 0.0)))
    mse = mean_and_uncertainty(p_diff * p_diff)
    rms = math.sqrt(mse.value)
    top = float(same_top.sum()) / n
    return KldResult(
        ppl_q=ppl_q, ppl_base=ppl_b, cor=cor, ln_ratio=ln_ratio, ratio=ratio, ppl_diff=diff,
        kld=mean_and_uncertainty(kld), kld_percentiles=_percentiles(kld, KLD_PERCENTILES),
        p_diff=mean_and_uncertainty(p_diff),
        p_diff_percentiles=_percentiles(p_diff, P_DIFF_PERCENTILES),
        rms_p_diff=Estimate(rms, 0.5 / rms * mse.unc if rms > 0 else 0.0),
        same_top=Estimate(top, math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0))


# -- the evaluation ------------------------------------------------------------------------
def evaluate(model, tokens: Sequence[int], n_ctx: int, *, ref=None, n_chunks: int | None = None,
             source: str = "the text", model_name: str = "the model", ref_name: str = "the reference",
             progress: Callable[[int, int, float], None] | None = None) -> EvalResult:
    """Perplexity of ``model`` (a LoadedModel: ggforge.load(...), or a runtime.model.Model)
    over ``tokens`` (see perplexity_tokens) in chunks of ``n_ctx``, at most ``n_chunks`` of
    them; with ``ref`` (the same kinds, of the same vocabulary) also the KL divergence of the model's next-token
    distributions from the reference's, the reference run beside it chunk by chunk.
    ``progress(done, total, running_ppl)`` is called after each chunk. Errors (text too
    short, different vocabulary) are ValueErrors naming ``source``, ``ref_name``."""
    model, ref = _evaluable(model), None if ref is None else _evaluable(ref)
    tokens = list(tokens)
    available = check_tokens(len(tokens), n_ctx, source)
    if n_chunks is not None and n_chunks < 1:
        raise ValueError(f"--chunks must be at least 1, got {n_chunks}")
    n_chunks = available if n_chunks is None else min(n_chunks, available)
    if ref is not None:
        check_same_vocab(model, ref, model_name, ref_name)
    for m, name in ((model, model_name), (ref, ref_name)):
        if m is None:
            continue
        if m.n_ctx < n_ctx:
            raise ValueError(f"{name}: loaded with a context of {m.n_ctx}, the evaluation needs "
                             f"{n_ctx}; load it with n_ctx={n_ctx}")
        if n_ctx > m.model.config.n_ctx_train:
            log.warning("%s: trained on only %d context tokens (%d asked)", name,
                        m.model.config.n_ctx_train, n_ctx)
    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    first = n_ctx // 2
    log.info("%s: %d tokens, %d chunks of %d, positions %d..%d of each scored", source,
             len(tokens), n_chunks, n_ctx, first, n_ctx - 2)
    pos = _Positions(ref is not None)
    for i, (ids, orig) in enumerate(chunks(tokens, n_ctx, n_chunks, bos)):
        rows = model.eval(ids)[first:n_ctx - 1]                          # (m, n_vocab)
        ref_rows = None if ref is None else ref.eval(ids)[first:n_ctx - 1]
        pos.add(rows, orig[first + 1:], ref_rows)
        if progress is not None:
            progress(i + 1, n_chunks, pos.running_ppl())
    nll = np.concatenate(pos.nll)
    kld = None
    if ref is not None:
        kld = kld_statistics(nll, np.concatenate(pos.nll_base), np.concatenate(pos.kld),
                             np.concatenate(pos.p_diff), np.concatenate(pos.same_top))
    return EvalResult(perplexity_estimate(nll), n_ctx, len(tokens), n_chunks, int(nll.size), kld)
