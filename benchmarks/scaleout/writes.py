"""Part 2, writes: PostgreSQL's counters over a window of the load, the rates per session and
second of audio from them, what the store holds after, and the paper estimate for 10,000
concurrent sessions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import psycopg

ESTIMATE_SESSIONS = 10_000
COUNTERS = (
    "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, "
    "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint "
    "FROM pg_stat_database WHERE datname = %s"
)
COUNTER_NAMES = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted",
                 "wal_bytes")  # fmt: skip


# Rows written per table, a table's TOAST (its large values, in ~2 KB pieces) under its name.
TABLES = """
SELECT coalesce(owner.relname || ' (TOAST)', s.relname), s.n_tup_ins + s.n_tup_upd + s.n_tup_del
FROM pg_stat_all_tables s LEFT JOIN pg_class owner ON owner.reltoastrelid = s.relid
WHERE s.schemaname NOT IN ('pg_catalog', 'information_schema')
  AND (s.schemaname <> 'pg_toast' OR owner.relnamespace <> 'pg_catalog'::regnamespace)
"""
# What the store holds after the load: rows and bytes (indexes and TOAST included) per table.
SIZES = """
SELECT relname, n_live_tup, pg_total_relation_size(relid) FROM pg_stat_user_tables
ORDER BY pg_total_relation_size(relid) DESC
"""


async def counters(admin_url: str, url: str) -> dict[str, Any]:
    """The database's cumulative counters and the cluster's WAL position, now (read from
    another database, `postgres`, so that reading them does not count), and rows written per
    table (read in the database itself: one more transaction there, taken off in write_rates).
    A backend publishes its counters at most once a second while busy, so each reading is up to
    ~1 s behind; that cancels over a window whose both ends are under the same load."""
    database = url.rsplit("/", 1)[1]
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as db:
        row = await (await db.execute(COUNTERS, (database,))).fetchone()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        tables = dict(await (await db.execute(TABLES)).fetchall())
    assert row is not None
    return {"t": time.monotonic(), **dict(zip(COUNTER_NAMES, map(float, row), strict=True)),
            "tables": {name: float(n) for name, n in tables.items()}}  # fmt: skip


def window_of(
    admin_url: str, url: str, lead: float, length: float, sessions: int
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A `during` for live_load: counters at `lead` s into the load and `length` s later."""

    async def during() -> dict[str, Any]:
        await asyncio.sleep(lead)
        before = await counters(admin_url, url)
        await asyncio.sleep(length)
        after = await counters(admin_url, url)
        return {"db_window": {"before": before, "after": after, "sessions": sessions}}

    return during


def sizes(url: str) -> dict[str, dict[str, float]]:
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("ANALYZE")  # n_live_tup, now
        rows = db.execute(SIZES).fetchall()
    return {name: {"rows": n, "bytes": size, "bytes_per_row": size / n if n else float("nan")}
            for name, n, size in rows}  # fmt: skip


def write_rates(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per session and second of audio, over the windows (pooled)."""
    span = sum(w["after"]["t"] - w["before"]["t"] for w in windows)
    session_s = sum((w["after"]["t"] - w["before"]["t"]) * w["sessions"] for w in windows)
    delta = {k: sum(w["after"][k] - w["before"][k] for w in windows) for k in COUNTER_NAMES}
    delta["xact_commit"] -= len(windows)  # the reading of the tables before each window
    names = sorted({name for w in windows for name in w["after"]["tables"]})
    tables = {
        name: sum(w["after"]["tables"].get(name, 0) - w["before"]["tables"].get(name, 0)
                  for w in windows) / session_s
        for name in names
    }  # fmt: skip
    rows = delta["tup_inserted"] + delta["tup_updated"] + delta["tup_deleted"]
    return {
        "window_s": round(span, 2),
        "session_seconds": round(session_s, 2),
        "delta": delta,
        "per_session": {
            "transactions_per_s": delta["xact_commit"] / session_s,
            "rows_per_s": rows / session_s,
            "inserted_per_s": delta["tup_inserted"] / session_s,
            "updated_per_s": delta["tup_updated"] / session_s,
            "wal_kb_per_s": delta["wal_bytes"] / 1024 / session_s,
        },
        "rows_per_s_by_table": {k: v for k, v in sorted(tables.items(), key=lambda x: -x[1]) if v},
        "total_per_s": {
            "transactions_per_s": delta["xact_commit"] / span,
            "rows_per_s": rows / span,
            "wal_kb_per_s": delta["wal_bytes"] / 1024 / span,
        },
    }


def estimate(per_session: dict[str, float], bench: dict[str, Any] | None) -> dict[str, Any]:
    """10,000 concurrent sessions on paper: the measured rates times 10,000, and the cores the
    analysis needs at the full bench's sessions per core (its committed run, if any)."""
    n = ESTIMATE_SESSIONS
    out: dict[str, Any] = {
        "sessions": n,
        "transactions_per_s": per_session["transactions_per_s"] * n,
        "rows_per_s": per_session["rows_per_s"] * n,
        "wal_mb_per_s": per_session["wal_kb_per_s"] * n / 1024,
        "wal_gb_per_hour": per_session["wal_kb_per_s"] * n * 3600 / 1024**2,
    }
    if bench:
        sessions = bench["headline"]["max_sustained_sessions"]
        cpus = bench["machine"]["usable_cpus"]
        per_core = sessions / cpus
        out.update({
            "bench_sessions": sessions, "bench_cpus": cpus, "bench_created": bench["created"],
            "bench_cpu": bench["machine"]["cpu"],
            "sessions_per_core": per_core, "cores": int(np.ceil(n / per_core)),
            "frontends_of_16_cores": int(np.ceil(n / per_core / 16)),
        })  # fmt: skip
    return out
