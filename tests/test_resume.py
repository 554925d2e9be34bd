"""Acks and resumable sessions, over real connections that really break.

A TCP proxy between client and server stands in for a bad network: it can reset both sides of
a connection at once, between messages or in the middle of one (it forwards part of a read and
then resets), and the client (clients/stream_client.py) has to resume the session on its own.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from clients.stream_client import StreamClient
from stream.core.audio.pcm import Encoding, encode
from tests.conftest import RunningServer, run_server, tone

RATE = 22_050


class CuttingProxy:
    """127.0.0.1 TCP proxy to `upstream_port` that breaks its live connection on demand."""

    def __init__(self, upstream_port: int, rng: random.Random) -> None:
        self.upstream_port = upstream_port
        self.rng = rng
        self.port = 0
        self.connections = 0
        self._live: list[asyncio.StreamWriter] = []
        self._cut_mid = False
        self._connected = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._reset()

    async def cut(self, mid_message: bool) -> None:
        """Break the next live connection: now, or part-way through the next read."""
        await self._connected.wait()
        self._connected.clear()
        if mid_message:
            self._cut_mid = True
        else:
            self._reset()

    def _reset(self) -> None:
        for writer in self._live:
            writer.transport.abort()  # RST: no close frame, no FIN
        self._live.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._live = [writer, up_writer]
        self.connections += 1
        self._connected.set()
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if self._cut_mid and writer in self._live:
                self._cut_mid = False
                writer.write(data[: self.rng.randrange(len(data))])  # part of whatever this is
                await writer.drain()
                self._reset()
                return
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # pass the half-close on, as TCP would


async def paced(audio: np.ndarray, block: int, speed: float) -> AsyncIterator[np.ndarray]:
    """`audio` in blocks at `speed` times real time."""
    for i in range(0, len(audio), block):
        await asyncio.sleep(block / RATE / speed)
        yield audio[i : i + block]


def varied(seconds: float) -> np.ndarray:
    """Tones that change every half second, in stereo: each chunk's analysis differs."""
    parts = [tone(0.5, RATE, freq=220.0 * (1 + i % 5), channels=2) for i in range(int(seconds * 2))]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def gen_server() -> Iterator[RunningServer]:
    with run_server(generator="tiny", resume_grace_seconds=30.0) as running:
        yield running


async def test_connections_cut_at_random_points_lose_nothing(gen_server: RunningServer) -> None:
    rng = random.Random(7)
    audio = varied(8.0)
    config = {
        "when_behind": "wait",  # nothing skipped: the timeline must tile the whole stream
        "generation": {"triggers": ["interval"], "interval_seconds": 2.0, "seconds": 0.5,
                       "steps": 2},
    }  # fmt: skip
    cuts = 6
    async with CuttingProxy(gen_server.port, rng) as proxy:
        url = f"ws://127.0.0.1:{proxy.port}/v1/stream"
        client = StreamClient(url, RATE, 2, Encoding.PCM_S16LE, config, resume_seconds=20)
        running = asyncio.create_task(client.run(paced(audio, 441, speed=3.0), realtime=False))
        for i in range(cuts):
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            await proxy.cut(mid_message=i % 2 == 1)
        result = await asyncio.wait_for(running, 120)

    assert result.resumes == cuts and proxy.connections == cuts + 1
    assert result.end is not None and result.close_code == 1000
    assert result.samples_sent == len(audio) == result.end["samples_received"]
    assert result.acks[-1] == len(audio) and result.acks == sorted(result.acks)
    # Every event arrived once, in order, whatever was in flight at each break.
    numbers = [e["n"] for e in result.events if "n" in e]
    assert numbers == sorted(set(numbers))
    # The timeline tiles the audio: every chunk once, each starting where the last ended.
    analysis = result.analysis
    assert [e["seq"] for e in analysis] == list(range(len(analysis)))
    assert analysis[0]["start"] == 0.0 and all(e["skipped"] == 0 for e in analysis)
    assert all(b["start"] == a["end"] for a, b in zip(analysis, analysis[1:]))
    assert abs(analysis[-1]["end"] - len(audio) / RATE) < 0.05
    # Every generation is accounted for: one outcome each, and a done one's audio complete.
    numbers = sorted({e["id"] for e in result.events if e["type"].startswith("generation.")})
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 3
    for number in numbers:
        outcomes = [
            e["type"] for e in result.generation(number)
            if e["type"] in ("generation.done", "generation.cancelled", "generation.failed")
        ]  # fmt: skip
        assert len(outcomes) == 1, (number, outcomes)
        if outcomes == ["generation.done"]:
            frames = [h for h, _ in result.audio[number]]
            assert [h.index for h in frames] == list(range(len(frames))) and frames[-1].last
            assert len(result.clip(number)) == result.generation(number)[-1]["samples"]
    # And the server kept the same: the persisted timeline and every generation's outcome.
    session = result.ready["session"]
    async with httpx.AsyncClient(base_url=gen_server.http) as http:
        kept = (await http.get(f"/v1/sessions/{session}")).json()
        timeline = (await http.get(f"/v1/sessions/{session}/timeline")).json()
    assert [e["seq"] for e in timeline] == [e["seq"] for e in analysis]
    assert [g["id"] for g in kept["generations"]] == numbers


