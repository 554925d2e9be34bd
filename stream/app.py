"""The Starlette application: routes, and a lifespan that loads models and starts the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from importlib.resources import files

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route, WebSocketRoute

from models.base import Analyser
from stream import __version__
from stream.engines.analysis import AnalysisEngine
from stream.sessions import SessionManager
from stream.settings import Settings
from stream.transports.websocket import stream_endpoint


def default_analysers(settings: Settings) -> list[Analyser]:
    from models.dsp import DspAnalyser

    return [DspAnalyser()]


def create_app(
    settings: Settings | None = None,
    analysers: Callable[[Settings], Sequence[Analyser]] = default_analysers,
) -> Starlette:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Model loading is blocking work: keep it off the loop even at start-up.
        loaded = await asyncio.to_thread(analysers, settings)
        engine = AnalysisEngine(loaded, max_batch=settings.analysis_batch_max)
        await engine.start()
        app.state.settings = settings
        app.state.sessions = SessionManager(settings, engine)
        try:
            yield
        finally:
            await app.state.sessions.close_all()
            await engine.stop()

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/", index),
            WebSocketRoute("/v1/stream", stream_endpoint),
        ],
        lifespan=lifespan,
    )


async def healthz(request: Request) -> JSONResponse:
    sessions: SessionManager = request.app.state.sessions
    return JSONResponse(
        {
            "status": "ok",
            "version": __version__,
            "sessions": len(sessions.sessions),
            "max_sessions": sessions.settings.max_sessions,
            "analysers": sessions.engine.names,
            "analysis": {"batches": sessions.engine.batches, "windows": sessions.engine.windows},
        }
    )


async def index(request: Request) -> HTMLResponse:
    page = files("clients").joinpath("browser/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page)


def server_config(settings: Settings, **overrides: object) -> uvicorn.Config:
    """uvicorn's configuration for this app; the CLI and the tests both serve through it."""
    # Frames up to the largest format's limit must reach the session, which answers an
    # oversize frame with a typed error; only beyond this does the library itself close (1009).
    ws_max_size = max(16 * 1024 * 1024, int(settings.max_frame_seconds * 192000 * 2 * 4 * 2))
    options: dict[str, object] = dict(
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",  # the `websockets` library's sans-I/O protocol
        ws_max_size=ws_max_size,
        log_level=settings.log_level,
        lifespan="on",
    )
    options.update(overrides)
    return uvicorn.Config(create_app(settings), **options)
