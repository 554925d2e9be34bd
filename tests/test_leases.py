"""Leases on a real PostgreSQL (stream/store/leases.py): which front-end serves a session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest

from stream.store import PostgresStore
from stream.store.leases import Leases, Taken


@pytest.fixture
async def open_leases(pg_url: str) -> AsyncIterator[Callable[..., Leases]]:
    PostgresStore(pg_url).close()  # the schema
    opened: list[Leases] = []

    async def make(owner: str, seconds: float = 10.0, grace: float = 60.0) -> Leases:
        events: dict[str, list[str]] = {"handover": [], "lost": []}
        leases = Leases(
            pg_url, owner, seconds, grace,
            on_handover=events["handover"].append, on_lost=events["lost"].append,
        )  # fmt: skip
        leases.events = events  # type: ignore[attr-defined]
        await leases.start()
        opened.append(leases)
        return leases

    yield make  # type: ignore[misc]
    for leases in opened:
        await leases.close()


def sql(url: str, statement: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as db:
        cursor = db.execute(statement)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


async def test_an_id_is_claimed_once_and_taken_over_only_when_its_owner_is_gone(
    open_leases: Callable[..., Leases], pg_url: str
) -> None:
    a, b = await open_leases("a"), await open_leases("b")
    assert await a.claim("s") and not await b.claim("s")
    assert await b.take("nobody", wait=0.2) is Taken.UNKNOWN
    # a lives and is asked to hand it over (it does not here): b gives up after its wait.
    assert await b.take("s", wait=1.2) is Taken.BUSY
    assert a.events["handover"][:1] == ["s"]  # type: ignore[attr-defined]
    sql(pg_url, "UPDATE leases SET expires = now() - interval '1 second'")  # a died
    assert await b.take("s", wait=0.2) is Taken.TAKEN
    assert sql(pg_url, "SELECT owner, epoch FROM leases") == [("b", 2)]
    await a.renew()  # a finds it lost
    assert a.events["lost"] == ["s"] and "s" not in a.held  # type: ignore[attr-defined]


async def test_a_lease_claimed_while_renewing_is_not_taken_for_lost(
    open_leases: Callable[..., Leases],
) -> None:
    a = await open_leases("a")
    assert await a.claim("first")
    # The claim takes the connection first; the renewal asks about what was held before it.
    claimed, _ = await asyncio.gather(a.claim("second"), a.renew())
    assert claimed and a.events["lost"] == [] and a.held == {"first", "second"}  # type: ignore[attr-defined]


async def test_leases_nobody_holds_are_swept_and_their_sessions_ended(
    open_leases: Callable[..., Leases], pg_url: str
) -> None:
    a = await open_leases("a", grace=0.5)
    store = PostgresStore(pg_url)
    store.record_session("gone", {})
    store.flush()
    store.close()
    assert await a.claim("gone")
    sql(pg_url, "UPDATE leases SET expires = now() - interval '1 second'")
    assert await a.sweep() == 1
    assert sql(pg_url, "SELECT ended IS NOT NULL, summary->>'reason' FROM sessions") == [
        (True, "not resumed after its server was lost")
    ]
    assert sql(pg_url, "SELECT count(*) FROM leases") == [(0,)]
