"""Chat templates from the file, rendered only in jinja2's ImmutableSandboxedEnvironment.

`tokenizer.chat_template` comes from a stranger's file: it is rendered in the sandbox
(CVE-2024-34359 was llama-cpp-python rendering it outside one), and a template that
reaches for Python internals fails with ChatTemplateError, not with code running.
"""
from __future__ import annotations

import datetime
from typing import Any, Sequence

import jinja2
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ggforge.formats.errors import FormatError


class ChatTemplateError(FormatError):
    """A chat template that is missing, malformed, or tries to leave the sandbox."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        undefined=jinja2.ChainableUndefined)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    env.filters["tojson"] = _tojson
    return env


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    import json

    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


class ChatTemplate:
    """A compiled template plus the special tokens it may refer to."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        try:
            self._template = _environment().from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"tokenizer.chat_template does not compile: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_metadata(cls, metadata: dict, tokens: Sequence[str] | None = None) -> "ChatTemplate":
        source = metadata.get("tokenizer.chat_template")
        if not isinstance(source, str) or not source:
            raise ChatTemplateError("the file has no tokenizer.chat_template; use `ggforge run` "
                                    "with a plain prompt instead")
        tokens = tokens if tokens is not None else metadata.get("tokenizer.ggml.tokens") or []

        def tok(key: str) -> str:
            i = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

        return cls(source, bos_token=tok("bos"), eos_token=tok("eos"))

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except SecurityError as e:
            raise ChatTemplateError(f"the chat template tried something the sandbox forbids: {e}") from None
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
