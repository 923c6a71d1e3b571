"""`ggforge inspect` as the real executable on broken GGUF and safetensors files (the shared
parts: fuzz_helpers.py)."""
from __future__ import annotations

import random
import struct
import subprocess
import sys
from pathlib import Path

from fuzz_helpers import build_gguf, model_spec


def test_inspect_subprocess_one_error_line(tmp_path):
    """The real executable: exit status 1, one `error:` line, no traceback."""
    rng = random.Random("subprocess")
    bad = {"truncated.gguf": build_gguf(*model_spec(rng))[:200],
           "bad.safetensors": struct.pack("<Q", 2**63) + b"{}"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        p = subprocess.run([sys.executable, "-m", "ggforge.tools", "inspect", str(tmp_path / name)],
                           capture_output=True, text=True, timeout=60, env=subprocess_env(),
                           check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
        assert name in lines[0] and p.stdout == ""


def subprocess_env() -> dict:
    """This environment, with the folder ggforge was imported from first on the path."""
    import os

    import ggforge

    env = dict(os.environ)
    root = str(Path(ggforge.__path__[0]).parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
