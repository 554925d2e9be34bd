"""The shared store: one PostgreSQL database for several front-end servers (`--store
postgresql://...`).

The same writes and reads as the SQLite store (a test suite runs on both), plus what sharing
needs: clips live in the database (`clips`, FLAC), so any front-end can serve them; and writes
are fenced by ownership. A front-end writes a session's records only while it holds the
session's lease (leases.py): each batch, in its transaction, locks the leases of the sessions it
writes (FOR SHARE: a takeover's UPDATE waits for the batch, and the batch for the takeover) and
drops the writes of sessions this front-end no longer owns, so two front-ends never both append
to one session's timeline. Such sessions are reported to `on_fenced` (the manager ends them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from stream.store.migrations import LOCK_ID, TABLE, pending
from stream.store.rows import SESSION_LIST, listed
from stream.store.writer import BatchWriter, StoreUnavailable, Write

log = logging.getLogger(__name__)
READERS = 4  # connections for reads (the HTTP API, resumes), shared by threads

UPSERT_TIMELINE = (
    "INSERT INTO timeline (session, seq, t_start, t_end, fields, n, event)"
    " VALUES (%(session)s, %(a0)s, %(a1)s, %(a2)s, %(a3)s::jsonb, {n}, {event})"
    " ON CONFLICT (session, seq) DO UPDATE SET t_start = excluded.t_start,"
    " t_end = excluded.t_end, fields = excluded.fields, n = excluded.n, event = excluded.event"
)
STATEMENTS: dict[str, list[str]] = {
    "session": ["INSERT INTO sessions (id, started, info) VALUES (%(session)s, %(a0)s, %(a1)s)"
                " ON CONFLICT (id) DO UPDATE SET started = excluded.started,"
                " info = excluded.info, ended = NULL, summary = NULL"],
    "entry": [UPSERT_TIMELINE.format(n="NULL", event="NULL")],
    "analysis": [UPSERT_TIMELINE.format(n="%(a4)s", event="%(a5)s::jsonb")],
    "event": ["INSERT INTO events VALUES (%(session)s, %(a0)s, %(a1)s::jsonb)"
              " ON CONFLICT (session, n) DO UPDATE SET event = excluded.event"],
    "generation": ["INSERT INTO generations VALUES (%(session)s, %(a0)s, %(a1)s, %(a2)s::jsonb,"
                   " %(a3)s) ON CONFLICT (session, id) DO UPDATE SET created = excluded.created,"
                   " record = excluded.record, audio = excluded.audio"],
    "patterns": ["UPDATE timeline SET fields = jsonb_set(fields, '{patterns}', %(a0)s::jsonb)"
                 " WHERE session = %(session)s AND seq = %(a1)s"],
    "error": ["INSERT INTO errors VALUES (%(session)s, %(a0)s, %(a1)s, %(a2)s::jsonb)"],
    "end": ["UPDATE sessions SET ended = %(a0)s, summary = %(a1)s::jsonb"
            " WHERE id = %(session)s"],
    "context": ["INSERT INTO contexts VALUES (%(session)s, %(a0)s, %(a1)s)"
                " ON CONFLICT (session) DO UPDATE SET start = excluded.start, pcm = excluded.pcm"],
    "release": ["UPDATE leases SET owner = NULL, expires = now()"
                " WHERE session = %(session)s AND owner = %(owner)s"],
}  # fmt: skip


class PostgresStore(BatchWriter):
    dialect = "postgresql"
    unreachable = (psycopg.OperationalError,)

    def __init__(
        self,
        url: str,
        batch_seconds: float = 0.05,
        owner: str | None = None,
        on_fenced: Callable[[str], None] | None = None,
    ) -> None:
        """`owner`: this front-end's id; with it, writes are fenced by the sessions' leases
        (without it, as for tools and tests, they are not). `on_fenced(session)` is called from
        the writer thread when a session's writes were dropped because another owns it now."""
        self.url = url
        self.batch_seconds = batch_seconds
        self.owner = owner
        self.on_fenced = on_fenced
        self.where = _without_password(url)
        self.fenced = 0  # writes dropped: their session had moved to another front-end
        self._migrate()
        self._db: psycopg.Connection[Any] | None = None  # the writer thread's
        # Each connection is checked as it is taken: after PostgreSQL restarts, a read gets a
        # new connection rather than a dead one.
        self._readers = ConnectionPool(
            url, min_size=1, max_size=READERS, kwargs={"autocommit": True}, open=True,
            name="store-readers", check=ConnectionPool.check_connection,
        )  # fmt: skip
        self._start_writer()

    def _migrate(self) -> None:
        with psycopg.connect(self.url, autocommit=False) as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))  # one front-end at a time
            db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (version integer PRIMARY KEY,"
                       " name text NOT NULL, applied double precision NOT NULL)")  # fmt: skip
            applied = {r[0] for r in db.execute(f"SELECT version FROM {TABLE}")}  # noqa: S608
            for step in pending(self.dialect, applied):
                log.info("store: migrating to version %d (%s)", step.version, step.name)
                db.execute(step.sql.encode())  # several statements: no parameters
                db.execute(
                    f"INSERT INTO {TABLE} VALUES (%s, %s, %s)",  # noqa: S608
                    (step.version, step.name, time.time()),
                )
            db.commit()

    # --- the writer thread ------------------------------------------------------------------

    def _commit(self, batch: list[Write]) -> None:
        if self._db is None:
            self._db = psycopg.connect(self.url, autocommit=False, connect_timeout=5)
        db = self._db
        with db.transaction(), db.pipeline():
            lost = self._fence(db, batch)
            for write in batch:
                if write.session in lost:
                    continue
                values = {**write.values, "owner": self.owner}
                for sql in STATEMENTS[write.kind]:
                    db.execute(sql, values)
        for session in lost:
            self.fenced += sum(w.session == session for w in batch)
            log.warning("store: writes of session %s dropped: another front-end owns it", session)
            if self.on_fenced is not None:
                self.on_fenced(session)

    def _fence(self, db: psycopg.Connection[Any], batch: list[Write]) -> set[str]:
        """The sessions of `batch` whose leases this front-end does not hold (locked FOR SHARE
        until the batch commits). Nothing is fenced without an owner."""
        if self.owner is None:
            return set()
        sessions = sorted({w.session for w in batch})
        held = db.execute(
            "SELECT session FROM leases WHERE owner = %s AND session = ANY(%s)"
            " ORDER BY session FOR SHARE",
            (self.owner, sessions),
        ).fetchall()
        return set(sessions) - {r[0] for r in held}

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def close(self) -> None:
        super().close()
        self._readers.close()

    # --- reads: any thread ------------------------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._readers.connection(timeout=5) as db:
                with db.cursor(row_factory=tuple_row) as cursor:
                    return cursor.execute(sql, args).fetchall()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailable(str(exc)) from exc

    def sessions(self) -> list[dict[str, Any]]:
        rows = self._query(SESSION_LIST)
        return [listed(*r) for r in rows]

    def session(self, session: str) -> dict[str, Any] | None:
        found = [s for s in self.sessions() if s["id"] == session]
        if not found:
            return None
        gens = self._query(
            "SELECT id, record, audio FROM generations WHERE session = %s ORDER BY id", (session,)
        )
        errors = self._query(
            "SELECT event FROM errors WHERE session = %s ORDER BY time", (session,)
        )
        return {
            **found[0],
            "generations": [{"id": g[0], **g[1], "audio": g[2] is not None} for g in gens],
            "errors": [e[0] for e in errors],
        }

    def timeline(self, session: str, start: float, end: float) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT seq, t_start, t_end, fields FROM timeline"
            " WHERE session = %s AND t_end > %s AND t_start < %s ORDER BY seq",
            (session, start, end),
        )
        return [{"seq": r[0], "start": r[1], "end": r[2], **r[3]} for r in rows]

    def unended(self) -> list[str]:
        return [r[0] for r in self._query("SELECT id FROM sessions WHERE ended IS NULL")]

    def resume_point(self, session: str, after_n: int = 0) -> dict[str, Any] | None:
        """As SqliteStore.resume_point."""
        rows = self._query("SELECT info FROM sessions WHERE id = %s AND ended IS NULL", (session,))
        if not rows:
            return None
        ((last_seq, last_end, entries, generations),) = self._query(
            "SELECT MAX(seq), MAX(t_end), COUNT(*),"
            " (SELECT COALESCE(MAX(id), 0) FROM generations WHERE session = %(s)s)"
            " FROM timeline WHERE session = %(s)s",
            {"s": session},  # type: ignore[arg-type]
        )
        events = self._query(
            "SELECT n, event FROM timeline WHERE session = %(s)s AND n > %(n)s"
            " UNION ALL SELECT n, event FROM events WHERE session = %(s)s AND n > %(n)s"
            " ORDER BY n",
            {"s": session, "n": after_n},  # type: ignore[arg-type]
        )
        ((last_n,),) = self._query(
            "SELECT GREATEST((SELECT MAX(n) FROM timeline WHERE session = %(s)s),"
            " (SELECT MAX(n) FROM events WHERE session = %(s)s), 0)",
            {"s": session},  # type: ignore[arg-type]
        )
        kept = self._query("SELECT start, pcm FROM contexts WHERE session = %s", (session,))
        return {
            "info": rows[0][0], "last_seq": last_seq, "last_end": last_end, "entries": entries,
            "generations": generations, "events": [e for _, e in events], "last_n": last_n,
            "context": {"start": kept[0][0], "pcm": bytes(kept[0][1])} if kept else None,
        }  # fmt: skip

    # --- clips: in the database ---------------------------------------------------------------

    def keep_clip(self, session: str, number: int, flac: bytes) -> str:
        """Store a clip (blocking: call it off the loop); returns the name its record holds."""
        with self._readers.connection() as db:
            db.execute(
                "INSERT INTO clips VALUES (%s, %s, %s)"
                " ON CONFLICT (session, id) DO UPDATE SET flac = excluded.flac",
                (session, number, flac),
            )
        return f"db:{session}/{number}"

    def clip(self, session: str, number: int) -> bytes | None:
        rows = self._query(
            "SELECT flac FROM clips WHERE session = %s AND id = %s", (session, number)
        )
        return bytes(rows[0][0]) if rows else None

    def audio_bytes(self, session: str | None = None) -> int:
        rows = self._query(
            "SELECT COALESCE(SUM(octet_length(flac)), 0) FROM clips"
            " WHERE %(s)s::text IS NULL OR session = %(s)s",
            {"s": session},  # type: ignore[arg-type]
        )
        return int(rows[0][0])

    # --- retention ----------------------------------------------------------------------------

    def ended_sessions(self) -> list[tuple[str, float]]:
        rows = self._query(
            "SELECT id, started FROM sessions WHERE ended IS NOT NULL ORDER BY started"
        )
        return [(r[0], r[1]) for r in rows]

    def delete(self, session: str) -> bool:
        """Everything of a session, its clips too. Waits for pending writes first."""
        self.flush()
        with self._readers.connection() as db, db.transaction():
            found = db.execute("DELETE FROM sessions WHERE id = %s", (session,)).rowcount
            for table in ("timeline", "generations", "errors", "events", "clips", "leases",
                          "contexts"):  # fmt: skip
                db.execute(f"DELETE FROM {table} WHERE session = %s", (session,))  # noqa: S608
        return bool(found)


def _without_password(url: str) -> str:
    """The URL for logs: a password in it is masked."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    if info.get("password"):
        info["password"] = "***"
    return " ".join(f"{k}={v}" for k, v in info.items())
