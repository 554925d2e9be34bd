"""The registry of live sessions: ids, the session limit, resumption and clean-up.

A WebSocket session whose connection breaks is detached, not ended: it keeps its context,
analyses what it has and finishes the generations under way, and a client may resume it (start
with `"session": id, "resume": true`) within `resume_grace_seconds` (detached.py: the pool of
those waiting). A resume that finds the
session still attached takes it over (the old connection may be half-open: its peer is gone but
the server has not noticed yet). A session not resumed in time is finalised: analysed to the
end, its pending generations cancelled, its `end` persisted.

Admission (admission.py) counts live sessions, those a connection holds; detached ones wait in a
pool of their own, `max_detached_sessions` in all and `max_detached_per_client` from one
address, where a newly detached session makes the oldest (the client's own first) be finalised.
So connections that open sessions and vanish can never lock out new clients; they only age each
other out of the pool. A resume of a detached session needs a live slot like a new one.

Several front-ends may share one PostgreSQL store (`--store`): then leases decide which one
serves a session (stream/store/leases.py). A new session claims its id; a resume that arrives at
a front-end that does not serve the session takes the lease and restores the session from the
store (below): at once if its front-end died, else after that front-end hands it over (its
connection gets `session_resumed`, its records are committed, its lease is let go).

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
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from stream.engines.analysis import AnalysisEngine
from stream.engines.generation import GenerationEngine
from stream.metrics import Metrics
from stream.pipeline import Pipeline, PipelineError, load_presets, resolve
from stream.protocol import (
    CloseCode,
    ProtocolError,
    StartMessage,
)
from stream.session.admission import Admission, live
from stream.session.detached import DetachedPool
from stream.session.lifecycle import Attachment
from stream.session.restore import mismatch, read_back
from stream.session.session import Session
from stream.session.tracing import Tracer
from stream.settings import Settings
from stream.store import Store, StoreUnavailable
from stream.store.leases import Leases, Taken

log = logging.getLogger(__name__)
T = TypeVar("T")
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
        leases: Leases | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.tracer = tracer  # with --otel-endpoint: each session's spans
        self.store = store
        self.leases = leases  # with a shared store: which sessions this front-end serves
        self.engines = list(engines)
        # Named pipelines (presets and --pipelines-dir), checked against the analysers here.
        self.pipelines = pipelines or load_presets(None, [e.name for e in self.engines])
        self.generator = generator
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.opened = 0
        self.resumed = 0
        self.detached = DetachedPool(settings, self._finalise)  # waiting for a resume
        self.admission = Admission(settings)  # limits, and addresses that flooded
        self._stored: dict[str, asyncio.Task[None]] = {}  # resumable from storage: timers
        self._arriving: set[str] = set()  # being taken from another front-end
        self._moving: set[asyncio.Task[None]] = set()  # being handed over, or lost

    def analysis_behind(self) -> bool:
        """Some session has chunks waiting behind the one being analysed: generation yields."""
        return any(session.backlog > 1 for session in self.sessions.values())

    def is_live(self, session_id: str) -> bool:
        """The session goes on: held by a connection, or waiting for a resume (an ended one
        kept only to send its last events again is not)."""
        session = self.sessions.get(session_id)
        return session is not None and session.accepting

    def state(self) -> dict[str, Any]:
        """Live numbers for /metrics (read at scrape time)."""
        return {
            "sessions": sum(s.accepting for s in self.sessions.values()),
            "sessions_live": len(live(self.sessions.values())),
            "sessions_detached": len(self.detached),
            "sessions_resumed": self.resumed,
            "sessions_limit": self.settings.max_sessions,
            "sessions_opened": self.opened,
            "backlog": sum(s.backlog for s in self.sessions.values()),
            "analysis_queue": {engine.name: engine.queue_depth for engine in self.engines},
            "generation": self.generator.stats() if self.generator else None,
        }

    def _admit(self, client: str | None) -> None:
        """A new live session from `client` (or a detached one attached again) is allowed now,
        or this raises why not."""
        self.admission.check(self.sessions.values(), client)

    async def open(
        self,
        start: StartMessage,
        transport: str = "websocket",
        client: str | None = None,
        resumable: bool = True,
    ) -> Session:
        """A new session, held by `transport`'s connection from `client`. `resumable` False:
        its protocol has no resume (OpenAI Realtime, Twilio media streams), so it ends with
        its connection, and a shutdown ends it rather than handing it to another front-end."""
        self._admit(client)
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
        if self.leases is not None and not await _unless_unavailable(self.leases.claim(session_id)):
            raise ProtocolError(
                "session_in_use",
                f"session {session_id!r} is live on another front-end or waits to be resumed; "
                "resume it or choose another id",
                CloseCode.POLICY_VIOLATION,
            )
        session = Session(
            session_id, start, self.settings, self.engines, pipeline, self.generator,
            self.metrics, transport, self.store, tracer=self.tracer, resumable=resumable,
        )  # fmt: skip
        session.attach(Attachment(transport, client))
        self.sessions[session_id] = session
        self.opened += 1
        log.info(
            "session opened over %s: %d Hz, %d channel(s), %s",
            transport, start.sample_rate, start.channels, start.encoding.value,
        )  # fmt: skip
        return session

    async def resume(self, start: StartMessage, client: str | None = None) -> tuple[Session, int]:
        """Reattach a session to a new connection; returns it and how many of the events after
        `start.last_event` are no longer kept (0: the client misses nothing)."""
        session = self.sessions.get(start.session or "")
        if session is None and start.session in self._stored:
            return await self._restore(start, client), 0
        if session is None and self.leases is not None and start.session is not None:
            return await self._take_over(start, client), 0
        if session is None or session.transport != "websocket":
            raise ProtocolError(
                "session_not_found",
                f"no session {start.session!r} to resume: it ended, or was not resumed within "
                f"{self.settings.resume_grace_seconds:g} s; start a new one",
                CloseCode.POLICY_VIOLATION,
            )
        if start.format != session.format:
            kept = session.format
            raise mismatch(kept.sample_rate, kept.channels, kept.encoding.value)
        old = session.attachment
        if old is None and session.id not in self.detached:
            raise ProtocolError(
                "session_not_found",
                f"session {start.session!r} is ending: it was not resumed in time or was "
                "evicted from the pool of detached sessions; start a new one",
                CloseCode.POLICY_VIOLATION,
            )
        if old is None:
            self.admission.check(
                self.sessions.values(), client
            )  # it waited detached: it needs a live slot again
        await self._take_from_its_holder(session)
        lost = session.outbox.rewind(start.last_event)
        session.attach(Attachment(old.transport if old else "websocket", client))
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

    async def _take_over(self, start: StartMessage, client: str | None) -> Session:
        """A resume of a session this front-end does not serve: take its lease (from a dead
        front-end at once, from a live one once it has handed the session over), then go on
        from what the store holds."""
        assert self.leases is not None and self.store is not None and start.session is not None
        session_id = start.session
        self._admit(client)
        if session_id in self._arriving:
            raise ProtocolError(
                "session_in_use", f"session {session_id!r} is being resumed by another connection",
                CloseCode.TRY_AGAIN_LATER,
            )  # fmt: skip
        self._arriving.add(session_id)
        try:
            taken = await _unless_unavailable(self.leases.take(session_id, TAKEOVER_WAIT_S))
            if taken is Taken.UNKNOWN:
                raise ProtocolError(
                    "session_not_found",
                    f"no session {session_id!r} to resume: it ended, or was not resumed within "
                    f"{self.settings.resume_grace_seconds:g} s; start a new one",
                    CloseCode.POLICY_VIOLATION,
                )
            if taken is Taken.BUSY:
                raise ProtocolError(
                    "session_in_use",
                    f"session {session_id!r} is served by another front-end that did not hand "
                    f"it over within {TAKEOVER_WAIT_S:g} s; try again",
                    CloseCode.TRY_AGAIN_LATER,
                )
            try:
                return await _unless_unavailable(self._restore(start, client))
            except BaseException:
                self._let_go(session_id)
                raise
        finally:
            self._arriving.discard(session_id)

    def _let_go(self, session_id: str) -> None:
        """Its records are all with the store: its lease goes after them (shared store)."""
        if self.leases is not None and self.store is not None:
            self.leases.forget(session_id)
            self.store.release(session_id)

    def hand_over(self, session_id: str) -> None:
        """Another front-end asks for the session (a client resumed it there): let it go."""
        self._move(session_id, owned=True)

    def lost(self, session_id: str) -> None:
        """Another front-end serves the session now (this one could not renew its lease)."""
        self._move(session_id, owned=False)

    def _move(self, session_id: str, owned: bool) -> None:
        session = self.sessions.get(session_id)
        leaving = {task.get_name() for task in self._moving}
        if session is None or not session.accepting or f"move-{session_id}" in leaving:
            return  # not here, ended (kept only to send `end` again), or already moving
        task = asyncio.create_task(self._moved(session, owned), name=f"move-{session_id}")
        self._moving.add(task)
        task.add_done_callback(self._moving.discard)

    async def move_all(self) -> None:
        """Shutting down with a shared store: every session goes on elsewhere. Connections
        are closed with 1012 (clients resume through the balancer, on another front-end);
        detached sessions let go of their leases for whoever resumes them."""
        live = [s for s in self.sessions.values() if s.accepting and s.resumable]
        if live:
            log.info("handing %d session(s) over to the other front-ends", len(live))
        await asyncio.gather(
            *(self._moved(s, owned=True, farewell=CloseCode.SERVICE_RESTART) for s in live),
            self.finish_all(self.settings.shutdown_grace_seconds, resumable=False),
        )

    async def _moved(self, session: Session, owned: bool, farewell: int | None = None) -> None:
        """Its connection gets `session_resumed` (or is closed with `farewell`); its work
        stops (no `end`: it goes on elsewhere); what it recorded is committed; then its lease
        goes (if still held)."""
        log.info("the session moves to another front-end", extra={"session": session.id})
        await self._take_from_its_holder(session, farewell)
        await self.release(session, owned=owned, moving=owned)

    async def _take_from_its_holder(self, session: Session, farewell: int | None = None) -> None:
        """The connection holding the session lets go (told `session_resumed`, or closed with
        `farewell`), or, if it was detached, its wait for a resume ends."""
        old = session.attachment
        if old is not None:
            old.farewell = farewell
            old.taken_over.set()
            try:
                await asyncio.wait_for(old.released.wait(), TAKEOVER_WAIT_S)
            except TimeoutError:
                log.warning("the old connection did not let go within %g s", TAKEOVER_WAIT_S)
        self.detached.take(session.id)

    async def _restore(self, start: StartMessage, client: str | None) -> Session:
        """A session from storage (restore.py), attached to the connection that resumed it."""
        self._admit(client)
        assert self.store is not None and start.session is not None
        session = await read_back(
            self.store, start, self.settings, self.engines, self.generator, self.metrics,
            self.tracer,
        )  # fmt: skip
        waiting = self._stored.pop(start.session, None)
        if waiting is not None:
            waiting.cancel()
        session.attach(Attachment("websocket", client))
        self.sessions[session.id] = session
        self.resumed += 1
        log.info("session restored from storage: it goes on at sample %d",
                 session.input.samples_received, extra={"session": session.id})  # fmt: skip
        return session

    async def disconnected(self, session: Session, attachment: Attachment, resumable: bool) -> None:
        """A connection let go of `session`. `resumable`: it broke, and the session waits
        (detached) for a resume; otherwise the session is done with."""
        if attachment.taken_over.is_set():
            attachment.released.set()  # a newer connection has it
            return
        session.detach(attachment)
        attachment.released.set()
        self.admission.strike(session, attachment.client)
        grace = self.settings.resume_grace_seconds
        if not session.accepting:  # it ended: kept only so its last events can be sent again
            grace = min(grace, self.settings.close_timeout_seconds)
        if (
            not resumable or not grace or not self.detached.open
            or self.sessions.get(session.id) is not session
        ):  # fmt: skip
            await self._finalise(session)
            return
        self.detached.add(session, attachment.client, grace)

    async def _finalise(self, session: Session) -> None:
        try:
            await session.finalise()
        finally:
            await self.release(session)

    async def release(self, session: Session, owned: bool = True, moving: bool = False) -> None:
        """The connection ended: stop the session's work and forget it (with a shared store,
        its lease goes once its records are in, unless another front-end took it: `owned`).
        `moving`: it goes on elsewhere (another front-end, or this one after a restart): its
        rolling context is kept for that."""
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            going_on = moving and session.accepting  # not ended: someone may resume it
            seconds = session.input.samples_received / session.format.sample_rate
            log.info(
                "session closed: %.2f s of audio, %d chunks analysed, %d skipped",
                seconds, session.chunks_analysed, session.skipped,
                extra={"session": session.id},
            )  # fmt: skip
            await session.close()
            if going_on:
                session.keep_context()
            await session.recorder.written()
            if owned:
                self._let_go(session.id)
            elif self.leases is not None:
                self.leases.forget(session.id)
            return
        await session.close()

    async def finish_all(self, deadline: float, resumable: bool | None = None) -> None:
        """Shutting down: every live session (those that are `resumable` or not, if it says)
        analyses what it has, sends `end` and closes with 1001 (going away); whatever is not
        done within `deadline` seconds is cut short."""
        # Detached sessions stay open in the store: after a restart they may be resumed.
        live = [
            s for s in self.sessions.values()
            if s.attachment is not None and resumable in (None, s.resumable)
        ]  # fmt: skip
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
        for task in [*self.detached.tasks(), *self._stored.values(), *self._moving]:
            task.cancel()
        for session in list(self.sessions.values()):  # detached ones go on after a restart
            await self.release(session, moving=True)


async def _unless_unavailable(work: Awaitable[T]) -> T:
    """`work`, or `store_unavailable` (1013: try again) while the shared store cannot be
    reached: sessions that live go on (their writes wait), new and moving ones must wait."""
    try:
        return await work
    except StoreUnavailable:
        raise ProtocolError(
            "store_unavailable",
            "the session store cannot be reached just now; try again shortly",
            CloseCode.TRY_AGAIN_LATER,
        ) from None
