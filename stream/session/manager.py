"""The registry of live sessions: ids, the session limit, resumption and clean-up.

A WebSocket session whose connection breaks is detached, not ended: it keeps its context,
analyses what it has and finishes the generations under way, and a client may resume it (start
with `"session": id, "resume": true`) within `resume_grace_seconds`. A resume that finds the
session still attached takes it over (the old connection may be half-open: its peer is gone but
the server has not noticed yet). A session not resumed in time is finalised: analysed to the
end, its pending generations cancelled, its `end` persisted.

Sessions outlive the server too. A graceful shutdown ends the attached ones (`end`, 1001) but
leaves detached ones open in the store, and a crash leaves every live one so. After a restart,
each such session may be resumed from storage within `resume_grace_seconds`: it goes on after
its last kept timeline entry, the client sending the audio from there (it kept everything not
acknowledged); one not resumed in time is marked ended.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from stream.engines.analysis import AnalysisEngine
from stream.engines.generation import GenerationEngine
from stream.metrics import Metrics
from stream.pipeline import Pipeline, PipelineError, PipelineSpec, check, load_presets, resolve
from stream.protocol import CloseCode, ProtocolError, SessionConfig, StartMessage
from stream.session.lifecycle import Attachment
from stream.session.options import Restored
from stream.session.session import Session
from stream.settings import Settings
from stream.store import Store

log = logging.getLogger(__name__)
TAKEOVER_WAIT_S = 5.0  # how long a resume waits for the old connection to let go


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        engines: Sequence[AnalysisEngine],
        generator: GenerationEngine | None = None,
        metrics: Metrics | None = None,
        store: Store | None = None,
        pipelines: dict[str, Pipeline] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engines = list(engines)
        # Named pipelines (presets and --pipelines-dir), checked against the analysers here.
        self.pipelines = pipelines or load_presets(None, [e.name for e in self.engines])
        self.generator = generator
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.opened = 0
        self.resumed = 0
        self._expiry: dict[str, asyncio.Task[None]] = {}  # detached sessions' grace timers
        self._stored: dict[str, asyncio.Task[None]] = {}  # resumable from storage: timers

    def analysis_behind(self) -> bool:
        """Some session has chunks waiting behind the one being analysed: generation yields."""
        return any(session.backlog > 1 for session in self.sessions.values())

    def state(self) -> dict[str, Any]:
        """Live numbers for /metrics (read at scrape time)."""
        return {
            "sessions": len(self.sessions),
            "sessions_detached": len(self._expiry),
            "sessions_resumed": self.resumed,
            "sessions_limit": self.settings.max_sessions,
            "sessions_opened": self.opened,
            "backlog": sum(s.backlog for s in self.sessions.values()),
            "analysis_queue": {engine.name: engine.queue_depth for engine in self.engines},
            "generation": self.generator.stats() if self.generator else None,
        }

    def _check_capacity(self) -> None:
        if len(self.sessions) >= self.settings.max_sessions:
            raise ProtocolError(
                "server_busy",
                f"the server already serves its limit of {self.settings.max_sessions} sessions;"
                " try again later",
                CloseCode.TRY_AGAIN_LATER,
            )

    def open(self, start: StartMessage, transport: str = "websocket") -> Session:
        self._check_capacity()
        session_id = start.session or secrets.token_urlsafe(12)
        if session_id in self._stored:
            raise ProtocolError(
                "session_in_use",
                f"session {session_id!r} waits to be resumed (it was live when the server "
                "stopped); resume it or choose another id",
                CloseCode.POLICY_VIOLATION,
            )
        if session_id in self.sessions:
            raise ProtocolError(
                "session_in_use",
                f"session {session_id!r} is live on another connection",
                CloseCode.POLICY_VIOLATION,
            )
        try:
            pipeline = resolve(
                start.config, self.pipelines, self.settings.pipeline,
                [e.name for e in self.engines],
            )  # fmt: skip
        except PipelineError as exc:
            raise ProtocolError("invalid_config", str(exc), CloseCode.POLICY_VIOLATION) from None
        session = Session(
            session_id, start, self.settings, self.engines, pipeline, self.generator,
            self.metrics, transport, self.store,
        )  # fmt: skip
        session.attach(Attachment(transport))
        self.sessions[session_id] = session
        self.opened += 1
        log.info(
            "session opened over %s: %d Hz, %d channel(s), %s",
            transport, start.sample_rate, start.channels, start.encoding.value,
        )  # fmt: skip
        return session

    async def resume(self, start: StartMessage) -> tuple[Session, int]:
        """Reattach a session to a new connection; returns it and how many of the events after
        `start.last_event` are no longer kept (0: the client misses nothing)."""
        session = self.sessions.get(start.session or "")
        if session is None and start.session in self._stored:
            return await self._restore(start), 0
        if session is None or session.transport != "websocket":
            raise ProtocolError(
                "session_not_found",
                f"no session {start.session!r} to resume: it ended, or was not resumed within "
                f"{self.settings.resume_grace_seconds:g} s; start a new one",
                CloseCode.POLICY_VIOLATION,
            )
        if start.format != session.format:
            kept = session.format
            raise _mismatch(kept.sample_rate, kept.channels, kept.encoding.value)
        old = session.attachment
        if old is not None:
            old.taken_over.set()
            try:
                await asyncio.wait_for(old.released.wait(), TAKEOVER_WAIT_S)
            except TimeoutError:
                log.warning("the old connection did not let go within %g s", TAKEOVER_WAIT_S)
        expiry = self._expiry.pop(session.id, None)
        if expiry is not None:
            expiry.cancel()
        lost = session.outbox.rewind(start.last_event)
        session.attach(Attachment(old.transport if old else "websocket"))
        self.resumed += 1
        log.info(
            "session resumed at %d samples, events after %d sent again%s",
            session.input.samples_received, start.last_event,
            f" ({lost} no longer kept)" if lost else "", extra={"session": session.id},
        )  # fmt: skip
        return session, lost

    async def adopt_stored(self) -> None:
        """At start: sessions the store holds open (live when the server stopped) may be
        resumed within the grace period; after it they are marked ended."""
        if self.store is None:
            return
        for session in await asyncio.to_thread(self.store.unended):
            self._stored[session] = asyncio.create_task(
                self._expire_stored(session), name=f"expire-stored-{session}"
            )
        if self._stored:
            log.info("%d session(s) from before the restart may be resumed for %g s",
                     len(self._stored), self.settings.resume_grace_seconds)  # fmt: skip

    async def _expire_stored(self, session: str) -> None:
        await asyncio.sleep(self.settings.resume_grace_seconds)
        del self._stored[session]
        if self.store is not None:
            summary = {"type": "end", "session": session, "reason": "not resumed after a restart"}
            self.store.record_end(session, summary)

    async def _restore(self, start: StartMessage) -> Session:
        """A session from storage, going on after its last kept timeline entry."""
        self._check_capacity()
        assert self.store is not None and start.session is not None
        point = await asyncio.to_thread(self.store.resume_point, start.session)
        if point is None:
            raise ProtocolError(
                "session_not_found", f"no session {start.session!r} to resume",
                CloseCode.POLICY_VIOLATION,
            )  # fmt: skip
        info = point["info"]
        kept = (info["sample_rate"], info["channels"], info["encoding"])
        if (start.sample_rate, start.channels, start.encoding.value) != kept:
            raise _mismatch(*kept)
        # Its options as they were (the server's defaults may have changed), and its pipeline.
        config = {k: v for k, v in info["config"].items() if k not in ("pipeline", "generation")}
        config.update(info["options"])
        analysers = [e.name for e in self.engines]
        try:
            pipeline = check(PipelineSpec.model_validate(info["pipeline"]), analysers)
        except (PipelineError, ValueError) as exc:
            raise ProtocolError(
                "session_not_found", f"session {start.session!r} cannot go on here: {exc}",
                CloseCode.POLICY_VIOLATION,
            ) from None  # fmt: skip
        original = start.model_copy(update={"config": SessionConfig.model_validate(config)})
        last = point["last_seq"]
        restored = Restored(
            next_chunk=0 if last is None else last + 1, chunks=point["entries"],
            last_event=start.last_event, generations=point["generations"],
        )  # fmt: skip
        session = Session(
            start.session, original, self.settings, self.engines, pipeline, self.generator,
            self.metrics, "websocket", self.store, restored,
        )  # fmt: skip
        self._stored.pop(start.session).cancel()
        session.attach(Attachment("websocket"))
        self.sessions[session.id] = session
        self.resumed += 1
        log.info("session restored from storage: it goes on at chunk %d",
                 restored.next_chunk, extra={"session": session.id})  # fmt: skip
        return session

    async def disconnected(self, session: Session, attachment: Attachment, resumable: bool) -> None:
        """A connection let go of `session`. `resumable`: it broke, and the session waits
        (detached) for a resume; otherwise the session is done with."""
        if attachment.taken_over.is_set():
            attachment.released.set()  # a newer connection has it
            return
        session.detach(attachment)
        attachment.released.set()
        grace = self.settings.resume_grace_seconds
        if not resumable or not grace or self.sessions.get(session.id) is not session:
            await self._finalise(session)
            return
        log.info("connection lost; the session waits %g s for a resume", grace,
                 extra={"session": session.id})  # fmt: skip
        self._expiry[session.id] = asyncio.create_task(
            self._expire(session, grace), name=f"expire-{session.id}"
        )

    async def _expire(self, session: Session, grace: float) -> None:
        await asyncio.sleep(grace)
        del self._expiry[session.id]
        log.info("not resumed within %g s: the session is finalised", grace,
                 extra={"session": session.id})  # fmt: skip
        await self._finalise(session)

    async def _finalise(self, session: Session) -> None:
        try:
            await session.finalise()
        finally:
            await self.release(session)

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
        await session.close()

    async def finish_all(self, deadline: float) -> None:
        """Shutting down: every live session analyses what it has, sends `end` and closes with
        1001 (going away); whatever is not done within `deadline` seconds is cut short."""
        # Detached sessions stay open in the store: after a restart they may be resumed.
        live = [s for s in self.sessions.values() if s.attachment is not None]
        if not live:
            return
        log.info("finishing %d live session(s) before shutting down", len(live))
        finishing = [s.stop(CloseCode.GOING_AWAY, drain_seconds=deadline / 2) for s in live]
        done, pending = await asyncio.wait(finishing, timeout=deadline)
        for task in pending:
            task.cancel()
        # Let the transports' senders deliver `end` and the close frames.
        for _ in range(int(deadline * 10)):
            if all(s.outbox.drained for s in live):
                break
            await asyncio.sleep(0.1)

    async def close_all(self) -> None:
        for task in [*self._expiry.values(), *self._stored.values()]:
            task.cancel()
        for session in list(self.sessions.values()):
            await self.release(session)


def _mismatch(rate: int, channels: int, encoding: str) -> ProtocolError:
    """A resume in another format than the session's (live, or kept in the store)."""
    return ProtocolError(
        "resume_mismatch",
        f"the session streams {rate} Hz, {channels} channel(s), {encoding}; resume with the "
        "same sample_rate, channels and encoding",
        CloseCode.POLICY_VIOLATION,
    )
