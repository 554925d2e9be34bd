"""The Starlette application: its routes, and a lifespan that runs the server's services."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from models.base import Analyser
from stream.settings import Settings
from stream.transports.media_stream import media_stream_endpoint
from stream.transports.realtime import realtime_endpoint
from stream.transports.webrtc import Peers, offer_endpoint
from stream.transports.websocket import stream_endpoint
from stream.web import api, health
from stream.wiring import default_analysers, load_plugins, services

# The browser client: plain files, no build step; index.html at /.
BROWSER = Path(__file__).parent / "browser"


def create_app(
    settings: Settings | None = None,
    analysers: Callable[[Settings], Sequence[Analyser]] = default_analysers,
    generator_loader: Callable[..., Any] | None = None,
    tracer_provider: Any = None,
) -> Starlette:
    """`tracer_provider`: an OpenTelemetry TracerProvider for the sessions' traces, instead of
    the one `--otel-endpoint` makes (stream/wiring.py `services`)."""
    settings = settings or Settings()
    load_plugins(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.ready = False
        async with services(settings, analysers, generator_loader, tracer_provider) as running:
            # What the routes and transports read.
            app.state.settings = settings
            app.state.metrics = running.metrics
            app.state.sessions = running.sessions
            peers = app.state.webrtc_peers = Peers()
            app.state.ready = True  # models loaded and warmed up
            try:
                yield
            finally:
                app.state.ready = False
                await peers.close_all()  # each releases its session

    return Starlette(
        routes=[
            *health.ROUTES,
            WebSocketRoute("/v1/stream", stream_endpoint),
            WebSocketRoute("/v1/media-stream", media_stream_endpoint),
            WebSocketRoute("/v1/realtime", realtime_endpoint),
            Route("/v1/webrtc/offer", offer_endpoint, methods=["POST"]),
            *api.ROUTES,
            Mount("/", StaticFiles(directory=str(BROWSER), html=True)),
        ],
        lifespan=lifespan,
    )