def frames(audio: np.ndarray, seconds: float = 0.5) -> list[bytes]:
    step = round(seconds * RATE)
    return [encode(audio[i : i + step], Encoding.PCM_S16LE) for i in range(0, len(audio), step)]


def start_message(**fields: Any) -> str:
    message = {"type": "start", "sample_rate": RATE, "channels": 2, "encoding": "pcm_s16le"}
    return json.dumps({**message, **fields})


async def events_until(ws: Any, kind: str) -> list[dict[str, Any]]:
    events = []
    async for message in ws:
        if isinstance(message, str):
            events.append(json.loads(message))
            if events[-1]["type"] == kind:
                return events
    return events


@pytest.fixture(scope="module")
def quick_server() -> Iterator[RunningServer]:
    with run_server(resume_grace_seconds=1.0) as running:
        yield running


def reset(ws: Any) -> None:
    """Break the client's side of a connection: RST, no close frame."""
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    ws.transport.abort()


async def test_acks_follow_the_analysis_and_end_with_everything(
    quick_server: RunningServer,
) -> None:
    audio = varied(3.0)
    async with connect(quick_server.ws) as ws:
        await ws.send(start_message())
        sent = 0
        for frame in frames(audio, 0.1):  # at real-time pace
            await ws.send(frame)
            sent += 2205
            await asyncio.sleep(0.1)
        await ws.send(json.dumps({"type": "stop"}))
        events = await events_until(ws, "end")
    acks = [e for e in events if e["type"] == "ack"]
    analysis = [e for e in events if e["type"] == "analysis"]
    assert len(acks) >= 3 and acks[-1]["samples"] == sent == events[-1]["samples_received"]
    assert events[-2] is acks[-1]  # the last ack comes just before `end`
    assert [a["samples"] for a in acks] == sorted(a["samples"] for a in acks)
    # An ack never runs ahead of the analysis: each covers only chunks whose events came first.
    for ack in acks[:-1]:
        seen = [e["end"] for e in analysis if e["n"] < ack["n"]]
        assert ack["samples"] <= round(max(seen, default=0.0) * RATE)


