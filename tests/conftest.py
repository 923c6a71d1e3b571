"""Shared fixtures: tiny models built once per session, and the error table printed at the end."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Without a GPU, the GPU backend's Triton kernels run in Triton's interpreter on the CPU;
# the switch must be set before anything imports triton.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (model_factory, oracles)

# (architecture, file type) -> relative logit error; printed at the end as tables
# (a type ending in "*" is measured against llama.cpp on the F32 file, not transformers)
LOGIT_ERRORS: dict[tuple[str, str], float] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")
    parser.addoption("--fuzz-cases", type=int, default=300,
                     help="mutated files per reader in tests/test_fuzz_*.py (long run: 20000)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """tiny_model(name, dtype='float32') -> folder of a tiny HF model, built once."""
    from model_factory import build_model

    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, dtype: str = "float32") -> Path:
        key = (name, dtype)
        if key not in cache:
            cache[key] = build_model(name, tmp_path_factory.mktemp(f"{name}-{dtype}"), dtype=dtype)
        return cache[key]

    return get


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    tables: dict[str, dict[tuple[str, str], float]] = {}
    for (arch, ftype), err in LOGIT_ERRORS.items():
        title = ("llama.cpp logits on each mix vs on the F32 file: relative RMS error"
                 if ftype.endswith("*") else
                 "llama.cpp logits vs transformers: relative RMS error ||llama - hf|| / ||hf||")
        tables.setdefault(title, {})[(arch, ftype.rstrip("*"))] = err
    tr = terminalreporter
    for title, errs in tables.items():
        archs = sorted({a for a, _ in errs})
        types = list(dict.fromkeys(t for _, t in errs))
        tr.section(title)
        tr.write_line("arch".ljust(10) + "".join(t.rjust(10) for t in types))
        for a in archs:
            cells = [f"{errs[(a, t)]:.2e}" if (a, t) in errs else "-" for t in types]
            tr.write_line(a.ljust(10) + "".join(c.rjust(10) for c in cells))
