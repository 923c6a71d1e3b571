"""Errors of ours become one line on stderr and a non-zero exit, never a traceback.

A kill that can be caught (SIGTERM from `kill` or a service manager, SIGHUP when the
terminal closes) is turned into an exception, like Ctrl-C, so that the clean-up of a
half-written output runs (formats/atomic.py) before the process exits with 128 + signal.
"""
from __future__ import annotations

import contextlib
import functools
import signal
import sys
from typing import Any, Callable, Iterator

import click

# FormatError, QuantizationError, UnsupportedModelError, ContextFullError, ChatTemplateError
# and bad-argument errors of the runtime are all ValueErrors; OSError covers the disk.
EXPECTED_ERRORS = (ValueError, OSError)
CAUGHT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """A caught termination signal (a BaseException, as KeyboardInterrupt: `except
    Exception` must not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    for sig in CAUGHT_SIGNALS:  # one clean-up: a second signal must not interrupt it
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    try:
        previous = {sig: signal.signal(sig, _raise_terminated) for sig in CAUGHT_SIGNALS}
    except ValueError:  # not the main thread: signals are not ours to handle
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def one_line_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _signals_raise():
                return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except EXPECTED_ERRORS as e:
            msg = str(e).strip().replace("\n", " ") or type(e).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Terminated as e:
            click.echo(f"terminated ({signal.Signals(e.signum).name})", err=True)
            sys.exit(128 + e.signum)
    return wrapper
