"""Which front-end serves a session: leases in the shared PostgreSQL store.

A row of `leases` names a session's owner and when its hold expires. The owner renews every
lease it holds several times per `seconds`; a front-end that dies stops renewing, and after
`seconds` its sessions may be taken by any other. So:

- a new session is claimed (a row inserted): an id that is held, or waits for a resume, is in use;
- a resume on a front-end that does not serve the session takes its lease: at once when it has
  no owner or the owner's hold expired (the owner died), else it asks the owner to hand it over
  (NOTIFY on a channel every front-end LISTENs to) and waits while the owner lets go (the owner
  sends its connection `session_resumed`, commits what it has and clears the owner: writer.py's
  `release`, in order after the session's records);
- renewing finds the leases this front-end lost (taken while it could not renew): `on_lost`;
- a lease nobody holds or renews for `grace` seconds is swept, and its session marked ended.

Ownership is fenced where it matters, in the store's write transactions (postgres.py), so a
front-end that was paused past its lease cannot append to a session another one serves now.
Everything here runs on the event loop with psycopg's async connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from enum import Enum

import psycopg

from stream.store.writer import StoreUnavailable

log = logging.getLogger(__name__)
CHANNEL = "grym_handover"
RENEWS_PER_LEASE = 4  # renewals within one lease: three may fail before a lease is lost
POLL_S = 0.05  # how often a resume looks whether the owner has let go
NOTIFY_EVERY_S = 1.0  # and asks it again (a request may reach it while it cannot act)


class Taken(Enum):
    """What taking a session's lease for a resume came to."""

    TAKEN = "taken"  # this front-end owns it now
    UNKNOWN = "unknown"  # no lease: it ended, or never was
    BUSY = "busy"  # its owner did not let go in time


class Leases:
    def __init__(
        self,
        url: str,
        owner: str,
        seconds: float,
        grace: float,
        on_handover: Callable[[str], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.url, self.owner, self.seconds, self.grace = url, owner, seconds, grace
        self.on_handover, self.on_lost = on_handover, on_lost
        self.held: set[str] = set()
        self._db: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._lock = asyncio.Lock()  # one statement at a time on the connection
        self._tasks: list[asyncio.Task[None]] = []
        self.reachable = True

    async def start(self) -> None:
        self._db = await self._connect()
        self._tasks = [
            asyncio.create_task(self._renew_loop(), name="leases-renew"),
            asyncio.create_task(self._listen_loop(), name="leases-listen"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._db is not None:
            await self._db.close()

    async def _connect(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        return await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=5)

    async def _fetch(self, sql: str, args: dict[str, object]) -> list[tuple[object, ...]]:
        """One statement on the lease connection (made again if PostgreSQL restarted); raises
        StoreUnavailable while the database cannot be reached."""
        async with self._lock:
            try:
                if self._db is None or self._db.closed or self._db.broken:
                    self._db = await self._connect()
                values = {"me": self.owner, "s": self.seconds, **args}
                cursor = await self._db.execute(sql, values)
                return await cursor.fetchall() if cursor.description else []
            except psycopg.OperationalError as exc:
                raise StoreUnavailable(str(exc)) from exc

    # --- claiming ---------------------------------------------------------------------------

    async def claim(self, session: str) -> bool:
        """A new session: True if this front-end holds it now; False if the id is in use."""
        rows = await self._fetch(
            "INSERT INTO leases (session, owner, expires)"
            " VALUES (%(id)s, %(me)s, now() + make_interval(secs => %(s)s))"
            " ON CONFLICT (session) DO NOTHING RETURNING session",
            {"id": session},
        )
        if rows:
            self.held.add(session)
        return bool(rows)

    async def take(self, session: str, wait: float) -> Taken:
        """A resume: take the lease of a session another front-end served (or serves: it is
        asked to hand it over, and given `wait` seconds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        asked = 0.0
        while True:
            rows = await self._fetch(
                "UPDATE leases SET owner = %(me)s, epoch = epoch + 1,"
                " expires = now() + make_interval(secs => %(s)s)"
                " WHERE session = %(id)s"
                " AND (owner IS NULL OR owner = %(me)s OR expires < now()) RETURNING epoch",
                {"id": session},
            )
            if rows:
                self.held.add(session)
                return Taken.TAKEN
            if not await self._fetch(
                "SELECT 1 FROM leases WHERE session = %(id)s", {"id": session}
            ):
                return Taken.UNKNOWN
            now = loop.time()
            if now >= deadline:
                return Taken.BUSY
            if now - asked >= NOTIFY_EVERY_S:
                payload = json.dumps({"session": session, "to": self.owner})
                await self._fetch("SELECT pg_notify(%(ch)s, %(p)s)", {"ch": CHANNEL, "p": payload})
                asked = now
            await asyncio.sleep(POLL_S)

    def forget(self, session: str) -> None:
        """The session's release is with the store's writer (after its records): stop renewing."""
        self.held.discard(session)

    # --- holding --------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        every = self.seconds / RENEWS_PER_LEASE
        while True:
            await asyncio.sleep(every)
            try:
                await self.renew()
                await self.sweep()
                if not self.reachable:
                    log.warning("leases: the store is reachable again")
                self.reachable = True
            except StoreUnavailable as exc:
                if self.reachable:
                    log.warning("leases: cannot renew (%s); trying again", exc)
                self.reachable = False

    async def renew(self) -> None:
        """Extend every lease held; report those another front-end took meanwhile."""
        if not self.held:
            return
        asked = set(self.held)  # (leases claimed while this waits are not in the question)
        rows = await self._fetch(
            "UPDATE leases SET expires = now() + make_interval(secs => %(s)s)"
            " WHERE owner = %(me)s AND session = ANY(%(held)s) RETURNING session",
            {"held": sorted(asked)},
        )
        lost = (asked - {r[0] for r in rows}) & self.held  # and those let go meanwhile are not
        for session in lost:
            self.held.discard(session)
            log.warning("leases: session %s is served by another front-end now", session)
            self.on_lost(session)

    async def sweep(self) -> int:
        """Sessions whose lease nobody has held for `grace` seconds (their front-end died, or
        handed them over, and no client came back) are marked ended. Any front-end may."""
        rows = await self._fetch(
            "WITH gone AS (DELETE FROM leases"
            "  WHERE expires < now() - make_interval(secs => %(grace)s) RETURNING session)"
            " UPDATE sessions SET ended = extract(epoch FROM now()), summary = jsonb_build_object("
            "  'type', 'end', 'session', id, 'reason', 'not resumed after its server was lost')"
            " WHERE id IN (SELECT session FROM gone) AND ended IS NULL RETURNING id",
            {"grace": self.grace},
        )
        if rows:
            log.info("leases: %d session(s) not resumed in time were marked ended", len(rows))
        return len(rows)

    # --- hand-over requests -----------------------------------------------------------------

    async def _listen_loop(self) -> None:
        wait = 0.1
        while True:
            try:
                listener = await self._connect()
                async with listener:
                    await listener.execute(f"LISTEN {CHANNEL}")
                    wait = 0.1
                    async for note in listener.notifies():
                        self._asked(note.payload)
            except psycopg.Error as exc:
                log.warning("leases: hand-over requests unheard (%s); listening again", exc)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 5.0)

    def _asked(self, payload: str) -> None:
        try:
            request = json.loads(payload)
            session, to = request["session"], request["to"]
        except (ValueError, KeyError, TypeError):
            return
        if session in self.held and to != self.owner:
            self.on_handover(session)
