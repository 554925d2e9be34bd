"""The store suite, on both backends: SQLite (real files, a writer thread, kill -9) and a real
PostgreSQL (grym/cluster/postgres.py starts one for the run). Fencing by leases is PostgreSQL's."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stream.store import PostgresStore, SqliteStore, Store, apply_retention
from stream.store.migrations import migrations

ROOT = Path(__file__).resolve().parent.parent
# The schema of the first release, before versioned migrations: such databases must upgrade.
FIRST_RELEASE = """
CREATE TABLE sessions (id TEXT PRIMARY KEY, started REAL NOT NULL, ended REAL, info TEXT NOT NULL,
    summary TEXT);
CREATE TABLE timeline (session TEXT NOT NULL, seq INTEGER NOT NULL, start REAL NOT NULL,
    end REAL NOT NULL, fields TEXT NOT NULL, PRIMARY KEY (session, seq));
CREATE TABLE generations (session TEXT NOT NULL, id INTEGER NOT NULL, created REAL NOT NULL,
    record TEXT NOT NULL, audio TEXT, PRIMARY KEY (session, id));
CREATE TABLE errors (session TEXT NOT NULL, time REAL NOT NULL, code TEXT NOT NULL,
    event TEXT NOT NULL);
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens the store under test (again, on the same database, when called again)."""
    opened: list[Store] = []

    def make() -> Store:
        if request.param == "sqlite":
            store: Store = SqliteStore(tmp_path)
        else:
            store = PostgresStore(request.getfixturevalue("pg_url"))
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def sql(store: Store, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    """Straight at the database (for what the API does not do: ageing a session)."""
    if isinstance(store, SqliteStore):
        db = sqlite3.connect(store.path)
        try:
            with db:
                return db.execute(statement, args).fetchall()
        finally:
            db.close()
    assert isinstance(store, PostgresStore)
    with psycopg.connect(store.url, autocommit=True) as db:
        cursor = db.execute(statement.replace("?", "%s"), args)
        return cursor.fetchall() if cursor.description else []


def analysed(store: Store, session: str, seq: int, n: int, text: str = "") -> None:
    fields = {"features": {"rms_dbfs": -20.0 - seq}, "transcript": {"text": text or f"w{seq}"}}
    event = {"type": "analysis", "session": session, "seq": seq, "n": n, **fields}
    store.record_analysis(session, seq, float(seq), float(seq + 1), fields, event)


def test_records_round_trip_and_delete(open_store: Callable[[], Store]) -> None:
    store = open_store()
    store.record_session("s1", {"sample_rate": 48000, "config": {"chunk_seconds": 1.0}})
    for seq in range(5):
        analysed(store, "s1", seq, n=seq + 1)
    name = store.keep_clip("s1", 1, b"fLaC")
    store.record_generation("s1", 1, {"prompt": {"text": "rain"}, "seed": 7}, name)
    store.record_patterns("s1", 2, {"window": {"start": 0.0, "end": 3.0}, "pace": 1})
    store.record_error("s1", {"type": "error", "code": "partial_frame", "message": "x"})
    store.record_end("s1", {"samples_received": 240000})
    assert store.flush()
    listed = store.sessions()
    assert [(s["id"], s["chunks"], s["generations"]) for s in listed] == [("s1", 5, 1)]
    whole = store.session("s1")
    assert whole is not None and whole["summary"] == {"samples_received": 240000}
    assert whole["info"]["config"] == {"chunk_seconds": 1.0}
    assert whole["generations"][0]["seed"] == 7 and whole["generations"][0]["audio"]
    assert whole["errors"][0]["code"] == "partial_frame"
    window = store.timeline("s1", 1.5, 3.0)
    assert [e["seq"] for e in window] == [1, 2]
    assert window[0]["transcript"]["text"] == "w1" and window[1]["patterns"]["pace"] == 1
    assert store.clip("s1", 1) == b"fLaC" and store.clip("s1", 2) is None
    assert store.audio_bytes() == store.audio_bytes("s1") == 4
    assert store.unended() == [] and store.resume_point("s1") is None  # it ended
    assert store.delete("s1") and store.sessions() == []
    assert store.clip("s1", 1) is None and store.audio_bytes() == 0 and not store.delete("s1")


def test_a_resume_point_has_the_events_after_the_clients_last(
    open_store: Callable[[], Store],
) -> None:
    store = open_store()
    store.record_session("s", {"sample_rate": 16000})
    for n, event in enumerate(
        [("analysis", 0), ("patterns", 0), ("ack", None), ("analysis", 1), ("generation.done", 1)],
        start=1,
    ):
        kind, seq = event
        if kind == "analysis":
            analysed(store, "s", seq, n)
        else:  # acks are not kept: the next ack (or `ready`) says the same
            store.record_event("s", {"type": kind, "session": "s", "n": n, "x": seq})
    assert store.flush()
    point = store.resume_point("s", after_n=1)
    assert point is not None and point["info"] == {"sample_rate": 16000}
    assert (point["last_seq"], point["last_end"], point["entries"]) == (1, 2.0, 2)
    assert [(e["n"], e["type"]) for e in point["events"]] == [
        (2, "patterns"), (4, "analysis"), (5, "generation.done"),
    ]  # fmt: skip
    assert point["last_n"] == 5 and point["events"][1]["seq"] == 1
    assert store.resume_point("s", after_n=5)["events"] == []  # type: ignore[index]
    assert store.unended() == ["s"]


def test_writes_never_block_and_readers_see_committed_batches(
    open_store: Callable[[], Store],
) -> None:
    store = open_store()
    count = 5_000
    store.record_session("s", {})
    started = time.perf_counter()
    for seq in range(count):
        analysed(store, "s", seq, n=seq + 1)
    enqueue_s = time.perf_counter() - started
    seen = len(store.timeline("s", 0, 1e9))  # a reader while the writer works
    assert store.flush(60)
    assert len(store.timeline("s", 0, 1e9)) == count and 0 <= seen <= count
    assert store.committed == count + 1 and store.enqueued == count + 1
    assert enqueue_s < 5.0  # generous: enqueueing is a queue put, no I/O


def test_migrations_are_versioned_and_applied_once(open_store: Callable[[], Store]) -> None:
    store = open_store()
    dialect = "sqlite" if isinstance(store, SqliteStore) else "postgresql"
    versions = [m.version for m in migrations(dialect)]
    applied = sql(store, "SELECT version FROM schema_migrations ORDER BY version")
    assert [v for (v,) in applied] == versions and versions[0] == 1
    store.record_session("kept", {})
    store.flush()
    again = open_store()  # the same database: nothing to apply, nothing lost
    assert [s["id"] for s in again.sessions()] == ["kept"]
    assert len(sql(again, "SELECT version FROM schema_migrations")) == len(versions)


def test_a_database_of_the_first_release_upgrades_in_place(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "grym.sqlite3")
    with db:
        db.executescript(FIRST_RELEASE)
        db.execute("INSERT INTO sessions VALUES ('old', 1.0, NULL, '{}', NULL)")
        db.execute("INSERT INTO timeline VALUES ('old', 0, 0.0, 1.0, '{\"a\": 1}')")
    db.close()
    store = SqliteStore(tmp_path)
    try:
        assert [e["a"] for e in store.timeline("old", 0, 10)] == [1]
        analysed(store, "old", 1, n=7)
        store.flush()
        point = store.resume_point("old")
        assert point is not None and point["last_seq"] == 1 and point["last_n"] == 7
    finally:
        store.close()


def test_retention_removes_old_sessions_and_keeps_the_audio_budget(
    open_store: Callable[[], Store],
) -> None:
    store = open_store()
    for name in ("old", "new"):
        store.record_session(name, {})
        store.record_generation(name, 1, {}, store.keep_clip(name, 1, b"x" * 1000))
        store.record_end(name, {})
    store.flush()
    assert apply_retention(store, max_days=30, max_gb=1.0) == 0
    sql(store, "UPDATE sessions SET started = ? WHERE id = 'old'", time.time() - 40 * 86400)
    assert apply_retention(store, max_days=30, max_gb=1.0) == 1  # the age limit takes it
    assert [s["id"] for s in store.sessions()] == ["new"]
    # A budget below what is kept: the oldest ended sessions go until it fits.
    assert apply_retention(store, max_days=30, max_gb=500e-9) == 1 and store.sessions() == []
    assert store.audio_bytes() == 0


def test_writes_of_a_session_another_front_end_owns_are_fenced(pg_url: str) -> None:
    fenced: list[str] = []
    first = PostgresStore(pg_url, owner="a")  # migrates
    second = PostgresStore(pg_url, owner="b", on_fenced=fenced.append)
    try:
        sql(first, "INSERT INTO leases (session, owner, expires) VALUES"
                   " ('s', 'a', now() + interval '1 minute')")  # fmt: skip
        first.record_session("s", {"by": "a"})
        analysed(first, "s", 0, n=1, text="from a")
        assert first.flush()
        second.record_session("s", {"by": "b"})  # b lost the lease (or never had it)
        analysed(second, "s", 0, n=1, text="from b")
        analysed(second, "s", 1, n=2, text="from b")
        assert second.flush()
        assert fenced == ["s"] and second.fenced == 3
        kept = first.session("s")
        assert kept is not None and kept["info"] == {"by": "a"}
        assert [e["transcript"]["text"] for e in first.timeline("s", 0, 10)] == ["from a"]
        first.release("s")  # after its records, in order: the lease has no owner now
        assert first.flush()
        assert sql(first, "SELECT owner FROM leases WHERE session = 's'") == [(None,)]
    finally:
        first.close()
        second.close()


WRITER = """
import sys, time
from stream.store import SqliteStore
store = SqliteStore(sys.argv[1])
store.record_session("s", {})
seq = 0
while True:
    for _ in range(200):
        store.record_entry("s", seq, seq * 0.02, (seq + 1) * 0.02, {"n": seq, "pad": "x" * 200})
        seq += 1
    store.flush()
    print(store.committed - 1, flush=True)  # entries known durable
