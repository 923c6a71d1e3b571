"""Faults while `quantize` writes (RELIABILITY.md, "Writing files: nothing lost").

Real faults on a real process where we can make them: SIGKILL, Ctrl-C (SIGINT), SIGTERM
and SIGHUP sent to `python -m ggforge.tools quantize` while its `.partial` file is being
written; a disk that fills up (a small tmpfs); a folder that cannot be written (chmod, or
a read-only mount when running as root, whom chmod does not stop). Afterwards: nothing at
the output name (or the old output, byte for byte and with its old mtime), no `.partial`
left where the process could remove it, the input untouched. After SIGKILL the partial
file stays (nothing can run): the next run to the same output removes it, says so, and
writes the same bytes as a run that was never interrupted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggforge.convert.pipeline import convert
from ggforge.formats import atomic
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.tools.cli import cli

N_LAYERS = 6  # the tiny model has 2: more layers keep the writer busy for longer


def subprocess_env() -> dict:
    """This environment, with the folder ggforge was imported from first on the path."""
    import ggforge

    env = dict(os.environ)
    root = str(Path(ggforge.__path__[0]).parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def big_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny llama with N_LAYERS layers (copies of its two, perturbed)."""
    from safetensors.numpy import load_file, save_file

    folder = Path(shutil.copytree(tiny_model("smollm"), tmp_path_factory.mktemp("big") / "Big"))
    tensors = load_file(folder / "model.safetensors")
    rng = np.random.default_rng(0)
    for name in [n for n in tensors if n.startswith("model.layers.")]:
        i = int(name.split(".")[2])
        for j in range(i + 2, N_LAYERS, 2):
            t = tensors[name]
            noise = rng.standard_normal(t.shape).astype(t.dtype) * 0.01
            tensors[name.replace(f".{i}.", f".{j}.", 1)] = t + noise
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = N_LAYERS
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def reference(big_model, tmp_path_factory) -> bytes:
    """The Q8_0 file of big_model from a run that nothing interrupted."""
    out = tmp_path_factory.mktemp("ref") / "ref.gguf"
    convert(big_model, "q8_0", out)
    return out.read_bytes()


