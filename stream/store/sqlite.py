"""The embedded store: one SQLite file in the data folder, clips as FLAC files beside it.

WAL mode, so readers (the HTTP API, in worker threads) never wait for the writer thread and a
crash leaves the last committed batch whole. One server per file: several front-ends share a
PostgreSQL store instead (postgres.py).

    store = SqliteStore(folder)           # folder/grym.sqlite3 and folder/audio/...
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from stream.store.migrations import TABLE, pending
from stream.store.rows import SESSION_LIST, listed
from stream.store.writer import BatchWriter, Write

# Each write kind: its statements, with the write's values by name (store/writer.py `values`).
STATEMENTS: dict[str, list[str]] = {
    "session": ["INSERT OR REPLACE INTO sessions (id, started, info) VALUES (:session, :a0, :a1)"],
    "entry": ["INSERT OR REPLACE INTO timeline (session, seq, start, end, fields)"
              " VALUES (:session, :a0, :a1, :a2, :a3)"],
    "analysis": ["INSERT OR REPLACE INTO timeline"
                 " VALUES (:session, :a0, :a1, :a2, :a3, :a4, :a5)"],
    "event": ["INSERT OR REPLACE INTO events VALUES (:session, :a0, :a1)"],
    "generation": ["INSERT OR REPLACE INTO generations VALUES (:session, :a0, :a1, :a2, :a3)"],
    "patterns": ["UPDATE timeline SET fields = json_set(fields, '$.patterns', json(:a0))"
                 " WHERE session = :session AND seq = :a1"],
    "error": ["INSERT INTO errors VALUES (:session, :a0, :a1, :a2)"],
    "end": ["UPDATE sessions SET ended = :a0, summary = :a1 WHERE id = :session"],
    "context": ["INSERT OR REPLACE INTO contexts VALUES (:session, :a0, :a1)"],
    "release": [],  # one server per file: nobody else could own its sessions
}  # fmt: skip


class SqliteStore(BatchWriter):
    dialect = "sqlite"

    def __init__(self, folder: str | Path, batch_seconds: float = 0.05) -> None:
        self.folder = Path(folder)
        self.batch_seconds = batch_seconds  # how long the writer gathers a batch
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "grym.sqlite3"
        self.audio_folder = self.folder / "audio"
        self.where = str(self.path)  # for the logs and /healthz
        self._migrate()
        self._db: sqlite3.Connection | None = None  # the writer thread's
        self._start_writer()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses no committed transaction
        return db

    def _migrate(self) -> None:
        db = self._connect()
        try:
            db.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (version INTEGER PRIMARY KEY,"
                       " name TEXT NOT NULL, applied REAL NOT NULL)")  # fmt: skip
            applied = {r[0] for r in db.execute(f"SELECT version FROM {TABLE}")}  # noqa: S608
            for step in pending(self.dialect, applied):
                record = (
                    f"INSERT INTO {TABLE} VALUES ({step.version}, '{step.name}', {time.time()})"
                )
                db.executescript(f"BEGIN;\n{step.sql}\n{record};\nCOMMIT;")
        finally:
            db.close()

    # --- the writer thread ------------------------------------------------------------------

    def _commit(self, batch: list[Write]) -> None:
        if self._db is None:
            self._db = self._connect()
        with self._db:  # one transaction per batch
            for write in batch:
                for sql in STATEMENTS[write.kind]:
                    self._db.execute(sql, write.values)

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- reads: any thread (the HTTP API runs them in a worker thread) -----------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        db = self._connect()
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def sessions(self) -> list[dict[str, Any]]:
        rows = self._query(SESSION_LIST)
        return [listed(r[0], r[1], r[2], json.loads(r[3]), _json(r[4]), r[5], r[6]) for r in rows]

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

    def resume_point(self, session: str, after_n: int = 0) -> dict[str, Any] | None:
        """What a session that did not end needs to go on: its info, its last timeline entry
        (seq, end in seconds), how many entries and generations it has, and the events it
        sent after `after_n` (in order), its last event's number."""
        rows = self._query("SELECT info FROM sessions WHERE id = ? AND ended IS NULL", (session,))
        if not rows:
            return None
        ((last_seq, last_end, entries),) = self._query(
            "SELECT MAX(seq), MAX(end), COUNT(*) FROM timeline WHERE session = ?", (session,)
        )  # fmt: skip
        ((generations,),) = self._query(
            "SELECT COALESCE(MAX(id), 0) FROM generations WHERE session = ?", (session,)
        )
        events = self._query(
            "SELECT n, event FROM timeline WHERE session = ?1 AND n > ?2"
            " UNION ALL SELECT n, event FROM events WHERE session = ?1 AND n > ?2 ORDER BY n",
            (session, after_n),
        )
        ((last_n,),) = self._query(
            "SELECT MAX(COALESCE((SELECT MAX(n) FROM timeline WHERE session = ?1), 0),"
            " COALESCE((SELECT MAX(n) FROM events WHERE session = ?1), 0))",
            (session,),
        )
        kept = self._query("SELECT start, pcm FROM contexts WHERE session = ?", (session,))
        return {
            "info": json.loads(rows[0][0]), "last_seq": last_seq, "last_end": last_end,
            "entries": entries, "generations": generations,
            "events": [json.loads(e) for _, e in events], "last_n": last_n,
            "context": {"start": kept[0][0], "pcm": bytes(kept[0][1])} if kept else None,
        }  # fmt: skip

    # --- clips: files in audio/<session>/<number>.flac ---------------------------------------

    def keep_clip(self, session: str, number: int, flac: bytes) -> str:
        """Write a clip (blocking: call it off the loop); returns the name its record holds."""
        name = f"{session}/{number}.flac"
        path = self.audio_folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(flac)
        return name

    def clip(self, session: str, number: int) -> bytes | None:
        rows = self._query(
            "SELECT audio FROM generations WHERE session = ? AND id = ?", (session, number)
        )
        path = self.audio_folder / rows[0][0] if rows and rows[0][0] else None
        return path.read_bytes() if path is not None and path.is_file() else None

    def audio_bytes(self, session: str | None = None) -> int:
        """Bytes of generated audio kept (of one session's, when named)."""
        folder = self.audio_folder / session if session else self.audio_folder
        if not folder.is_dir():
            return 0
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    # --- retention ----------------------------------------------------------------------------

    def ended_sessions(self) -> list[tuple[str, float]]:
        """(id, started) of the sessions that ended, oldest first."""
        return [
            (r[0], r[1])
            for r in self._query(
                "SELECT id, started FROM sessions WHERE ended IS NOT NULL ORDER BY started"
            )
        ]

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
                for table in ("timeline", "generations", "errors", "events", "contexts"):
                    db.execute(f"DELETE FROM {table} WHERE session = ?", (session,))  # noqa: S608
        finally:
            db.close()
        for (name,) in files:
            (self.audio_folder / name).unlink(missing_ok=True)
        return bool(found)


def _json(text: str | None) -> Any:
    return json.loads(text) if text else None
