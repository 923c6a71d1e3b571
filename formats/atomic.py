"""Writing a file so that nothing the user had is lost.

`atomic_output` writes to `OUTPUT.partial` beside the output, flushes and fsyncs, lets the
caller validate the bytes, then renames onto the final name. On any exception, Ctrl-C
included (and SIGTERM/SIGHUP, which the CLI turns into one: tools/errors.py), the partial
file is removed and an existing output is left untouched. Only SIGKILL or a crash leaves
the partial file; the next run to the same output removes it with a warning.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

from ggforge.formats.errors import FormatError

log = logging.getLogger(__name__)

MARGIN = 16 << 20  # free space kept beyond the planned size


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def check_output(output: Path, inputs: Sequence[Path], *, force: bool) -> None:
    """Refuse an output that is one of the inputs, or that exists without `force`."""
    out_real = os.path.realpath(output)
    for src in inputs:
        same = os.path.realpath(src) == out_real
        if not same and output.exists() and Path(src).exists():
            same = os.path.samefile(src, output)
        if same:
            raise FormatError(f"{output}: the output is the input file; choose another output")
    if output.exists() and not force:
        raise FormatError(f"{output}: file exists; pass --force to overwrite it")
    if output.exists() and output.is_dir():
        raise FormatError(f"{output}: is a folder; give a file name")
    _output_folder(output)


def _output_folder(output: Path) -> Path:
    """The folder the output goes to; FormatError when it does not exist."""
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise FormatError(f"{output}: folder {folder} does not exist")
    return folder


def check_free_space(folder: Path, needed: int) -> None:
    """Fail before writing when the folder's disk cannot hold `needed` bytes."""
    free = shutil.disk_usage(folder).free
    if free < needed + MARGIN:
        raise FormatError(f"{folder}: not enough free disk space: the output needs "
                          f"{_mib(needed)} MiB (+{_mib(MARGIN)} MiB margin), {_mib(free)} MiB free")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f}"


def _remove_stale(tmp: Path) -> None:
    """A partial file at our name is left from a run that was killed (SIGKILL, power
    loss): it is never an output, so remove it, and say so."""
    if not os.path.lexists(tmp):
        return
    if tmp.is_dir() and not tmp.is_symlink():
        raise FormatError(f"{tmp}: a folder is in the way of the partial output file; "
                          "remove or rename it")
    log.warning("%s: removing a partial file left by an interrupted run", tmp)
    try:
        tmp.unlink()
    except OSError as e:
        raise FormatError(f"{tmp}: a partial file left by an interrupted run is in the way "
                          f"and cannot be removed: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_output(output: Path, *, planned_size: int | None = None,
                  validate: Callable[[Path], None] | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file object; on success the bytes appear at `output` at once."""
    output = Path(output)
    folder = _output_folder(output)
    if not os.access(folder, os.W_OK):
        raise FormatError(f"{output}: folder {folder} is not writable")
    if planned_size is not None:
        check_free_space(folder, planned_size)
    tmp = partial_path(output)
    _remove_stale(tmp)
    try:
        with open(tmp, "xb") as f:  # exclusive: never written through a link left there
            yield f
            f.flush()
            os.fsync(f.fileno())
        if validate is not None:
            validate(tmp)
        os.replace(tmp, output)
    except BaseException as e:  # Ctrl-C and SystemExit too: never leave a partial file
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise FormatError(f"{output}: could not write: {e.strerror or e}") from e
        raise
