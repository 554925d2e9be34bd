"""Persisted session context: a small storage interface and its SQLite implementation.

What a session leaves behind: its metadata and settings, its analysis timeline (per chunk: time
range, features, labels, transcript, optional embedding), its generations (prompt, seed, trigger,
window, timings, where the audio file is) and its errors. The server calls the `record_*` methods
from the event loop; they only enqueue (never block). A writer thread drains the queue in batches,
one transaction each, in WAL mode, so that readers (the HTTP API) never wait for it and a crash
leaves the last committed batch intact. `committed` is the count of records durably written, for
acknowledging what is safe.

    store = SqliteStore(folder)           # folder/grym.sqlite3 and folder/audio/...
    store.record_session(...); store.record_entry(...); store.flush(); store.close()
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, started REAL NOT NULL, ended REAL, info TEXT NOT NULL,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS timeline (
    session TEXT NOT NULL, seq INTEGER NOT NULL, start REAL NOT NULL, end REAL NOT NULL,
    fields TEXT NOT NULL, PRIMARY KEY (session, seq)
);
CREATE TABLE IF NOT EXISTS generations (
    session TEXT NOT NULL, id INTEGER NOT NULL, created REAL NOT NULL, record TEXT NOT NULL,
    audio TEXT, PRIMARY KEY (session, id)
);
CREATE TABLE IF NOT EXISTS errors (
    session TEXT NOT NULL, time REAL NOT NULL, code TEXT NOT NULL, event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS errors_by_session ON errors (session, time);
"""
BATCH_MAX = 500  # records per transaction
QUEUE_MAX = 100_000  # records waiting; beyond, record_* drops and counts (never blocks)


class Store(Protocol):
    """What the server needs of a store; a server database can stand in for SQLite."""

    enqueued: int  # records accepted by record_*
    committed: int  # of those, durably written: acks wait for them
    audio_folder: Path  # where generated audio files go

    def record_session(self, session: str, info: dict[str, Any]) -> None: ...
    def record_entry(
        self, session: str, seq: int, start: float, end: float, fields: dict[str, Any]
    ) -> None: ...
    def record_generation(
        self, session: str, number: int, record: dict[str, Any], audio: str | None
    ) -> None: ...
    def record_patterns(self, session: str, seq: int, findings: dict[str, Any]) -> None: ...
    def record_error(self, session: str, event: dict[str, Any]) -> None: ...
    def record_end(self, session: str, summary: dict[str, Any]) -> None: ...
    def unended(self) -> list[str]: ...
    def resume_point(self, session: str) -> dict[str, Any] | None: ...
    def sessions(self) -> list[dict[str, Any]]: ...
    def session(self, session: str) -> dict[str, Any] | None: ...
    def timeline(self, session: str, start: float, end: float) -> list[dict[str, Any]]: ...
    def apply_retention(self, max_days: float, max_gb: float) -> int: ...
    def delete(self, session: str) -> bool: ...
    def close(self) -> None: ...