"""


@pytest.mark.parametrize("after", [0.3, 0.9])
def test_kill_9_under_write_load_keeps_the_database_whole(tmp_path: Path, after: float) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    durable = 0
    deadline = time.monotonic() + after
    for line in proc.stdout:
        durable = int(line)
        if time.monotonic() > deadline and durable > 0:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    db = sqlite3.connect(tmp_path / "grym.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        count = db.execute("SELECT COUNT(*) FROM timeline WHERE session = 's'").fetchone()[0]
        seqs = db.execute("SELECT MIN(seq), MAX(seq) FROM timeline").fetchone()
    finally:
        db.close()
    # Nothing reported durable was lost, and what is there has no holes.
    assert count >= durable > 0
    assert seqs[0] == 0 and seqs[1] == count - 1


def test_writes_wait_while_postgresql_restarts_and_none_is_lost() -> None:
    from grym.cluster.postgres import Postgres

    with Postgres() as pg:  # its own: this test stops it
        store = PostgresStore(pg.url, batch_seconds=0.01)
        try:
            store.record_session("s", {})
            for seq in range(50):
                analysed(store, "s", seq, n=seq + 1)
            assert store.flush()
            pg.stop()  # fast shutdown: the writer's connection is cut
            for seq in range(50, 100):
                analysed(store, "s", seq, n=seq + 1)
            assert not store.flush(timeout=1.5)  # they wait: not committed, not dropped
            assert store.failing and store.committed == 51
            pg.start()
            assert store.flush(timeout=30) and not store.failing
            assert [e["seq"] for e in store.timeline("s", 0, 1e9)] == list(range(100))
            assert store.dropped == store.rejected == 0
        finally:
            store.close()
