"""One model, one worker thread, a fair FIFO queue of generation jobs.

The event loop never runs the model: a request becomes a Job, the worker thread takes jobs
in arrival order and generates one at a time on the LoadedModel (whose KV cache keeps the
previous request's tokens, so a prompt sharing a prefix with it evaluates only the rest).
Events go back to the job's asyncio queue through ``loop.call_soon_threadsafe``. A job
whose client went away is cancelled: the worker stops it at the next token (or skips it if
it is still waiting) and the model is free for the next one.
"""
from __future__ import annotations

import asyncio
import codecs
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from ggforge.runtime.generate import LoadedModel, held_back
from ggforge.runtime.kv_cache import ContextFullError
from ggforge.runtime.sampling import SamplerSettings

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More requests waiting than the server admits (the client should retry later)."""


@dataclass
class Job:
    """One generation: its prompt ids, limits and the queue its events go to.

    Events: ("text", piece), then ("done", finish_reason, usage) or ("error", message)."""
    ids: list[int]
    max_tokens: int
    settings: SamplerSettings
    stop: tuple[str, ...] = ()
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class TextStream:
    """Token ids -> text pieces, held back while they could begin a stop string: the same
    text as LoadedModel.generate() gives for the same tokens and stop strings."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.keep = max((len(s) - 1 for s in self.stop), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""

    def push(self, tok: int) -> tuple[str, bool]:
        """The text now safe to send, and whether a stop string was hit (generation ends)."""
        self.pending += self.decoder.decode(self.tokenizer.token_to_piece(tok, special=False))
        hit = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            out, self.pending = self.pending[:hit], ""
            return out, True
        safe = len(self.pending) - held_back(self.pending, self.stop, self.keep)
        out = self.pending[:max(safe, 0)]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out = self.pending + self.decoder.decode(b"", final=True)
        self.pending = ""
        return out


class Engine:
    """Serves jobs one at a time, first come first served, on one LoadedModel."""

    def __init__(self, model: LoadedModel, *, max_waiting: int = 32):
        self.model = model
        self.max_waiting = max_waiting
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0   # admitted and not finished: the running job and those waiting
        self.busy = False
        self.last: tuple[str, int] | None = None  # the last job's finish reason and tokens
        self._current: Job | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="ggforge-generate", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests admitted and not yet started."""
        return self._pending - self.busy

    def submit(self, job: Job) -> None:
        """Queue ``job``; QueueFullError when one runs and max_waiting more already wait."""
        job.loop = job.loop or asyncio.get_running_loop()
        with self._lock:
            if self._closing:
                raise QueueFullError("the server is shutting down")
            if self._pending > self.max_waiting:
                raise QueueFullError(f"{self._pending - 1} requests are already waiting for the "
                                     "model; retry later")
            self._pending += 1
        self._jobs.put(job)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel the running job and those waiting, and end the worker thread."""
        self._closing = True
        if self._current is not None:
            self._current.cancel()
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self.busy, self._current = True, job
            if self._closing:
                job.cancel()
            try:
                if job.cancelled.is_set():  # its client left while it waited
                    self.last = ("cancelled", 0)
                    job.emit("done", "cancelled", _usage(job.ids, 0), {})
                else:
                    self._generate(job)
            except Exception as e:  # never let one request kill the worker
                log.exception("generation failed")
                job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self._pending -= 1
                    self.busy, self._current = False, None

    def _generate(self, job: Job) -> None:
        m = self.model
        text = TextStream(m.tokenizer, job.stop)
        n, finish, t0 = 0, None, time.perf_counter()
        t_first, cache_n = None, _reused(m, job.ids)
        gen = m.generate_tokens(job.ids, max_tokens=job.max_tokens, settings=job.settings)
        try:
            for tok in gen:
                n += 1
                if t_first is None:
                    t_first = time.perf_counter()
                piece, hit = text.push(tok)
                if piece:
                    job.emit("text", piece)
                if hit:          # generate() ends here too, without flushing the decoder
                    finish = "stop"
                    break
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
        except ContextFullError:
            finish = "length"
        finally:
            gen.close()
        if finish in (None, "length"):
            finish = finish or ("length" if n >= job.max_tokens else "stop")
            tail = text.flush()
            if tail:
                job.emit("text", tail)
        t1 = time.perf_counter()
        usage = _usage(job.ids, n)
        self.last = (finish, n)
        # llama-server's names: prompt_n evaluated, cache_n reused from the previous request
        timings = {"cache_n": cache_n, "prompt_n": len(job.ids) - cache_n,
                   "prompt_ms": round(((t_first or t1) - t0) * 1e3, 3),
                   "predicted_n": n, "predicted_ms": round((t1 - (t_first or t1)) * 1e3, 3)}
        job.emit("done", finish, usage, timings)


def _usage(ids: list[int], n: int) -> dict:
    return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}


def _reused(m, ids: list[int]) -> int:
    """How many of ``ids`` the KV cache holds from the previous request (LoadedModel's
    prefill keeps the common prefix and evaluates the rest)."""
    cached = getattr(m, "_cached", None)
    if not cached:
        return 0
    common = 0
    for a, b in zip(cached, ids):
        if a != b:
            break
        common += 1
    return m.cache.reusable(min(common, len(ids) - 1))
