"""The registry of live sessions: ids, the session limit, and clean-up."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from stream.engines.analysis import AnalysisEngine
from stream.engines.generation import GenerationEngine
from stream.metrics import Metrics
from stream.protocol import CloseCode, ProtocolError, StartMessage
from stream.session import Session
from stream.settings import Settings
from stream.store import Store

log = logging.getLogger(__name__)


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        engines: Sequence[AnalysisEngine],
        generator: GenerationEngine | None = None,
        metrics: Metrics | None = None,
        store: Store | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engines = list(engines)
        self.generator = generator
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.opened = 0
        # Live WebRTC peer connections (anything with `async close()`), closed at shutdown.
        self.peers: set[Any] = set()

    def analysis_behind(self) -> bool:
        """Some session has chunks waiting behind the one being analysed: generation yields."""
        return any(session.backlog > 1 for session in self.sessions.values())

    def state(self) -> dict[str, Any]:
        """Live numbers for /metrics (read at scrape time)."""
        return {
            "sessions": len(self.sessions),
            "sessions_limit": self.settings.max_sessions,
            "sessions_opened": self.opened,
            "backlog": sum(s.backlog for s in self.sessions.values()),
            "analysis_queue": {engine.name: engine.queue_depth for engine in self.engines},
            "generation": self.generator.stats() if self.generator else None,
        }

    def open(self, start: StartMessage, transport: str = "websocket") -> Session:
        if len(self.sessions) >= self.settings.max_sessions:
            raise ProtocolError(
                "server_busy",
                f"the server already serves its limit of {self.settings.max_sessions} sessions;"
                " try again later",
                CloseCode.TRY_AGAIN_LATER,
            )
        session_id = start.session or secrets.token_urlsafe(12)
        if session_id in self.sessions:
            raise ProtocolError(
                "session_in_use",
                f"session {session_id!r} is live on another connection",
                CloseCode.POLICY_VIOLATION,
            )
        session = Session(
            session_id, start, self.settings, self.engines, self.generator, self.metrics,
            transport, self.store,
        )  # fmt: skip
        self.sessions[session_id] = session
        self.opened += 1
        log.info(
            "session opened over %s: %d Hz, %d channel(s), %s",
            transport, start.sample_rate, start.channels, start.encoding.value,
        )  # fmt: skip
        return session

    async def release(self, session: Session) -> None:
        """The connection ended: stop the session's work and forget it."""
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            seconds = session.input.samples_received / session.format.sample_rate
            log.info(
                "session closed: %.2f s of audio, %d chunks analysed, %d skipped",
                seconds, session.chunks_analysed, session.skipped,
                extra={"session": session.id},
            )  # fmt: skip
        await session.abort()

    async def finish_all(self, deadline: float) -> None:
        """Shutting down: every live session analyses what it has, sends `end` and closes with
        1001 (going away); whatever is not done within `deadline` seconds is cut short."""
        live = list(self.sessions.values())
        if not live:
            return
        log.info("finishing %d live session(s) before shutting down", len(live))
        finishing = [
            asyncio.create_task(s.finish(CloseCode.GOING_AWAY, drain_seconds=deadline / 2))
            for s in live
        ]
        done, pending = await asyncio.wait(finishing, timeout=deadline)
        for task in pending:
            task.cancel()
        # Let the transports' senders deliver `end` and the close frames.
        for _ in range(int(deadline * 10)):
            if all(s.outbox.closed and not len(s.outbox) for s in live):
                break
            await asyncio.sleep(0.1)

    async def close_all(self) -> None:
        for peer in list(self.peers):
            await peer.close()
        for session in list(self.sessions.values()):
            await self.release(session)
