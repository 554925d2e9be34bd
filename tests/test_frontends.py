"""Several front-ends on one PostgreSQL store (real servers, a real database): a session moves
from one to another when a client resumes it there, whether its front-end is alive (it hands
the session over), gone (its lease expires) or shutting down (it lets go of everything)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import RunningServer, run_server
from tests.test_resume import RATE, events_until, frames, start_message, varied

CHUNK = {"chunk_seconds": 0.5, "left_context_seconds": 0.5}


@pytest.fixture
def frontends(pg_url: str) -> Iterator[list[RunningServer]]:
    """Three front-ends (a, b, c) sharing one fresh database."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                run_server(store=pg_url, frontend_id=name, lease_seconds=2.0, **CHUNK)
            )
            for name in "abc"
        ]


async def stream_some(url: str, seconds: float, analysed: int) -> tuple[Any, str, list[Any]]:
    """Open a session, send `seconds` of audio, read until `analysed` chunks were reported."""
    ws = await connect(url)
    await ws.send(start_message(config={"when_behind": "wait"}))
    ready = json.loads(await ws.recv())
    for frame in frames(varied(6.0)[: int(seconds * RATE)]):
        await ws.send(frame)
    events: list[Any] = []
    while len([e for e in events if e["type"] == "analysis"]) < analysed:
        events += await events_until(ws, "analysis")
    return ws, ready["session"], events


async def finish(ws: Any, ready: dict[str, Any], total: float = 6.0) -> list[dict[str, Any]]:
    """Send the rest of the audio from where `ready` says, stop, read until `end`."""
    for frame in frames(varied(total)[ready["samples_received"] :]):
        await ws.send(frame)
    await ws.send(json.dumps({"type": "stop"}))
    return await events_until(ws, "end")


async def kept_timeline(server: RunningServer, session: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.http) as http:
        response = await http.get(f"/v1/sessions/{session}/timeline")
        assert response.status_code == 200
        return response.json()


def assert_whole(entries: list[dict[str, Any]], chunks: int = 12) -> None:
    """Every chunk once, in order, tiling the audio."""
    assert [e["seq"] for e in entries] == list(range(chunks))
    assert all(b["start"] == a["end"] for a, b in zip(entries, entries[1:]))


async def test_a_resume_on_another_front_end_takes_the_session_over(
    frontends: list[RunningServer],
) -> None:
    a, b, _ = frontends
    old, session, before = await stream_some(a.ws, 2.2, analysed=4)
    last = before[-1]["n"]
    async with connect(b.ws) as ws:
        await ws.send(start_message(session=session, resume=True, last_event=last))
        ready = json.loads(await ws.recv())
        # a handed it over: its connection was told, its four chunks were committed first.
        farewell = await events_until(old, "error")
        assert farewell[-1]["code"] == "session_resumed" and old.close_code == 1008
        assert ready["resumed"] and ready["frontend"] == "b"
        assert ready["samples_received"] == int(1.5 * RATE)  # chunk 4's left context
        after = await finish(ws, ready)
    await old.close()
    analysis = [e for e in after if e["type"] == "analysis"]
    assert [e["seq"] for e in analysis] == list(range(4, 12))
    assert all(e["n"] > last for e in after if "n" in e)
    assert after[-1]["samples_received"] == 6 * RATE and after[-1]["chunks"] == 12
    for server in (a, b):  # one store: both front-ends read the same timeline
        assert_whole(await kept_timeline(server, session))


async def test_kept_events_after_the_clients_last_are_sent_again_elsewhere(
    frontends: list[RunningServer],
) -> None:
    a, b, _ = frontends
    old, session, before = await stream_some(a.ws, 2.2, analysed=4)
    numbered = [e for e in before if "n" in e and e["type"] != "ack"]
    missed = numbered[1]["n"] - 1  # as if the client had lost all but the first event
    async with connect(b.ws) as ws:
        await ws.send(start_message(session=session, resume=True, last_event=missed))
        ready = json.loads(await ws.recv())
        again = []
        while len([e for e in again if e["type"] == "analysis"]) < 3:
            again += await events_until(ws, "analysis")
        after = await finish(ws, ready)
    await old.close()
    replayed = [e for e in again if e["n"] <= before[-1]["n"]]
    assert [e["n"] for e in replayed] == [e["n"] for e in numbered[1:]]
    assert [e["seq"] for e in replayed if e["type"] == "analysis"] == [1, 2, 3]
    seqs = [e["seq"] for e in again + after if e["type"] == "analysis"]
    assert seqs == list(range(1, 12))  # nothing twice, nothing missing after the first


async def test_two_resumes_racing_on_two_front_ends_leave_one_owner(
    frontends: list[RunningServer], pg_url: str
) -> None:
    a, b, c = frontends
    old, session, before = await stream_some(a.ws, 2.2, analysed=4)
    await old.close(4000)  # (any close but 1000/1001 leaves the session resumable)
    last = before[-1]["n"]

    async def resume(server: RunningServer) -> tuple[Any, dict[str, Any]]:
        ws = await connect(server.ws)
        await ws.send(start_message(session=session, resume=True, last_event=last))
        return ws, json.loads(await ws.recv())

    (ws_b, ready_b), (ws_c, ready_c) = await asyncio.gather(resume(b), resume(c))
    answers = {"b": (ws_b, ready_b), "c": (ws_c, ready_c)}
    # Each got the session or a clear refusal; whoever got it first may have handed it over
    # to the other at once: the one still holding it is the one not told otherwise.
    outcomes = {name: ready.get("code", "ready") for name, (_, ready) in answers.items()}

    async def told(ws: Any) -> str | None:
        """The error code this connection gets within a while, if any."""
        try:
            async with asyncio.timeout(1.5):
                async for message in ws:
                    if isinstance(message, str) and json.loads(message)["type"] == "error":
                        return json.loads(message)["code"]
        except TimeoutError:
            pass
        return None

    for name, (ws, _) in answers.items():
        if outcomes[name] == "ready":
            outcomes[name] = await told(ws) or "ready"
    winners = [name for name, outcome in outcomes.items() if outcome == "ready"]
    assert set(outcomes.values()) - {"ready"} <= {"session_resumed", "session_in_use"}
    assert len(winners) == 1, outcomes
    ws, ready = answers[winners[0]]
    rest = await finish(ws, ready)
    assert rest[-1]["type"] == "end" and rest[-1]["samples_received"] == 6 * RATE
    for other in (ws_b, ws_c):
        await other.close()
    assert_whole(await kept_timeline(a, session))