async def test_resume_after_a_reset_goes_on_with_the_same_session(
    quick_server: RunningServer,
) -> None:
    first, second = varied(2.0), varied(1.5)
    async with connect(quick_server.ws) as ws:
        await ws.send(start_message(config={"when_behind": "wait"}))
        ready = json.loads(await ws.recv())
        for frame in frames(first):
            await ws.send(frame)
        events = await events_until(ws, "analysis")  # the first chunk's
        reset(ws)
    session = ready["session"]
    async with connect(quick_server.ws) as ws:
        last = events[-1]["n"]
        await ws.send(start_message(session=session, resume=True, last_event=last))
        again = json.loads(await ws.recv())
        assert again["type"] == "ready" and again["resumed"] and again["session"] == session
        assert again["samples_received"] == len(first)  # all of it arrived before the reset
        for frame in frames(second):
            await ws.send(frame)
        await ws.send(json.dumps({"type": "stop"}))
        events += await events_until(ws, "end")
    analysis = [e for e in events if e["type"] == "analysis"]
    assert [e["seq"] for e in analysis] == list(range(len(analysis))) and len(analysis) == 4
    assert events[-1]["samples_received"] == len(first) + len(second)
    numbers = [e["n"] for e in events]
    assert numbers == sorted(set(numbers))


async def test_a_resume_takes_over_a_connection_still_open(quick_server: RunningServer) -> None:
    async with connect(quick_server.ws) as old:
        await old.send(start_message())
        session = json.loads(await old.recv())["session"]
        async with connect(quick_server.ws) as new:
            await new.send(start_message(session=session, resume=True))
            assert json.loads(await new.recv())["resumed"]
            told = await events_until(old, "error")
            assert told[-1]["code"] == "session_resumed" and told[-1]["fatal"]
            await new.send(json.dumps({"type": "stop"}))
            assert (await events_until(new, "end"))[-1]["type"] == "end"
        assert old.close_code == 1008


async def test_resume_refusals_say_why(quick_server: RunningServer) -> None:
    async with connect(quick_server.ws) as ws:
        await ws.send(start_message(session="nobody-here", resume=True))
        error = json.loads(await ws.recv())
        await ws.wait_closed()
    assert error["code"] == "session_not_found" and ws.close_code == 1008
    async with connect(quick_server.ws) as ws:
        await ws.send(start_message())
        session = json.loads(await ws.recv())["session"]
        reset(ws)
    async with connect(quick_server.ws) as ws:
        mismatch = start_message(session=session, resume=True, sample_rate=48_000)
        await ws.send(mismatch)
        assert json.loads(await ws.recv())["code"] == "resume_mismatch"
    async with connect(quick_server.ws) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": RATE, "channels": 2,
                                  "encoding": "pcm_s16le", "resume": True}))  # fmt: skip
        assert json.loads(await ws.recv())["code"] == "invalid_start"


async def test_a_session_not_resumed_in_time_is_finalised(quick_server: RunningServer) -> None:
    async with connect(quick_server.ws) as ws:
        await ws.send(start_message())
        session = json.loads(await ws.recv())["session"]
        for frame in frames(varied(1.5)):
            await ws.send(frame)
        await events_until(ws, "analysis")
        reset(ws)
    manager = quick_server.app.state.sessions
    await asyncio.sleep(0.3)
    assert session in manager.sessions  # detached, waiting for a resume
    for _ in range(50):
        if session not in manager.sessions:
            break
        await asyncio.sleep(0.1)
    assert session not in manager.sessions
    # The store's writer thread commits in batches: the session's end may be a batch behind.
    assert await asyncio.to_thread(manager.store.flush)
    async with httpx.AsyncClient(base_url=quick_server.http) as http:
        kept = (await http.get(f"/v1/sessions/{session}")).json()
    assert kept["ended"] is not None and kept["summary"]["samples_received"] == int(1.5 * RATE)
    assert kept["chunks"] == 2  # the audio received before the break was analysed to the end
    async with connect(quick_server.ws) as ws:
        await ws.send(start_message(session=session, resume=True))
        assert json.loads(await ws.recv())["code"] == "session_not_found"


async def test_a_client_that_closes_on_purpose_ends_its_session_at_once(
    quick_server: RunningServer,
) -> None:
    async with connect(quick_server.ws) as ws:
        await ws.send(start_message())
        session = json.loads(await ws.recv())["session"]
    manager = quick_server.app.state.sessions
    for _ in range(20):
        if session not in manager.sessions:
            break
        await asyncio.sleep(0.05)
    assert session not in manager.sessions