class SqliteStore:
    def __init__(self, folder: str | Path, batch_seconds: float = 0.05) -> None:
        self.folder = Path(folder)
        self.batch_seconds = batch_seconds  # how long the writer gathers a batch
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "grym.sqlite3"
        self.audio_folder = self.folder / "audio"
        db = self._connect()
        try:
            db.executescript(SCHEMA)
        finally:
            db.close()
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue(QUEUE_MAX)
        self.enqueued = 0  # records accepted by record_*
        self.committed = 0  # records durably written (each batch is one transaction)
        self.dropped = 0
        self._done = threading.Condition()
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses no committed transaction
        return db

    # --- writes: from the event loop, enqueue only ------------------------------------------

    def _put(self, sql: str, args: tuple[Any, ...]) -> None:
        try:
            self._queue.put_nowait((sql, args))
            self.enqueued += 1
        except queue.Full:
            self.dropped += 1

    def record_session(self, session: str, info: dict[str, Any]) -> None:
        self._put(
            "INSERT OR REPLACE INTO sessions (id, started, info) VALUES (?, ?, ?)",
            (session, time.time(), json.dumps(info)),
        )

    def record_entry(
        self, session: str, seq: int, start: float, end: float, fields: dict[str, Any]
    ) -> None:
        self._put(
            "INSERT OR REPLACE INTO timeline VALUES (?, ?, ?, ?, ?)",
            (session, seq, start, end, json.dumps(fields)),
        )

    def record_generation(
        self, session: str, number: int, record: dict[str, Any], audio: str | None
    ) -> None:
        self._put(
            "INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?)",
            (session, number, time.time(), json.dumps(record), audio),
        )

    def record_patterns(self, session: str, seq: int, findings: dict[str, Any]) -> None:
        """The detectors' findings after chunk `seq`, kept with its timeline entry."""
        self._put(
            "UPDATE timeline SET fields = json_set(fields, '$.patterns', json(?))"
            " WHERE session = ? AND seq = ?",
            (json.dumps(findings), session, seq),
        )

    def record_error(self, session: str, event: dict[str, Any]) -> None:
        self._put(
            "INSERT INTO errors VALUES (?, ?, ?, ?)",
            (session, time.time(), event.get("code", ""), json.dumps(event)),
        )

    def record_end(self, session: str, summary: dict[str, Any]) -> None:
        self._put(
            "UPDATE sessions SET ended = ?, summary = ? WHERE id = ?",
            (time.time(), json.dumps(summary), session),
        )

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything enqueued so far is committed (shutdown, tests)."""
        target = self.enqueued
        deadline = time.monotonic() + timeout
        with self._done:
            while self.committed < target and self._writer.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._done.wait(remaining)
        return True

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(30)

    def _write_loop(self) -> None:
        db = self._connect()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
                deadline = time.monotonic() + self.batch_seconds
                stop = False
                while len(batch) < BATCH_MAX:
                    try:
                        more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                with db:  # one transaction per batch
                    for sql, args in batch:
                        db.execute(sql, args)
                with self._done:
                    self.committed += len(batch)
                    self._done.notify_all()
                if stop:
                    return
        finally:
            db.close()

    # --- reads: any thread (the HTTP API runs them in a worker thread) -----------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        db = self._connect()
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def sessions(self) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT s.id, s.started, s.ended, s.info, s.summary,"
            " (SELECT COUNT(*) FROM timeline t WHERE t.session = s.id),"
            " (SELECT COUNT(*) FROM generations g WHERE g.session = s.id)"
            " FROM sessions s ORDER BY s.started DESC"
        )
        return [
            {
                "id": r[0], "started": r[1], "ended": r[2], "info": json.loads(r[3]),
                "summary": json.loads(r[4]) if r[4] else None, "chunks": r[5],
                "generations": r[6],
            }
            for r in rows
        ]  # fmt: skip

    def session(self, session: str) -> dict[str, Any] | None:
        found = [s for s in self.sessions() if s["id"] == session]
        if not found:
            return None
        gens = self._query(
            "SELECT id, record, audio FROM generations WHERE session = ? ORDER BY id", (session,)
        )
        errors = self._query("SELECT event FROM errors WHERE session = ? ORDER BY time", (session,))
        return {
            **found[0],
            "generations": [
                {"id": g[0], **json.loads(g[1]), "audio": g[2] is not None} for g in gens
            ],
            "errors": [json.loads(e[0]) for e in errors],
        }

    def timeline(self, session: str, start: float, end: float) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT seq, start, end, fields FROM timeline"
            " WHERE session = ? AND end > ? AND start < ? ORDER BY seq",
            (session, start, end),
        )
        return [{"seq": r[0], "start": r[1], "end": r[2], **json.loads(r[3])} for r in rows]

    def unended(self) -> list[str]:
        """Sessions without an `end`: live when the server stopped (or died)."""
        return [r[0] for r in self._query("SELECT id FROM sessions WHERE ended IS NULL")]

    def resume_point(self, session: str) -> dict[str, Any] | None:
        """What a session that did not end needs to go on after a restart: its info, its last
        timeline entry (seq, end in seconds), how many entries and generations it has."""
        rows = self._query("SELECT info FROM sessions WHERE id = ? AND ended IS NULL", (session,))
        if not rows:
            return None
        ((last_seq, last_end, entries),) = self._query(
            "SELECT MAX(seq), MAX(end), COUNT(*) FROM timeline WHERE session = ?", (session,)
        )  # fmt: skip
        ((generations,),) = self._query(
            "SELECT COALESCE(MAX(id), 0) FROM generations WHERE session = ?", (session,)
        )
        return {
            "info": json.loads(rows[0][0]), "last_seq": last_seq, "last_end": last_end,
            "entries": entries, "generations": generations,
        }  # fmt: skip

    def generation_audio(self, session: str, number: int) -> Path | None:
        rows = self._query(
            "SELECT audio FROM generations WHERE session = ? AND id = ?", (session, number)
        )
        return self.audio_folder / rows[0][0] if rows and rows[0][0] else None

    def apply_retention(self, max_days: float, max_gb: float) -> int:
        """Delete ended sessions older than `max_days`, then the oldest ended ones while the
        generated audio exceeds `max_gb`. Returns how many sessions went."""
        removed = 0
        cutoff = time.time() - max_days * 86400
        ended = self._query(
            "SELECT id, started FROM sessions WHERE ended IS NOT NULL ORDER BY started"
        )
        for session, started in ended:
            if started < cutoff and self.delete(session):
                removed += 1
        # One walk of the audio folder; each deleted session's files come off the total.
        total, limit = self.audio_bytes(), max_gb * 1e9
        for session, _ in ended:
            if total <= limit:
                break
            size = self.audio_bytes(session)
            if self.delete(session):
                removed += 1
                total -= size
        return removed

    def audio_bytes(self, session: str | None = None) -> int:
        """Bytes of generated audio kept (of one session's, when named)."""
        folder = self.audio_folder / session if session else self.audio_folder
        if not folder.is_dir():
            return 0
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    def delete(self, session: str) -> bool:
        """Everything of a session, its audio files too. Waits for pending writes first."""
        self.flush()
        db = self._connect()
        try:
            with db:  # one transaction
                files = db.execute(
                    "SELECT audio FROM generations WHERE session = ? AND audio IS NOT NULL",
                    (session,),
                ).fetchall()
                found = db.execute("DELETE FROM sessions WHERE id = ?", (session,)).rowcount
                for table in ("timeline", "generations", "errors"):
                    db.execute(f"DELETE FROM {table} WHERE session = ?", (session,))  # noqa: S608
        finally:
            db.close()
        for (name,) in files:
            (self.audio_folder / name).unlink(missing_ok=True)
        return bool(found)