def snapshot(*folders: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under the folders: sha256, mtime in ns, size."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                st = p.stat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[str(p)] = (digest, st.st_mtime_ns, st.st_size)
    return out


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


def quantize_args(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ggforge.tools", "quantize", str(src), "q8_0", "-o", str(out),
            "--no-progress", *extra]


def signal_mid_write(src: Path, out: Path, sig: int, *extra: str) -> subprocess.CompletedProcess:
    """Start quantize, send `sig` as soon as its partial file exists, wait for the end."""
    partial = atomic.partial_path(out)
    # SIGINT at its default in the child: a shell without job control starts background
    # jobs (a CI runner's `cmd &`) with SIGINT ignored, which Python then keeps ignoring
    proc = subprocess.Popen(quantize_args(src, out, *extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not partial.exists():
            assert proc.poll() is None, f"quantize ended before writing: {proc.communicate()}"
            assert time.monotonic() < deadline, "no partial file after 120 s"
            time.sleep(0.001)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def one_error_line(stderr: str, *needles: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


# ---------------------------------------------------------------------------------------
# signals


def test_sigkill_leaves_a_partial_that_the_next_run_replaces(big_model, reference, tmp_path):
    out = tmp_path / "out.gguf"
    before = snapshot(big_model)
    r = signal_mid_write(big_model, out, signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL
    # Killed mid-write: the partial stays (nothing could run), the output name stays empty.
    assert partials(tmp_path) == ["out.gguf.partial"] and not out.exists()
    stale = atomic.partial_path(out).read_bytes()
    assert len(stale) < len(reference) or stale != reference
    p = subprocess.run([sys.executable, "-m", "ggforge.tools", "inspect", str(out)],
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert p.returncode == 1
    one_error_line(p.stderr, str(out), "no such file")
    # The next run to the same output removes the partial, says so, and writes the file a
    # run that was never interrupted writes.
    p = subprocess.run(quantize_args(big_model, out), capture_output=True, text=True,
                       env=subprocess_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    assert "out.gguf.partial: removing a partial file left by an interrupted run" in p.stderr
    assert partials(tmp_path) == [] and out.read_bytes() == reference
    assert snapshot(big_model) == before


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGHUP, 129, "terminated (SIGHUP)")])
def test_catchable_signal_mid_write_cleans_up(big_model, tmp_path, sig, code, word):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"the model I had before")
    before = snapshot(big_model, tmp_path)
    r = signal_mid_write(big_model, out, sig, "--force")
    assert r.returncode == code, r.stderr
    assert r.stderr.strip().splitlines()[-1] == word and "Traceback" not in r.stderr
    assert partials(tmp_path) == []
    assert snapshot(big_model, tmp_path) == before  # the old output: same bytes, same mtime


# ---------------------------------------------------------------------------------------
# the disk


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A small RAM disk at `folder`; skips where mounting is not allowed."""
    folder.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}); "
                    "test_cli.py's simulated ENOSPC stands in")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_full_disk_is_refused_before_writing(big_model, tmp_path):
    """The real free-space check on a real small disk: refused up front, in MiB."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "out.gguf"
        out.write_bytes(b"old")
        before = snapshot(big_model, disk)
        p = subprocess.run(quantize_args(big_model, out, "--force"), capture_output=True,
                           text=True, env=subprocess_env(), timeout=300)
        assert p.returncode == 1
        one_error_line(p.stderr, "not enough free disk space", "MiB")
        assert partials(disk) == [] and snapshot(big_model, disk) == before


def test_disk_filling_up_while_writing(tiny_model, tmp_path, monkeypatch):
    """A real ENOSPC from the kernel mid-write (the up-front check is skipped, as when
    something else fills the disk meanwhile): one error line, nothing left behind."""
    src = tiny_model("smollm")
    monkeypatch.setattr(atomic, "check_free_space", lambda folder, needed: None)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "out.gguf"
        out.write_bytes(b"old")
        before = snapshot(src, disk)
        r = CliRunner().invoke(cli, ["quantize", str(src), "q8_0", "-o", str(out), "--force",
                                     "--no-progress"])
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
        one_error_line(r.stderr, str(out), "could not write", "No space left on device")
        assert partials(disk) == [] and snapshot(src, disk) == before
        assert shutil.disk_usage(disk).used < 64 << 10  # the partial's blocks were freed


def test_unwritable_folder_chmod(tiny_model, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root, whom a 0o500 folder does not stop "
                    "(test_read_only_folder covers this case for root)")
    src, folder = tiny_model("smollm"), tmp_path / "ro"
    folder.mkdir()
    (folder / "out.gguf").write_bytes(b"old")
    folder.chmod(0o500)
    try:
        before = snapshot(src, folder)
        r = CliRunner().invoke(cli, ["quantize", str(src), "q8_0", "-o", str(folder / "out.gguf"),
                                     "--force", "--no-progress"])
        assert r.exit_code == 1
        one_error_line(r.stderr, "not writable")
        assert partials(folder) == [] and snapshot(src, folder) == before
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("bypass_access_check", [False, True])
def test_read_only_folder(tiny_model, tmp_path, monkeypatch, bypass_access_check):
    """A read-only mount stops root too. With the up-front access check bypassed, the
    open() itself fails (EROFS) and is reported the same way."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root; test_unwritable_folder_chmod covers this user")
    src = tiny_model("smollm")
    with tmpfs(tmp_path / "ro", "64m") as folder:  # room enough for the free-space check
        (folder / "out.gguf").write_bytes(b"old")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        if bypass_access_check:
            monkeypatch.setattr(atomic.os, "access", lambda path, mode: True)
        before = snapshot(src, folder)
        r = CliRunner().invoke(cli, ["quantize", str(src), "q8_0", "-o", str(folder / "out.gguf"),
                                     "--force", "--no-progress"])
        assert r.exit_code == 1
        one_error_line(r.stderr, str(folder / "out.gguf"),
                       "Read-only file system" if bypass_access_check else "not writable")
        assert partials(folder) == [] and snapshot(src, folder) == before


# ---------------------------------------------------------------------------------------
# what a killed run left behind


def test_stale_partial_link_is_not_written_through(tiny_model, tmp_path):
    """A partial name that is a symlink (left there, or planted) is removed, never
    opened: the file it points to keeps its bytes."""
    src, out = tiny_model("smollm"), tmp_path / "out.gguf"
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"do not truncate me")
    atomic.partial_path(out).symlink_to(precious)
    before = snapshot(src) | snapshot(tmp_path)
    r = CliRunner().invoke(cli, ["quantize", str(src), "q8_0", "-o", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert precious.read_bytes() == b"do not truncate me"
    assert partials(tmp_path) == []
    with GGUFFile.open(out) as g:
        assert g.metadata["general.architecture"] == "llama"
    after = snapshot(src) | snapshot(tmp_path)
    del before[str(atomic.partial_path(out))]  # the link: gone (rglob followed it)
    assert {k: v for k, v in after.items() if k != str(out)} == before


def test_stale_partial_folder_is_reported(tiny_model, tmp_path):
    src, out = tiny_model("smollm"), tmp_path / "out.gguf"
    atomic.partial_path(out).mkdir()
    r = CliRunner().invoke(cli, ["quantize", str(src), "q8_0", "-o", str(out), "--no-progress"])
    assert r.exit_code == 1
    one_error_line(r.stderr, "out.gguf.partial", "folder is in the way")
    assert not out.exists() and atomic.partial_path(out).is_dir()


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_output_that_is_a_link_to_the_input_is_refused(tiny_model, tmp_path, link):
    """Another name for the input (a hard link: os.path.samefile; a symlink: the real
    path) is the input: refused, even with --force, and the input keeps its bytes."""
    src = tiny_model("smollm")
    out = tmp_path / "out.gguf"
    (os.link if link == "hard" else os.symlink)(src / "model.safetensors", out)
    before = snapshot(src)
    r = CliRunner().invoke(cli, ["quantize", str(src), "q8_0", "-o", str(out), "--force",
                                 "--no-progress"])
    assert r.exit_code == 1
    one_error_line(r.stderr, str(out), "the output is the input")
    assert snapshot(src) == before and partials(tmp_path) == []
