"""uvicorn: the server with a gentler shutdown, its configuration, a deadline for request
headers, and TLS."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from models.base import Analyser
from stream.settings import Settings
from stream.web.app import create_app
from stream.wiring import default_analysers

log = logging.getLogger(__name__)


class Server(uvicorn.Server):
    """uvicorn's server, with a gentler shutdown: it drains first (`/readyz` answers 503 for
    `drain_seconds` while it still serves, so a balancer sends new sessions elsewhere), stops
    accepting, then lets live sessions finish (`end`, close 1001) within
    `shutdown_grace_seconds`, or, with a store shared by several front-ends, hands them over
    (records committed, leases let go, close 1012: their clients resume on another front-end);
    then it shuts down as uvicorn does (which would otherwise close every WebSocket at once with
    1012, sessions unfinished). `interrupted`: Ctrl-C (SIGINT) stopped it."""

    interrupted = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn re-raises the signal after its shutdown to make Ctrl-C a KeyboardInterrupt,
        # but asyncio's runner turns that into a cancel of a task that may already be ending;
        # the CLI's exit status goes by what was received instead.
        self.interrupted = self.interrupted or sig == signal.SIGINT
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        state = getattr(self.config.app, "state", None)
        sessions = getattr(state, "sessions", None)
        if state is not None:
            state.draining = True  # /readyz: 503, so a balancer sends new sessions elsewhere
        drain = sessions.settings.drain_seconds if sessions is not None else 0
        if drain:
            logging.getLogger(__name__).info("draining: still serving for %g s", drain)
            await asyncio.sleep(drain)
        for server in self.servers:
            server.close()
        if sessions is not None and sessions.leases is not None:
            await sessions.move_all()  # a shared store: they go on on other front-ends
        elif sessions is not None:
            await sessions.finish_all(sessions.settings.shutdown_grace_seconds)
        await super().shutdown(sockets)


class HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request's headers: a connection
    that sends nothing, or trickles its headers (slowloris), is closed `header_timeout`
    seconds after it opened or after its last response, instead of holding a file descriptor
    forever. (uvicorn's keep-alive timeout covers only idle time after a response, and stops
    at the first byte.) A connection upgraded to a WebSocket is the WebSocket endpoint's:
    its start message has a deadline of its own."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request's headers get the same time

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._disarm()  # the connection is the WebSocket protocol's now (and this is let go)
        super().handle_websocket_upgrade(event)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._late)

    def _late(self) -> None:
        upgraded = self.transport.get_protocol() is not self
        waiting = self.conn.their_state is h11.IDLE  # no whole request (headers) yet
        if not upgraded and waiting and not self.transport.is_closing():
            self.transport.close()


def server_config(
    settings: Settings,
    analysers: Callable[[Settings], Sequence[Analyser]] = default_analysers,
    generator_loader: Callable[..., Any] | None = None,
    tracer_provider: Any = None,
    **overrides: object,
) -> uvicorn.Config:
    """uvicorn's configuration for this app; the CLI and the tests both serve through it."""
    # Frames up to the largest format's limit must reach the session, which answers an
    # oversize frame with a typed error; only beyond this does the library itself close (1009).
    ws_max_size = max(16 * 1024 * 1024, int(settings.max_frame_seconds * 192000 * 2 * 4 * 2))
    options: dict[str, object] = dict(
        host=settings.host,
        port=settings.port,
        http=functools.partial(HeaderDeadline, header_timeout=settings.header_timeout_seconds),
        ws="websockets-sansio",  # the `websockets` library's sans-I/O protocol
        ws_max_size=ws_max_size,
        ws_ping_interval=settings.ws_ping_interval_seconds,
        ws_ping_timeout=settings.ws_ping_timeout_seconds,
        log_level=settings.log_level,
        lifespan="on",
    )
    if settings.log_format == "json":
        options["log_config"] = None  # uvicorn's records go to the root handler, as JSON
    options.update(tls_options(settings))
    options.update(overrides)
    app = create_app(settings, analysers, generator_loader, tracer_provider)
    return uvicorn.Config(app, **options)


def tls_options(settings: Settings) -> dict[str, object]:
    """uvicorn's certificate options for `tls_cert`/`tls_key` or `tls self-signed`."""
    if settings.tls_cert and settings.tls_key:
        return {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
    if settings.tls == "self-signed":
        from models.export import default_cache_dir
        from stream.web.tls import self_signed

        root = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
        cert, key, fingerprint = self_signed(root / "tls", settings.host)
        log.warning(
            "serving HTTPS with a self-signed certificate (%s); browsers warn once: check that "
            "its SHA-256 fingerprint is %s",
            cert,
            fingerprint,
        )
        return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    return {}