async def test_a_front_end_that_shuts_down_lets_its_sessions_go_on_elsewhere(
    pg_url: str,
) -> None:
    with run_server(store=pg_url, frontend_id="b", **CHUNK) as b:
        with run_server(store=pg_url, frontend_id="a", **CHUNK) as a:
            old, session, before = await stream_some(a.ws, 2.2, analysed=4)
            a.server.should_exit = True  # SIGTERM's way in
            with pytest.raises(ConnectionClosed):
                while True:
                    await old.recv()
            # Closed with 1012 (no error event): the client resumes, as after any break.
            assert old.close_code == 1012
        async with connect(b.ws) as ws:
            await ws.send(start_message(session=session, resume=True, last_event=before[-1]["n"]))
            ready = json.loads(await ws.recv())
            assert ready["resumed"] and ready["samples_received"] == int(1.5 * RATE)
            after = await finish(ws, ready)
        assert after[-1]["chunks"] == 12
        assert_whole(await kept_timeline(b, session))


async def test_a_draining_front_end_says_who_it_is_and_that_it_is_not_ready(pg_url: str) -> None:
    with run_server(store=pg_url, frontend_id="edge-1", drain_seconds=1.5, **CHUNK) as server:
        async with httpx.AsyncClient(base_url=server.http) as http:
            health = (await http.get("/healthz")).json()
            assert health["frontend"] == "edge-1" and "postgresql" not in health["store"]
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["frontend"] == "edge-1"
            metrics = await http.get("/metrics")
            assert 'grym_frontend{frontend="edge-1"} 1.0' in metrics.text
            server.server.should_exit = True  # SIGTERM's way in: drain first
            await asyncio.sleep(0.5)
            draining = await http.get("/readyz")  # still answering, but not for new sessions
            assert draining.status_code == 503 and draining.json()["serving"] is False


async def test_postgresql_restarted_under_load_loses_nothing_acknowledged() -> None:
    from clients.stream_client import StreamClient
    from grym.cluster.postgres import Postgres
    from tests.test_resume import paced

    with Postgres() as pg, run_server(store=pg.url, frontend_id="a", **CHUNK) as a:
        audio = varied(8.0)
        client = StreamClient(a.ws, RATE, 2, config={"when_behind": "wait"}, resume_seconds=60)
        running = asyncio.create_task(client.run(paced(audio, 2205, 1.0), realtime=False))
        while client.acked < RATE:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(pg.stop)  # the writer's and the leases' connections are cut
        async with httpx.AsyncClient(base_url=a.http) as http:
            for _ in range(100):  # the next write or lease renewal finds it gone
                ready = await http.get("/readyz")
                if ready.status_code == 503:
                    break
                await asyncio.sleep(0.05)
            assert ready.status_code == 503 and ready.json()["store"] is False
            async with connect(a.ws) as ws:  # a new session must wait: a typed refusal
                await ws.send(start_message())
                refusal = json.loads(await ws.recv())
                assert refusal["code"] == "store_unavailable" and refusal["fatal"]
            assert ws.close_code == 1013
            acked = client.acked
            await asyncio.sleep(1.5)  # the live session goes on; its acks wait for the store
            assert client.acked == acked
            await asyncio.to_thread(pg.start)
            result = await asyncio.wait_for(running, 60)
            assert (await http.get("/readyz")).status_code == 200
        assert_whole(await kept_timeline(a, client.session), chunks=16)  # in the database
    assert result.end is not None and result.end["samples_received"] == len(audio)
    assert result.resumes == 0 and not result.errors
    assert [e["seq"] for e in result.analysis] == list(range(16))
    assert max(result.acks) == len(audio)  # all of it acknowledged in the end


async def test_the_rolling_context_moves_with_the_session(frontends: list[RunningServer]) -> None:
    """The detectors on the new front-end see the audio heard on the old one: the context went
    to the store with the session (a window that starts where the session began, not where
    it went on)."""
    a, b, _ = frontends
    ws = await connect(a.ws)
    await ws.send(start_message(config={"when_behind": "wait", "pipeline": "analyse-only"}))
    session = json.loads(await ws.recv())["session"]
    for frame in frames(varied(6.0)[: int(3.2 * RATE)]):
        await ws.send(frame)
    events: list[Any] = []
    while len([e for e in events if e["type"] == "patterns"]) < 6:
        events += await events_until(ws, "patterns")
    assert events[-1]["window"] == {"start": 0.0, "end": 3.0}
    async with connect(b.ws) as moved:
        await moved.send(start_message(session=session, resume=True, last_event=events[-1]["n"]))
        ready = json.loads(await moved.recv())
        assert ready["samples_received"] == int(2.5 * RATE)
        after = await finish(moved, ready)
    await ws.close()
    windows = [e["window"] for e in after if e["type"] == "patterns"]
    assert windows[0] == {"start": 0.0, "end": 3.5} and windows[-1]["start"] == 0.0
