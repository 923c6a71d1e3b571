"""What a user types: ggforge.load(...), generate() with sampling keywords, chat(), and
`ggforge run` / `ggforge chat` with sampling options. Oracles: llama.cpp's greedy
continuation on the same file, transformers' rendering of the same chat template, and a
float64 computation of llama.cpp's sampler chain."""
from __future__ import annotations

import numpy as np
import pytest

from require import require
from click.testing import CliRunner

import ggforge
import llama_oracle
from ggforge.convert.pipeline import convert
from ggforge.runtime.sampling import Sampler, SamplerSettings
from ggforge.tools.cli import cli

PROMPT = "Once upon a time, there was a tiny model that 42 people liked."


@pytest.fixture(scope="module")
def gguf(tiny_model, tmp_path_factory):
    files = {}

    def get(arch: str):
        if arch not in files:
            out = tmp_path_factory.mktemp(f"api-{arch}") / "m.gguf"
            files[arch] = convert(tiny_model(arch), "Q8_0", out).output
        return files[arch]
    return get


def _llama_greedy(path, ids, n):
    return llama_oracle.greedy(path, ids, n)


def test_readme_python_example(gguf):
    """ggforge.load with the keywords of the README (llama.cpp's defaults: F16 cache, flash
    attention); greedy generate() gives llama.cpp's continuation with its defaults (its
    one-token decode path) on the same file; eval() its shape."""
    path = gguf("llama3")
    with ggforge.load(path, n_ctx=128, gpu_layers=0, cache_type_k="f16", cache_type_v="f16",
                      flash_attn="auto") as m:
        ids = m.tokenize(PROMPT)
        text = "".join(m.generate(PROMPT, max_tokens=8, temperature=0, repeat_last_n=0))
        toks = list(m.generate_tokens(ids, max_tokens=8, temperature=0, repeat_last_n=0))
        logits = m.eval(ids)
        detok = b"".join(m.tokenizer.token_to_piece(t, special=False) for t in toks).decode(
            "utf-8", "replace")
    assert toks == llama_oracle.greedy(path, ids, 8, defaults=True)
    assert text == detok
    assert logits.shape == (len(ids), m.model.config.n_vocab)


def test_load_takes_cache_types_and_checks_them(gguf):
    with ggforge.load(gguf("llama3"), n_ctx=32, cache_type_k="f16", cache_type_v="f16") as m:
        assert m.cache.k.dtype == np.float16 and m.cache.v.dtype == np.float16
        assert m.n_ctx == 32
    with pytest.raises(ValueError, match="KV cache type 'q4'"):
        ggforge.load(gguf("llama3"), cache_type_k="q4")


def test_sampling_keywords_seed_and_stop(gguf):
    """A seed repeats a sampled run, another seed (almost surely) does not; stop cuts the
    greedy text before the stop string; unknown keywords are a TypeError naming them."""
    with ggforge.load(gguf("llama3"), n_ctx=128) as m:
        def run(**kw):
            return list(m.generate_tokens(PROMPT, max_tokens=16, temperature=1.5, top_k=0,
                                          top_p=1.0, min_p=0.0, **kw))
        a, b = run(seed=11), run(seed=11)
        others = [run(seed=s) for s in (12, 13, 14)]
        assert a == b and any(o != a for o in others)
        full = "".join(m.generate(PROMPT, max_tokens=12, temperature=0))
        stop = full[len(full) // 2:len(full) // 2 + 2]
        assert stop.strip(), full
        cut = "".join(m.generate(PROMPT, max_tokens=12, temperature=0, stop=stop))
        assert cut == full[:full.find(stop)]
        with pytest.raises(TypeError, match="'temp'"):
            list(m.generate(PROMPT, temp=0.5))


def _llama_chain_probs(logits: np.ndarray, top_k: int, top_p: float, min_p: float,
                       temp: float) -> np.ndarray:
    """llama.cpp's common sampler chain (top-k, top-p, min-p, temperature, softmax) in
    float64, written from its definition with sorting: the distribution dist() draws from."""
    x = logits.astype(np.float64)
    order = np.argsort(-x, kind="stable")
    keep = order[:top_k] if top_k > 0 else order
    p = np.exp(x[keep] - x[keep][0])
    p /= p.sum()
    cum = np.cumsum(p)
    n = int(np.argmax(cum >= top_p)) + 1 if top_p < 1.0 else keep.size
    keep = keep[:n]
    keep = keep[x[keep] >= x[keep][0] + np.log(min_p)] if min_p > 0 else keep
    z = np.exp((x[keep] - x[keep][0]) / temp)
    out = np.zeros_like(x)
    out[keep] = z / z.sum()
    return out


@pytest.mark.parametrize("top_k,top_p,min_p,temp", [(40, 0.95, 0.05, 0.8), (5, 1.0, 0.0, 1.3),
                                                    (0, 0.7, 0.0, 1.0), (0, 1.0, 0.2, 0.6)])
def test_sampler_draws_follow_llama_cpps_chain(top_k, top_p, min_p, temp):
    """Frequencies of 6,000 draws against the chain's float64 probabilities: no token
    outside the kept set, every kept token within 5 standard deviations."""
    logits = np.random.default_rng(3).normal(0, 2.0, 64).astype(np.float32)
    want = _llama_chain_probs(logits, top_k, top_p, min_p, temp)
    s = Sampler(SamplerSettings(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=5))
    n = 6000
    counts = np.bincount([s(logits) for _ in range(n)], minlength=logits.size)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(want))
    sigma = np.sqrt(n * want * (1 - want)) + 1e-9
    assert np.all(np.abs(counts - n * want) <= 5 * sigma + 1), (counts, n * want)


@pytest.mark.parametrize("arch", ["llama3", "gemma3"])
def test_chat_renders_the_files_template_as_transformers(gguf, tiny_model, arch):
    """chat(): the prompt ids equal transformers' apply_chat_template of the same template
    and tokenizer; the greedy reply equals llama.cpp's continuation of those ids."""
    transformers = require("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_model(arch))
    messages = [{"role": "user", "content": "Hello there"}]
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(want, list):   # transformers >= 5 returns a BatchEncoding
        want = want["input_ids"]
    path = gguf(arch)
    with ggforge.load(path, n_ctx=128) as m:
        ids = m.chat_prompt(messages)
        reply = list(m.generate_tokens(ids, max_tokens=6, temperature=0, repeat_last_n=0))
        text = "".join(m.chat(messages, max_tokens=6, temperature=0, repeat_last_n=0))
        pieces = b"".join(m.tokenizer.token_to_piece(t, special=False) for t in reply)
    assert ids == list(want)
    assert reply == _llama_greedy(path, ids, 6)
    assert text == pieces.decode("utf-8", "replace")


def test_cli_run_with_seed_and_chat_on_stdin(gguf):
    """`ggforge run --temp 1 --seed S` repeats itself; `ggforge chat` reads turns from stdin
    and answers each with chat()'s reply."""
    path = str(gguf("llama3"))
    r = CliRunner()
    args = ["run", path, "-p", PROMPT, "-n", "12", "--temp", "1.0", "--seed", "4"]
    a, b = r.invoke(cli, args), r.invoke(cli, args)
    assert a.exit_code == 0, a.output
    assert a.output == b.output and a.output.strip()
    with ggforge.load(path) as m:
        want = "".join(m.chat([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0))
    c = r.invoke(cli, ["chat", path, "-n", "5", "--temp", "0"], input="Hi\n\n")
    assert c.exit_code == 0, c.output
    assert want in c.output
