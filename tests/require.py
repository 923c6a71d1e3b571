"""The test oracles (llama-cpp-python, libggml inside it, transformers, torch, Triton) are
installed by the README's install command. On a developer's machine without one, its
tests skip; on CI (CI set, as .ci/run runs) a missing oracle fails the run instead of
silently skipping every comparison."""
from __future__ import annotations

import importlib
import os

import pytest

ON_CI = bool(os.environ.get("CI"))


def missing(what: str) -> None:
    """Skip the calling test (or module), or fail on CI, for the oracle ``what``."""
    if ON_CI:
        pytest.fail(f"{what} is missing on CI: the README's install command installs it",
                    pytrace=False)
    pytest.skip(f"{what} is not installed", allow_module_level=True)


def require(module: str):
    """``import module`` for an oracle, as pytest.importorskip but failing on CI."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(f"{module} ({e})")
