"""Running a model on bad input: a clear error before any compute, from the Python API and
as one `error:` line from `ggforge run` (RELIABILITY.md, "Running").

Covered: a full context (prompt too long, generation reaching the end, a full cache given
to forward), token ids outside the vocabulary or not integers, an empty prompt (llama.cpp:
a lone BOS when the vocabulary adds one, else "input is empty"), a GGUF missing a tensor
the architecture needs, tensors and metadata that contradict each other (a matrix or norm
vector of the wrong shape, RoPE wider than a head, zero heads, a layer count that is not
the tensors'), and a context whose KV cache cannot fit in memory.
"""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from ggforge.convert.pipeline import convert
from ggforge.formats.errors import FormatError, QuantizationError, UnsupportedModelError
from ggforge.formats.gguf_checks import check_model_metadata
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.gguf_writer import KV, GGUFWriter
from ggforge.runtime import kernels
from ggforge.runtime.generate import load
from ggforge.runtime.kv_cache import CacheTooLargeError, ContextFullError, KVCache
from ggforge.runtime.sampling import SamplerSettings
from ggforge.runtime.tokenizer import Tokenizer
from ggforge.tools.cli import cli

GREEDY = SamplerSettings(temperature=0.0, repeat_last_n=0)


@pytest.fixture(scope="module")
def gguf(tiny_model, tmp_path_factory):
    """gguf(arch) -> an F32 GGUF of the tiny model: smollm (BPE, no BOS), llama2 (SPM, BOS)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            out = tmp_path_factory.mktemp(arch) / f"{arch}.gguf"
            cache[arch] = convert(tiny_model(arch), "F32", out).output
        return cache[arch]
    return get


@pytest.fixture()
def no_compute(monkeypatch):
    """Any matrix product or embedding lookup fails the test: errors must come first."""
    def boom(*a, **k):
        raise AssertionError("computed before the error")
    monkeypatch.setattr(kernels, "matmul", boom)
    monkeypatch.setattr(kernels, "get_rows", boom)


def rewrite(src, dst, *, meta=None, drop=(), shapes=None, types=None):
    """A copy of GGUF `src` with keys replaced (KEY: (vtype, value)) or removed (KEY: None),
    tensors dropped, or tensors given another shape (numpy order) or ggml type (the bytes
    are cut or repeated to fit)."""
    meta, shapes, types = meta or {}, shapes or {}, types or {}
    with GGUFFile.open(src) as g, open(dst, "wb") as f:
        w = GGUFWriter(f)
        for k, v in g.metadata.items():
            vtype, elem = g.value_types[k]
            if k in meta and meta[k] is None:
                continue
            vtype, v, elem = (*meta[k], None)[:3] if k in meta else (vtype, v, elem)
            w.add(KV(k, vtype, v.tolist() if isinstance(v, np.ndarray) else v, elem))
        for k, val in meta.items():
            if val is not None and k not in g.metadata:
                w.add(KV(k, *val[:3]))
        names = [n for n in g.tensors if n not in drop]
        sizes = {n: w.add_tensor_info(n, shapes.get(n, g.tensors[n].shape),
                                      types.get(n, g.tensors[n].ggml_type)) for n in names}
        w.write_header()
        for n in names:
            raw = g.raw(n).tobytes()
            w.write_tensor(n, (raw * (sizes[n] // max(len(raw), 1) + 1))[:sizes[n]])
        w.finish()
    return dst


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def one_error_line(r, *needles: str) -> str:
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.exception, r.output)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------
# a full context


def test_prompt_longer_than_the_context(gguf, no_compute):
    with load(gguf("smollm"), n_ctx=8) as m:
        with pytest.raises(ContextFullError, match="9 tokens does not fit the context size 8"):
            next(m.generate_tokens(list(range(1, 10))))
        with pytest.raises(ContextFullError, match="ctx-size"):
            m.eval(list(range(1, 10)))


def test_generation_reaching_the_end_of_the_context(gguf, monkeypatch):
    monkeypatch.setattr(Tokenizer, "is_eog", lambda self, tok: False)  # never stop early
    with load(gguf("smollm"), n_ctx=8) as m:
        got = []
        with pytest.raises(ContextFullError, match="context full after 8 tokens"):
            for tok in m.generate_tokens([1, 2, 3], max_tokens=100, settings=GREEDY):
                got.append(tok)
        # 3 prompt tokens + 5 generated fill the 8 cells; a 6th is sampled from the last
        # logits but has no cell to go to
        assert len(got) == 6 and m.cache.n_past == 8


def test_forward_into_a_full_cache_changes_nothing(gguf):
    with load(gguf("smollm"), n_ctx=4) as m:
        cache = m.model.new_cache(4)
        m.model.forward(np.arange(1, 4), cache)
        keys = cache.k.copy()
        with pytest.raises(ContextFullError,
                           match="3 tokens in the cache \\+ 2 new > context size 4"):
            m.model.forward(np.array([5, 6]), cache)
        assert cache.n_past == 3 and np.array_equal(cache.k, keys)


def test_cli_context_full(gguf, monkeypatch):
    one_error_line(run_cli(gguf("smollm"), "-p", "once upon a time " * 4, "-c", "4"),
                   "does not fit the context size 4", "--ctx-size")
    monkeypatch.setattr(Tokenizer, "is_eog", lambda self, tok: False)
    r = run_cli(gguf("smollm"), "-p", "hi", "-c", "8", "-n", "100", "--temp", "0")
    one_error_line(r, "context full after 8 tokens")
    assert r.stdout.strip()  # what was generated until then is printed


# ---------------------------------------------------------------------------------------
# token ids


@pytest.mark.parametrize("bad, shown", [(700, "700"), (-1, "-1"), (2**70, str(2**70)),
                                        (1.5, "1.5"), (True, "True"), ("3", "'3'"),
                                        (np.int64(10**6), "1000000")])
def test_token_ids_outside_the_vocabulary(gguf, no_compute, bad, shown):
    with load(gguf("smollm"), n_ctx=16) as m:
        assert m.model.config.n_vocab == 700
        for call in (m.eval, lambda ids: next(m.generate_tokens(ids))):
            with pytest.raises(ValueError, match=f"token id {shown} is"):
                call([1, 2, bad])
        if bad is True:
            return  # numpy reads [1, True] as [1, 1]: forward gets bool arrays in the next test
        cache = m.model.new_cache(4)
        with pytest.raises(ValueError, match=f"token id {shown} is"):
            m.model.forward([bad, 1], cache)
        assert cache.n_past == 0


@pytest.mark.parametrize("tokens", [np.array([1.0, 2.0]), np.array([True]), [[1, 2]],
                                    np.array([2**64 - 1], dtype=np.uint64), []])
def test_forward_refuses_what_is_not_token_ids(gguf, no_compute, tokens):
    with load(gguf("smollm"), n_ctx=4) as m:
        with pytest.raises(ValueError, match="token id|1-D sequence"):
            m.model.forward(tokens, m.model.new_cache(4))


def test_tokenizer_larger_than_the_embedding(gguf, tmp_path):
    """Ids the tokenizer can make but the embedding has no row for: refused at load."""
    src = gguf("smollm")
    with GGUFFile.open(src) as g:
        tokens = list(g.metadata["tokenizer.ggml.tokens"])
    path = rewrite(src, tmp_path / "m.gguf", meta={
        "tokenizer.ggml.tokens": (V.ARRAY, tokens + ["<extra>"], V.STRING),
        "tokenizer.ggml.token_type": None, "tokenizer.ggml.scores": None})
    with pytest.raises(FormatError, match="'token_embd.weight' has 700 rows but .* 701"):
        load(path)
    one_error_line(run_cli(path, "-p", "hi"), "token_embd.weight", "701")


# ---------------------------------------------------------------------------------------
# an empty prompt


def test_empty_prompt_without_bos_is_an_error(gguf, no_compute):
    with load(gguf("smollm"), n_ctx=16) as m:
        assert not m.tokenizer.add_bos and m.tokenize("") == []
        with pytest.raises(ValueError, match="empty prompt: .*no BOS token"):
            next(m.generate_tokens(""))
        with pytest.raises(ValueError, match="empty prompt"):
            m.eval([])
        with pytest.raises(ValueError, match="empty prompt"):
            next(m.generate_tokens([]))
    one_error_line(run_cli(gguf("smollm"), "-p", ""), "empty prompt", "BOS")


def test_empty_prompt_with_bos_evaluates_the_bos(gguf):
    """llama.cpp: `-p ""` evaluates a lone BOS when the vocabulary adds one."""
    with load(gguf("llama2"), n_ctx=16) as m:
        bos = m.tokenizer.bos_id
        assert m.tokenizer.add_bos and m.tokenize("") == [bos]
        seen = []
        real = m.model.forward
        def forward(toks, cache, **kw):
            seen.append(list(toks))
            return real(toks, cache, **kw)
        m.model.forward = forward
        first = next(m.generate_tokens("", settings=GREEDY))
        assert seen == [[bos]]
        assert first == int(np.argmax(m.eval([bos])[-1]))
    r = run_cli(gguf("llama2"), "-p", "", "-n", "3", "--temp", "0")
    assert r.exit_code == 0 and r.stderr == "", r.output


# ---------------------------------------------------------------------------------------
# tensors the architecture needs, and shapes the metadata implies


@pytest.mark.parametrize("name", ["blk.1.attn_k.weight", "output_norm.weight",
                                  "blk.0.ffn_norm.weight", "token_embd.weight"])
def test_missing_tensor(gguf, tmp_path, no_compute, name):
    path = rewrite(gguf("smollm"), tmp_path / "m.gguf", drop=[name])
    with pytest.raises(FormatError, match=f"tensor '?{name}'? is missing"):
        load(path)
    one_error_line(run_cli(path, "-p", "hi"), str(path), name, "missing")


# shapes in numpy order; the tiny model has n_embd 256, n_ff 512, 4 heads of 64
MISSHAPEN = {
    "ffn_up_transposed": ("blk.0.ffn_up.weight", (256, 512), "(512, 256)"),
    "ffn_up_3d": ("blk.0.ffn_up.weight", (2, 256, 256), "(512, 256)"),
    "ffn_up_no_rows": ("blk.0.ffn_up.weight", (0, 256), "(512, 256)"),
    "attn_q_narrow": ("blk.1.attn_q.weight", (256, 128), "(256, 256)"),
    "norm_short": ("blk.0.attn_norm.weight", (128,), "(256,)"),
    "norm_2d": ("blk.0.attn_norm.weight", (2, 128), "(256,)"),
    "output_norm_long": ("output_norm.weight", (512,), "(256,)"),
}


@pytest.mark.parametrize("case", list(MISSHAPEN))
def test_tensor_shape_contradicting_the_metadata(gguf, tmp_path, no_compute, case):
    name, shape, implied = MISSHAPEN[case]
    path = rewrite(gguf("smollm"), tmp_path / "m.gguf", shapes={name: shape})
    with pytest.raises(FormatError) as e:
        load(path)
    assert name in str(e.value) and f"the metadata implies {implied}" in str(e.value)
    one_error_line(run_cli(path, "-p", "hi"), name, implied)


BAD_METADATA = {
    # wider than a head: the rope kernel wrote past each head (heap corruption, abort)
    "rope_wider_than_head": ({"llama.rope.dimension_count": (V.UINT32, 128)},
                             ["rope.dimension_count", "128", "head size 64"]),
    "rope_odd": ({"llama.rope.dimension_count": (V.UINT32, 63)}, ["rope.dimension_count", "63"]),
    "rope_none": ({"llama.rope.dimension_count": (V.UINT32, 0)}, ["rope.dimension_count", "= 0"]),
    # was ZeroDivisionError in ModelConfig
    "no_heads": ({"llama.attention.head_count": (V.UINT32, 0)}, ["head_count = 0"]),
    "fewer_layers_than_tensors": ({"llama.block_count": (V.UINT32, 1)}, ["blk.1", "block_count"]),
    "more_layers_than_tensors": ({"llama.block_count": (V.UINT32, 3)}, ["blk.2"]),
    "kv_heads": ({"llama.attention.head_count_kv": (V.UINT32, 3)}, ["head_count_kv = 3"]),
    "bos_outside_vocab": ({"tokenizer.ggml.bos_token_id": (V.UINT32, 700)},
                          ["bos_token_id", "700", "outside"]),
    # were TypeErrors in ModelConfig and Tokenizer (found by fuzzing the loader)
    "length_is_text": ({"llama.context_length": (V.ARRAY, ["a", "b"], V.STRING)},
                       ["llama.context_length", "integer", "ARRAY of STRING"]),
    "tokenizer_model_not_text": ({"tokenizer.ggml.model": (V.ARRAY, [1, 2], V.INT32)},
                                 ["tokenizer.ggml.model", "STRING", "ARRAY"]),
    "rope_base_nan": ({"llama.rope.freq_base": (V.FLOAT32, float("nan"))},
                      ["llama.rope.freq_base", "nan", "finite"]),
    # were "Probabilities contain NaN" and "The truth value of an array ... is ambiguous"
    "rope_base_negative": ({"llama.rope.freq_base": (V.INT32, -2**30)},
                           ["llama.rope.freq_base", "-1073741824", "greater than 0"]),
    "add_bos_not_bool": ({"tokenizer.ggml.add_bos_token": (V.ARRAY, [1, 2], V.INT32)},
                         ["tokenizer.ggml.add_bos_token", "BOOL", "ARRAY"]),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_metadata_contradicting_the_tensors(gguf, tmp_path, no_compute, case):
    meta, needles = BAD_METADATA[case]
    path = rewrite(gguf("smollm"), tmp_path / "m.gguf", meta=meta)
    with GGUFFile.open(path) as g, pytest.raises(FormatError):
        check_model_metadata(g)
    with pytest.raises(FormatError) as e:
        load(path)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    one_error_line(run_cli(path, "-p", "hi"), str(path), *needles)


def test_unsupported_architecture_is_named(gguf, tmp_path, no_compute):
    path = rewrite(gguf("smollm"), tmp_path / "m.gguf",
                   meta={"general.architecture": (V.STRING, "gpt2")})
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported; supported: llama"):
        load(path)
    one_error_line(run_cli(path, "-p", "hi"), "'gpt2' is not supported", "llama, qwen2")


@pytest.mark.parametrize("name, error", [("blk.0.ffn_up.weight", UnsupportedModelError),
                                         ("blk.0.attn_norm.weight", QuantizationError)])
def test_unsupported_tensor_type_is_named(gguf, tmp_path, no_compute, name, error):
    """I32 (as many bytes as F32) where a float weight belongs: the tensor, its type, and
    the types there are kernels for."""
    path = rewrite(gguf("smollm"), tmp_path / "m.gguf", types={name: Q.I32})
    with pytest.raises(error) as e:
        load(path)
    for needle in (str(path), name, "I32", "supported: F32, F16"):
        assert needle in str(e.value), (needle, str(e.value))
    one_error_line(run_cli(path, "-p", "hi"), name, "I32", "supported")


def test_context_length_zero_in_the_file(gguf, tmp_path):
    path = rewrite(gguf("smollm"), tmp_path / "m.gguf",
                   meta={"llama.context_length": (V.UINT32, 0)})
    with pytest.raises(ValueError, match="llama.context_length in the file; pass --ctx-size"):
        load(path)
    with load(path, n_ctx=8) as m:  # a context size given overrides it
        assert m.n_ctx == 8


# ---------------------------------------------------------------------------------------
# memory


def test_kv_cache_too_large_for_memory(gguf, no_compute):
    # 2 layers x 10**12 tokens x 4 heads x (64 + 64) x 2 bytes (the default F16 cache)
    with pytest.raises(CacheTooLargeError, match=r"KV cache of 1000000000000 tokens needs "
                                                 r"1,907,348\.63 GiB .* use a smaller --ctx-size$"):
        load(gguf("smollm"), n_ctx=10**12)
    with pytest.raises(CacheTooLargeError, match=r"3,814,697\.27 GiB .* or --cache-type-k/v f16"):
        load(gguf("smollm"), n_ctx=10**12, cache_type_k="f32", cache_type_v="f32")
    one_error_line(run_cli(gguf("smollm"), "-p", "hi", "-c", str(10**12)), "KV cache", "GiB")


def test_kv_cache_allocation_failure_is_reported(monkeypatch):
    """When the free memory is unknown, a failed allocation says the same."""
    from ggforge.runtime import kv_cache

    monkeypatch.setattr(kv_cache, "available_memory", lambda: None)
    with pytest.raises(CacheTooLargeError, match="KV cache of 10000000000000 tokens"):
        KVCache(2, 10**13, 4, 64, 64)
