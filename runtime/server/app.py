"""The OpenAI-compatible HTTP API over one LoadedModel, as a Starlette (ASGI) application.

Why Starlette + uvicorn: Starlette is a small, typed, well-kept ASGI toolkit (Encode; the
base of FastAPI) with no dependencies beyond anyio, and uvicorn's plain install is pure
Python (h11): both install from PyPI everywhere. We need nothing of a bigger framework:
request bodies are checked by hand (requests.py) so that every field and error message is
ours, and the event stream is a small ASGI response that watches for the client leaving.

Endpoints: POST /v1/chat/completions, POST /v1/completions (``stream`` as server-sent
events ending ``data: [DONE]``), GET /v1/models, GET /health, POST /tokenize and
/detokenize (llama-server's shapes). Errors are OpenAI's {"error": {...}} bodies.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ggforge.runtime.chat import ChatTemplateError
from ggforge.runtime.generate import LoadedModel
from ggforge.runtime.server import requests as rq
from ggforge.runtime.server.engine import Engine, Job, QueueFullError
from ggforge.runtime.server.requests import ApiError

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 2 << 20      # 2 MiB of JSON: far more than a full context of text
    max_waiting: int = 32              # requests queued behind the running one; more: 429


def _error(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class ApiKeyMiddleware:
    """With an API key, every request but GET /health needs ``Authorization: Bearer KEY``."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                e = ApiError("invalid or missing API key (send 'Authorization: Bearer KEY')",
                             status=401, code="invalid_api_key")
                return await _error(e)(scope, receive, send)
        await self.app(scope, receive, send)


class EventStream:
    """Server-sent events from an async iterator of JSON-able objects, then [DONE]. The
    client leaving (http.disconnect, or a failed send) cancels the job."""

    def __init__(self, chunks: AsyncIterator[dict], job: Job):
        self.chunks, self.job = chunks, job

    async def __call__(self, scope, receive, send):
        watcher = asyncio.create_task(_watch_disconnect(receive, self.job))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            async for chunk in self.chunks:
                if self.job.cancelled.is_set():
                    break
                data = f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()
                await send({"type": "http.response.body", "body": data, "more_body": True})
            if not self.job.cancelled.is_set():
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                            "more_body": False})
        except OSError:
            pass
        finally:
            self.job.cancel()
            watcher.cancel()


async def _watch_disconnect(receive, job: Job) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def read_json(request: Request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(f"the request body is larger than {limit} bytes", status=413,
                       code="request_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ApiError(f"the request body is larger than {limit} bytes", status=413,
                           code="request_too_large")
        chunks.append(chunk)
    return rq.parse_json(b"".join(chunks))


class Api:
    """The routes' handlers, bound to one model and its engine."""

    def __init__(self, model: LoadedModel, settings: ServerSettings):
        self.model, self.s = model, settings
        self.engine = Engine(model, max_waiting=settings.max_waiting)
        self.created = int(time.time())

    # --- generation --------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        f = rq.check_fields(await read_json(request, self.s.max_body_bytes), rq.CHAT_FIELDS)
        messages = rq.required(f, "messages")
        gen = rq.generation(f, self.model.n_ctx)
        try:
            ids = await asyncio.to_thread(self.model.chat_prompt, messages)
        except ChatTemplateError as e:
            raise ApiError(f"{e}", param="messages") from None
        return await self._respond(request, ids, gen, chat=True)

    async def completions(self, request: Request):
        f = rq.check_fields(await read_json(request, self.s.max_body_bytes), rq.COMPLETION_FIELDS)
        prompt = rq.required(f, "prompt")
        gen = rq.generation(f, self.model.n_ctx)
        if isinstance(prompt, str):
            ids = await asyncio.to_thread(self.model.tokenize, prompt)
            if not ids:
                raise ApiError("'prompt' is empty and this model adds no BOS token: nothing to "
                               "evaluate", param="prompt")
        else:
            ids = self._check_ids(prompt, "prompt")
        return await self._respond(request, ids, gen, chat=False)

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        n_vocab = self.model.model.config.n_vocab
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise ApiError(f"'{param}': token id {bad} is outside the vocabulary "
                           f"(0..{n_vocab - 1})", param=param)
        return ids

    async def _respond(self, request: Request, ids: list[int], gen: rq.Generation, *, chat: bool):
        n_ctx = self.model.n_ctx
        if len(ids) > n_ctx:
            raise ApiError(f"the prompt is {len(ids)} tokens, larger than the context size "
                           f"{n_ctx}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        max_tokens = gen.max_tokens if gen.max_tokens is not None else n_ctx - len(ids) + 1
        job = Job(list(ids), max_tokens, gen.settings, gen.stop)
        try:
            self.engine.submit(job)
        except QueueFullError as e:
            raise ApiError(str(e), status=429, code="queue_full") from None
        fmt = _Format(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                      int(time.time()), self.s.model_name)
        if gen.stream:
            return EventStream(fmt.chunks(job, gen.include_usage), job)
        watcher = asyncio.create_task(_watch_disconnect(request.receive, job))
        try:
            text, finish, usage, timings, err = [], None, None, None, None
            while True:
                ev = await job.events.get()
                if ev[0] == "text":
                    text.append(ev[1])
                elif ev[0] == "error":
                    err = ev[1]
                    break
                else:
                    _, finish, usage, timings = ev
                    break
        finally:
            watcher.cancel()
            job.cancel()
        if err is not None:
            raise ApiError(err, status=500)
        return JSONResponse(fmt.whole("".join(text), finish, usage, timings))

    # --- the rest ------------------------------------------------------------------------

    async def models(self, request: Request):
        m = self.model
        meta = {"n_ctx": m.n_ctx, "n_vocab": m.model.config.n_vocab,
                "n_ctx_train": m.model.config.n_ctx_train}
        return JSONResponse({"object": "list", "data": [
            {"id": self.s.model_name, "object": "model", "created": self.created,
             "owned_by": "ggforge", "meta": meta}]})

    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "busy": self.engine.busy,
                             "waiting": self.engine.waiting})

    async def tokenize(self, request: Request):
        f = rq.check_fields(await read_json(request, self.s.max_body_bytes), {
            "content": rq.string, "add_special": rq.boolean, "parse_special": rq.boolean})
        content = rq.required(f, "content")
        ids = await asyncio.to_thread(self.model.tokenizer.encode, content,
                                      add_special=f.get("add_special", False),
                                      parse_special=f.get("parse_special", True))
        return JSONResponse({"tokens": ids})

    async def detokenize(self, request: Request):
        f = rq.check_fields(await read_json(request, self.s.max_body_bytes), {"tokens": _token_list})
        ids = self._check_ids(rq.required(f, "tokens"), "tokens")
        text = await asyncio.to_thread(self.model.tokenizer.decode, ids)
        return JSONResponse({"content": text})


