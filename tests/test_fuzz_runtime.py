"""Fuzzing the runtime's loader: a well-formed file whose metadata and tensors lie (the
shared parts: fuzz_helpers.py)."""
from __future__ import annotations

import random
from pathlib import Path

import fuzz_helpers
import numpy as np
from fuzz_helpers import Budget, _nbytes, build_gguf, model_spec, spec_mutation
from ggforge.formats.errors import FormatError, UnsupportedModelError
from gguf import GGMLQuantizationType as Q

n_cases = fuzz_helpers.n_cases  # the fixture (--fuzz-cases): pytest finds it by this name


def runtime_case(rng: random.Random, mutate: bool = True) -> tuple[bytes, str]:
    """The tiny model in F32, with 0 to 2 spec mutations. Weights are encodings of small
    finite values in whatever type they end up with, so that a NaN can only come from the
    metadata (random Q8_0 bytes hold NaN scales: NaN weights, NaN logits, as in llama.cpp)."""
    from ggforge.formats.quants import quantize

    kvs, tensors = model_spec(rng)
    tensors = [(n, s, Q.F32, b"") for n, s, _, _ in tensors if n != "empty.weight"]
    what = [spec_mutation(rng, kvs, tensors) for _ in range(rng.randint(0, 2) if mutate else 0)]
    np_rng = np.random.default_rng(rng.randrange(2**32))

    def finite(shape, qtype) -> bytes:
        if qtype == Q.I32 or _nbytes(shape, qtype) == 0:
            return bytes(_nbytes(shape, qtype))
        x = (np_rng.standard_normal(shape) * 0.1).astype(np.float32)
        return quantize(x.reshape(-1, shape[-1]), qtype.name).tobytes()

    tensors = [(n, s, t, finite(s, t)) for n, s, t, _ in tensors]
    return build_gguf(kvs, tensors), "; ".join(what) or "none"


def run_model(path: Path) -> str:
    """load, eval and generate: our errors (all ValueErrors, one line in the CLI) or
    finite logits; a plain ValueError ("invalid literal", "truth value ... ambiguous",
    "Probabilities contain NaN") is not a clear error and fails too."""
    from ggforge.formats.errors import QuantizationError
    from ggforge.runtime.generate import load
    from ggforge.runtime.kv_cache import CacheTooLargeError, ContextFullError
    from ggforge.runtime.sampling import SamplerSettings

    ours = (FormatError, UnsupportedModelError, QuantizationError, ContextFullError,
            CacheTooLargeError)
    try:
        with load(path, n_ctx=16) as m:
            logits = m.eval([1, 2, 3])
            assert logits.shape == (3, m.model.config.n_vocab) and np.isfinite(logits).all()
            list(m.generate_tokens([1, 2], max_tokens=2,
                                   settings=SamplerSettings(temperature=0.0)))
    except ours:
        return "rejected"
    return "ran"


def test_fuzz_runtime_loader(tmp_path, n_cases):
    path = tmp_path / "model.gguf"
    path.write_bytes(runtime_case(random.Random("warm-up"), mutate=False)[0])
    assert run_model(path) == "ran"  # kernels compiled or loaded from numba's cache, unbudgeted
    outcomes = {"ran": 0, "rejected": 0}
    budget = Budget()
    for i in range(max(20, n_cases // 2)):
        data, what = runtime_case(random.Random(f"runtime-{i}"))
        path.write_bytes(data)
        where = f"runtime case {i} ({what})"
        try:
            outcomes[budget.case(where, run_model, path)] += 1
        except BaseException:
            (tmp_path / f"failed-{i}.gguf").write_bytes(data)
            raise
    print(budget.report("runtime loader cases", outcomes))
    assert outcomes["ran"] and outcomes["rejected"]
