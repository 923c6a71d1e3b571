"""Request bodies checked field by field: a wrong type, a value out of range or a field we
do not know is an ApiError (HTTP 400) that names the field; nothing a client sends reaches
the model unchecked.

Defaults are llama-server's (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, penalties
off); OpenAI's names map onto the sampler (frequency_penalty / presence_penalty are
llama.cpp's penalty_freq / penalty_present over the last repeat_last_n tokens).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from ggforge.runtime.sampling import SamplerSettings


class ApiError(Exception):
    """An error answered as OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or {401: "authentication_error", 404: "not_found_error",
                             429: "rate_limit_error", 500: "server_error",
                             503: "server_error"}.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object (NaN/Infinity and deep nesting refused)."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError("the request body is not UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise ApiError(f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, not {type(body).__name__}")
    return body


# --- field checks: each returns the value or raises ApiError naming the field -------------

def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def number(lo: float, hi: float) -> Callable:
    def check(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ApiError(f"'{name}' must be a number, got {_type_name(v)}", param=name)
        if not lo <= v <= hi:
            raise ApiError(f"'{name}' must be between {lo} and {hi}, got {v}", param=name)
        return float(v)
    return check


def integer(lo: int, hi: int) -> Callable:
    def check(name: str, v: Any) -> int:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ApiError(f"'{name}' must be an integer, got {_type_name(v)}", param=name)
        if not lo <= v <= hi:
            raise ApiError(f"'{name}' must be between {lo} and {hi}, got {v}", param=name)
        return v
    return check


def boolean(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ApiError(f"'{name}' must be a boolean, got {_type_name(v)}", param=name)
    return v


def string(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ApiError(f"'{name}' must be a string, got {_type_name(v)}", param=name)
    return v


MAX_STOP = 16
MAX_STOP_CHARS = 512


def stop_strings(name: str, v: Any) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ApiError(f"'{name}' must be a string or an array of strings", param=name)
    if len(items) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in items):
        raise ApiError(f"'{name}': at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} "
                       "characters", param=name)
    return tuple(s for s in items if s)


def stream_options(name: str, v: Any) -> dict:
    if not isinstance(v, dict) or set(v) - {"include_usage"}:
        raise ApiError(f"'{name}' must be an object with at most 'include_usage'", param=name)
    if "include_usage" in v:
        boolean(f"{name}.include_usage", v["include_usage"])
    return v


def only(value: Any, what: str) -> Callable:
    """A field accepted only with its default (e.g. n=1); anything else is 'not supported'."""
    def check(name: str, v: Any) -> Any:
        if v != value or type(v) is not type(value):
            raise ApiError(f"'{name}' {what} is not supported yet", param=name,
                           code="unsupported_parameter")
        return v
    return check


def response_format(name: str, v: Any) -> dict:
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise ApiError(f"'{name}' must be an object with a 'type'", param=name)
    if v["type"] != "text":
        raise ApiError(f"'{name}' of type {v['type']!r} (constrained JSON output) is not "
                       "supported yet; only type 'text'", param=name, code="unsupported_parameter")
    return v


SEED_MAX = 2**64 - 1

SAMPLING_FIELDS: dict[str, Callable] = {
    "model": string, "stream": boolean, "stream_options": stream_options, "user": string,
    "temperature": number(0.0, 100.0), "top_p": number(0.0, 1.0), "top_k": integer(-1, 1 << 31),
    "min_p": number(0.0, 1.0), "max_tokens": integer(-1, 1 << 31),
    "max_completion_tokens": integer(-1, 1 << 31), "stop": stop_strings,
    "seed": integer(-1, SEED_MAX), "presence_penalty": number(-2.0, 2.0),
    "frequency_penalty": number(-2.0, 2.0), "repeat_penalty": number(0.0, 100.0),
    "repeat_last_n": integer(-1, 1 << 31), "n": only(1, "other than 1"),
    "logprobs": only(False, "true (log probabilities)"),
}
# Fields of OpenAI's API that this server knows but does not do yet: named in the 400.
NOT_YET = {"tools": "tool calling", "tool_choice": "tool calling", "functions": "tool calling",
           "function_call": "tool calling", "parallel_tool_calls": "tool calling",
           "logit_bias": "logit_bias", "top_logprobs": "log probabilities",
           "best_of": "best_of", "echo": "echo", "suffix": "suffix (infill)",
           "audio": "audio", "modalities": "modalities", "prediction": "predicted outputs"}


@dataclass
class Generation:
    """A checked request: what the engine needs."""
    stream: bool
    include_usage: bool
    max_tokens: int | None       # None: until the context is full
    stop: tuple[str, ...]
    settings: SamplerSettings


def check_fields(body: dict, fields: dict[str, Callable]) -> dict:
    out = {}
    for name, v in body.items():
        if name in fields:
            if v is not None:   # null means "the default", as in OpenAI's API
                out[name] = fields[name](name, v)
        elif name in NOT_YET and v is not None:
            raise ApiError(f"'{name}' ({NOT_YET[name]}) is not supported yet", param=name,
                           code="unsupported_parameter")
        elif name not in NOT_YET:
            raise ApiError(f"unknown field '{name}'", param=name, code="unknown_parameter")
    return out


def generation(f: dict, n_ctx: int) -> Generation:
    max_tokens = f.get("max_completion_tokens", f.get("max_tokens"))
    if max_tokens is not None and max_tokens > n_ctx:
        param = "max_completion_tokens" if "max_completion_tokens" in f else "max_tokens"
        raise ApiError(f"'{param}' {max_tokens} is larger than the context size {n_ctx}",
                       param=param)
    if max_tokens == -1:
        max_tokens = None
    seed = f.get("seed")
    kw = {k: f[k] for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                            "frequency_penalty", "presence_penalty") if k in f}
    if "repeat_last_n" in f:
        kw["repeat_last_n"] = f["repeat_last_n"]
    settings = SamplerSettings(**kw, seed=None if seed in (None, -1) else seed)
    opts = f.get("stream_options") or {}
    return Generation(stream=f.get("stream", False), include_usage=bool(opts.get("include_usage")),
                      max_tokens=max_tokens, stop=f.get("stop", ()), settings=settings)


# --- the endpoints' own fields ------------------------------------------------------------

ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_MESSAGES = 4096


def _content(name: str, v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        parts = []
        for i, p in enumerate(v):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                kind = p.get("type") if isinstance(p, dict) else _type_name(p)
                raise ApiError(f"'{name}[{i}]': only text parts are supported (got {kind!r})",
                               param=name)
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(f"'{name}' must be a string or an array of text parts", param=name)


def messages(name: str, v: Any) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise ApiError(f"'{name}' must be a non-empty array of messages", param=name)
    if len(v) > MAX_MESSAGES:
        raise ApiError(f"'{name}': at most {MAX_MESSAGES} messages", param=name)
    out = []
    for i, msg in enumerate(v):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(f"'{where}' must be an object", param=where)
        for k in msg:
            if k not in ("role", "content", "name"):
                raise ApiError(f"'{where}.{k}' is not supported", param=f"{where}.{k}")
        role = msg.get("role")
        if role not in ROLES:
            raise ApiError(f"'{where}.role' must be one of {', '.join(ROLES)}", param=f"{where}.role")
        m = {"role": "system" if role == "developer" else role,
             "content": _content(f"{where}.content", msg.get("content"))}
        if "name" in msg:
            m["name"] = string(f"{where}.name", msg["name"])
        out.append(m)
    return out


def prompt(name: str, v: Any) -> str | list[int]:
    """A string, one string in an array, or token ids (llama-server's extension)."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return v
    if isinstance(v, list) and len(v) > 1:
        raise ApiError(f"'{name}': one prompt per request (several are not supported yet)",
                       param=name, code="unsupported_parameter")
    raise ApiError(f"'{name}' must be a string or an array of token ids", param=name)


CHAT_FIELDS = {**SAMPLING_FIELDS, "messages": messages, "response_format": response_format}
COMPLETION_FIELDS = {**SAMPLING_FIELDS, "prompt": prompt}


def required(f: dict, name: str) -> Any:
    if name not in f:
        raise ApiError(f"'{name}' is required", param=name, code="missing_parameter")
    return f[name]
