"""Errors of ours become one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

# FormatError, QuantizationError, UnsupportedModelError, ContextFullError, ChatTemplateError
# and bad-argument errors of the runtime are all ValueErrors; OSError covers the disk.
EXPECTED_ERRORS = (ValueError, OSError)


def one_line_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
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
    return wrapper
