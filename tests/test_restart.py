"""Sessions that outlive the server: `kill -9` under write load loses nothing acknowledged, and a
session goes on after a crash or a graceful restart, resumed from storage."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from clients.stream_client import StreamClient
from grym.cluster import free_port
from tests.conftest import run_server, serve_process
from tests.test_resume import RATE, events_until, frames, paced, reset, start_message, varied


async def stream_until_killed(url: str, acks: list[int]) -> str:
    """Stream as fast as the server takes it, with embeddings (large entries); keep acks.
    Returns the session's id (each task its own: acks and session stay paired)."""
    audio = frames(varied(60.0), 0.25)
    async with connect(url) as ws:
        await ws.send(start_message(config={"when_behind": "wait", "embeddings": True}))
        session: str = json.loads(await ws.recv())["session"]

        async def read() -> None:
            async for message in ws:
                event = json.loads(message)
                if event["type"] == "ack":
                    acks.append(event["samples"])

        reader = asyncio.create_task(read())
        try:
            for frame in audio:
                await ws.send(frame)
        except ConnectionClosed:
            pass
        await asyncio.gather(reader, return_exceptions=True)
    return session


async def test_kill_9_under_write_load_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    proc, port = serve_process(
        tmp_path, "--analysis-model", "tiny-random", "--generator", "none",
        "--chunk-seconds", "0.5",
        "--store-batch-seconds", "0.6",  # slow commits: acks wait for them, a kill lands between
    )  # fmt: skip
    url = f"ws://127.0.0.1:{port}/v1/stream"
    acks: list[list[int]] = [[] for _ in range(4)]
    streams = [asyncio.create_task(stream_until_killed(url, a)) for a in acks]
    try:
        while min(len([n for n in a if n > RATE]) for a in acks) < 3:  # all acknowledged some
            await asyncio.sleep(0.05)
        await asyncio.sleep(random.Random(3).uniform(0.0, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        sessions = await asyncio.wait_for(asyncio.gather(*streams), 30)
    finally:
        proc.kill()
        proc.wait(10)
    db = sqlite3.connect(tmp_path / "grym.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        for session, session_acks in zip(sessions, acks):
            rows = db.execute(
                "SELECT seq, end FROM timeline WHERE session = ? ORDER BY seq", (session,)
            ).fetchall()
            acknowledged = max(session_acks) / RATE  # seconds
            # Every 0.5 s chunk ending within the last ack was committed before the ack left.
            expected = int(acknowledged / 0.5 + 1e-9)
            assert [seq for seq, _ in rows[:expected]] == list(range(expected)), session
            assert rows[expected - 1][1] <= acknowledged + 1e-9
    finally:
        db.close()


async def test_a_session_goes_on_after_the_server_is_killed_and_restarted(
    tmp_path: Path,
) -> None:
    port = free_port()
    args = ("--analysis-model", "tiny-random", "--generator", "none", "--chunk-seconds", "0.5",
            "--store-batch-seconds", "0.3")  # fmt: skip
    proc, _ = serve_process(tmp_path, *args, port=port)
    audio = varied(8.0)
    url = f"ws://127.0.0.1:{port}/v1/stream"
    client = StreamClient(url, RATE, 2, config={"when_behind": "wait"}, resume_seconds=60)
    running = asyncio.create_task(client.run(paced(audio, 2205, speed=2.0), realtime=False))
    try:
        while client.acked < 2 * RATE:  # some of it safe, the rest in flight
            await asyncio.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream, unacknowledged audio in flight
        proc.wait(10)
        proc, _ = serve_process(tmp_path, *args, port=port)  # the same place, the same data
        result = await asyncio.wait_for(running, 120)
    finally:
        proc.terminate()
        proc.wait(30)
    assert result.resumes == 1 and result.end is not None and result.close_code == 1000
    assert result.end["samples_received"] == len(audio) == result.samples_sent
    # What the client saw: every chunk, in order, tiling the audio. Chunks analysed before the
    # kill but not yet kept were analysed again after it: their later events replace them.
    analysis = {e["seq"]: e for e in result.analysis}
    chunks = [analysis[seq] for seq in sorted(analysis)]
    assert [e["seq"] for e in chunks] == list(range(len(chunks))) == list(range(16))
    assert all(b["start"] == a["end"] for a, b in zip(chunks, chunks[1:]))
    assert result.end["chunks"] == 16
    # What the server kept: the same timeline, once, in one database that survived the kill.
    db = sqlite3.connect(tmp_path / "grym.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        kept = db.execute(
            "SELECT seq, start, end FROM timeline WHERE session = ? ORDER BY seq", (client.session,)
        ).fetchall()
        ended = db.execute("SELECT ended FROM sessions WHERE id = ?", (client.session,)).fetchone()
    finally:
        db.close()
    assert [row[0] for row in kept] == list(range(16)) and ended[0] is not None
    assert all(b[1] == a[2] for a, b in zip(kept, kept[1:])) and kept[-1][2] == 8.0


async def test_a_detached_session_outlives_a_graceful_restart(tmp_path: Path) -> None:
    settings = {"data_dir": str(tmp_path), "chunk_seconds": 0.5, "left_context_seconds": 0.5}
    with run_server(**settings) as first:
        async with connect(first.ws) as ws:
            await ws.send(start_message(config={"when_behind": "wait"}))
            session = json.loads(await ws.recv())["session"]
            for frame in frames(varied(3.0)[: int(2.2 * RATE)]):  # chunk 4 ends at 2.0 s
                await ws.send(frame)
            events = await events_until(ws, "analysis")
            while len([e for e in events if e["type"] == "analysis"]) < 4:
                events += await events_until(ws, "analysis")
            reset(ws)
        await asyncio.sleep(0.3)  # detached when the server shuts down: not ended
    with run_server(**settings) as second:
        async with connect(second.ws) as ws:
            await ws.send(start_message(session=session, resume=True, last_event=events[-1]["n"]))
            ready = json.loads(await ws.recv())
            # It goes on after its last kept chunk (1.5-2.0 s, the fourth), from that chunk's
            # left context: the client sends again from 1.5 s.
            assert ready["resumed"] and ready["samples_received"] == int(1.5 * RATE)
            for frame in frames(varied(3.0)[int(1.5 * RATE) :]):
                await ws.send(frame)
            await ws.send(json.dumps({"type": "stop"}))
            after = await events_until(ws, "end")
    analysis = [e for e in after if e["type"] == "analysis"]
    assert [e["seq"] for e in analysis] == [4, 5] and analysis[0]["start"] == 2.0
    assert all(e["n"] > events[-1]["n"] for e in after if "n" in e)  # numbered on
    assert after[-1]["samples_received"] == 3 * RATE and after[-1]["chunks"] == 6
