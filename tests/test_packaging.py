"""The wheel holds every module of the source tree and each imports from it.

pyproject.toml lists the packages by hand, and an editable install (the README's) reads
the source tree, so a subpackage missing from that list would pass every other test and
break every user's `pip install ggforge`. Here the wheel is built, installed into a fresh
venv (no dependencies fetched: it sees this interpreter's packages, not this checkout),
and every module is imported from there.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("formats", "convert", "runtime", "tools")


def _source_modules() -> set[str]:
    mods = {"ggforge"}
    for top in PACKAGE_DIRS:
        for f in (ROOT / top).rglob("*.py"):
            rel = f.relative_to(ROOT).with_suffix("")
            parts = ["ggforge", *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods.add(".".join(parts))
    return mods


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy: setuptools would reuse a build/ folder left in the checkout, with the
    # modules of an earlier build in it
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "tests", "models", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, cwd=out)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("ggforge-*.whl")
    return whl


def test_wheel_holds_every_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names
                if n.startswith("ggforge/") and n.endswith(".py")}
    missing = sorted(_source_modules() - in_wheel)
    assert not missing, f"not in the wheel (pyproject.toml's package list?): {missing}"
    assert not any(n.startswith("ggforge/tests/") or n.startswith("ggforge/scripts/") for n in names)


def test_wheel_holds_the_default_calibration_text(wheel):
    """Package data (pyproject.toml's package-data): `quantize --calibrate` without a file
    reads convert/calibration/default.txt from the installed package."""
    z = zipfile.ZipFile(wheel)
    for name in ("default.txt", "README.md"):
        path = f"ggforge/convert/calibration/{name}"
        assert path in z.namelist(), f"{path} is not in the wheel (pyproject.toml's package-data?)"
        assert z.read(path) == (ROOT / "convert" / "calibration" / name).read_bytes()


def test_every_module_imports_from_the_installed_wheel(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    mods = sorted(m for m in _source_modules() if not m.endswith(".__main__"))  # runs the CLI
    code = ("import importlib, sys, ggforge\n"
            f"assert ggforge.__file__.startswith({str(venv)!r}), ggforge.__file__\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            "from ggforge.convert.calibrate import DEFAULT_TEXT\n"   # package data, installed
            f"assert str(DEFAULT_TEXT).startswith({str(venv)!r}) and DEFAULT_TEXT.stat().st_size\n"
            "print(len(sys.modules))\n")
    r = subprocess.run([str(py), "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(venv / "bin" / "ggforge"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "quantize" in r.stdout, r.stderr[-2000:]


def test_ci_runs_exactly_the_readme_setup_commands():
    """.ci/run is the README's two set-up commands, in order, and nothing else (after cd)."""
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set-up"):readme.index("\n## ", readme.index("## Set-up") + 1)]
    commands = [line.strip() for line in setup.splitlines() if line.startswith("    ")]
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    steps = [line for line in script if line and not line.startswith(("#", "set ", "cd "))]
    assert len(commands) == 2 and steps == commands