def _token_list(name: str, v: Any) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise ApiError(f"'{name}' must be an array of integers", param=name)
    return v


@dataclass
class _Format:
    """OpenAI's response and chunk objects for one request."""
    chat: bool
    id: str
    created: int
    model: str

    def _head(self, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "ggforge"}

    def _choice(self, text: str | None, finish: str | None, *, delta: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if delta:
            return {"index": 0, "delta": {} if text is None else {"content": text},
                    "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish}

    def whole(self, text: str, finish: str, usage: dict, timings: dict) -> dict:
        return {**self._head(False), "choices": [self._choice(text, finish, delta=False)],
                "usage": usage, "timings": timings}

    async def chunks(self, job: Job, include_usage: bool) -> AsyncIterator[dict]:
        if self.chat:
            first = self._choice("", None, delta=True)
            first["delta"] = {"role": "assistant", "content": ""}
            yield {**self._head(True), "choices": [first]}
        while True:
            ev = await job.events.get()
            if ev[0] == "text":
                yield {**self._head(True), "choices": [self._choice(ev[1], None, delta=True)]}
            elif ev[0] == "error":
                yield ApiError(ev[1], status=500).body()
                return
            else:
                _, finish, usage, timings = ev
                yield {**self._head(True), "choices": [self._choice(None, finish, delta=True)]}
                if include_usage:
                    yield {**self._head(True), "choices": [], "usage": usage, "timings": timings}
                return


def create_app(model: LoadedModel, settings: ServerSettings) -> Starlette:
    """The ASGI application serving ``model``; its engine's worker thread starts now."""
    api = Api(model, settings)

    async def api_error(request: Request, e: ApiError):
        return _error(e)

    async def http_error(request: Request, e: HTTPException):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(
                   e.status_code, str(e.detail))
        return _error(ApiError(msg, status=e.status_code))

    async def server_error(request: Request, e: Exception):
        log.exception("request failed")
        return _error(ApiError(f"internal error: {type(e).__name__}: {e}", status=500))

    routes = [Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/chat/completions", api.chat_completions, methods=["POST"]),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/completions", api.completions, methods=["POST"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/models", api.models, methods=["GET"]),
              Route("/health", api.health, methods=["GET"]),
              Route("/v1/health", api.health, methods=["GET"]),
              Route("/tokenize", api.tokenize, methods=["POST"]),
              Route("/detokenize", api.detokenize, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={
        ApiError: api_error, HTTPException: http_error, Exception: server_error})
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.state.api = api
    return app
