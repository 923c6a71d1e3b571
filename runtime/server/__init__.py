"""An OpenAI-compatible HTTP server over one model (`ggforge serve MODEL`).

    from ggforge.runtime.server import ServerSettings, create_app, serve
    serve(ggforge.load("m.gguf"), ServerSettings(model_name="m"), host="127.0.0.1", port=8080)

app.py holds the routes (and why Starlette + uvicorn), requests.py the checks of request
bodies, engine.py the FIFO queue and the worker thread that runs the model.
"""
from __future__ import annotations

import logging

from ggforge.runtime.server.app import ServerSettings, create_app
from ggforge.runtime.server.requests import ApiError

__all__ = ["ApiError", "ServerSettings", "create_app", "serve", "uvicorn_config"]

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def uvicorn_config(app, *, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info"):
    """uvicorn's settings for ``app``: plain h11, bounded connections and header sizes."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http="h11",
                          loop="asyncio", lifespan="off", limit_concurrency=256,
                          timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024,
                          timeout_graceful_shutdown=5, server_header=False)


def serve(model, settings: ServerSettings, *, host: str = "127.0.0.1", port: int = 8080,
          log_level: str = "info") -> None:
    """Serve ``model`` until interrupted (Ctrl-C or SIGTERM end it cleanly)."""
    import uvicorn

    if host not in LOOPBACK and not settings.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can "
                    "use the model", host)
    app = create_app(model, settings)
    try:
        uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level)).run()
    finally:
        app.state.api.engine.close()   # cancels what runs, ends the worker
