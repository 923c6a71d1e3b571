"""Writing a file so that nothing the user had is lost.

`atomic_output` writes to `OUTPUT.partial` beside the output, flushes and fsyncs, lets the
caller validate the bytes, then renames onto the final name. On any exception, Ctrl-C
included, the partial file is removed and an existing output is left untouched.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

from ggforge.formats.errors import FormatError

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
    try:
        with open(tmp, "wb") as f:
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
