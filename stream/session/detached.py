"""The pool of detached sessions: those whose connection broke, waiting for a resume.

Each waits `grace` seconds, then is finalised (analysed to the end, its generations cancelled,
its `end` persisted). The pool is bounded, `max_detached_sessions` in all and
`max_detached_per_client` from one address: a newly detached session makes the oldest waiting
one go first (that address's own oldest when it has its share), an ended session (kept only to
send its last events again) before any that could still go on. So connections that open
sessions and vanish can never lock out new clients; they only age each other out of the pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from stream.session.session import Session
from stream.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Detached:
    """A session waiting for a resume: its grace timer, and the address its connection had."""

    session: Session
    timer: asyncio.Task[None]
    client: str | None


class DetachedPool:
    def __init__(self, settings: Settings, finalise: Callable[[Session], Awaitable[None]]):
        self.settings = settings
        self._finalise = finalise  # the manager's: finalise, then release
        self._waiting: dict[str, Detached] = {}  # oldest first
        self._evicted: set[asyncio.Task[None]] = set()  # being finalised early

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._waiting

    @property
    def open(self) -> bool:
        """Whether sessions may wait here at all (the settings may turn the pool off)."""
        settings = self.settings
        return bool(settings.max_detached_sessions and settings.max_detached_per_client)

    def add(self, session: Session, client: str | None, grace: float) -> None:
        """`session` waits `grace` seconds for a resume; room is made first."""
        self._make_room(client)
        log.info("connection lost; the session waits %g s for a resume", grace,
                 extra={"session": session.id})  # fmt: skip
        timer = asyncio.create_task(self._expire(session, grace), name=f"expire-{session.id}")
        self._waiting[session.id] = Detached(session, timer, client)

    def take(self, session_id: str) -> None:
        """The session is attached again (or moves): its wait ends."""
        waiting = self._waiting.pop(session_id, None)
        if waiting is not None:
            waiting.timer.cancel()

    def tasks(self) -> list[asyncio.Task[None]]:
        """Its timers and early finalisations, for a shutdown to cancel."""
        return [*(d.timer for d in self._waiting.values()), *self._evicted]

    def _make_room(self, client: str | None) -> None:
        own = [s for s, d in self._waiting.items() if client is not None and d.client == client]
        if len(own) >= self.settings.max_detached_per_client:
            self._evict(self._first_to_go(own))
        elif len(self._waiting) >= self.settings.max_detached_sessions:
            self._evict(self._first_to_go(list(self._waiting)))

    def _first_to_go(self, waiting: list[str]) -> str:
        """Of `waiting` (oldest first): an ended session goes before any that could go on."""
        ended = [s for s in waiting if not self._waiting[s].session.accepting]
        return (ended or waiting)[0]

    def _evict(self, session_id: str) -> None:
        evicted = self._waiting.pop(session_id)
        evicted.timer.cancel()
        log.info("the detached pool is full: the oldest waiting session is finalised",
                 extra={"session": session_id})  # fmt: skip
        task = asyncio.create_task(self._finalise(evicted.session), name=f"evict-{session_id}")
        self._evicted.add(task)
        task.add_done_callback(self._evicted.discard)

    async def _expire(self, session: Session, grace: float) -> None:
        await asyncio.sleep(grace)
        del self._waiting[session.id]
        log.info("not resumed within %g s: the session is finalised", grace,
                 extra={"session": session.id})  # fmt: skip
        await self._finalise(session)
