"""Cut live connections at random (RST, mid-message too): every session resumes, nothing lost.

A TCP proxy between each client and the server resets the session's live connection (both sides
at once, RST, no close frame) at a random moment after it opened: during the upgrade, between
messages, or part-way through forwarding one. The client (clients/stream_client.py) resumes on
its own and sends again what the server had not acknowledged. Several sessions stream in
parallel, faster than real time, with `when_behind: "wait"` (nothing skipped), until the cuts
are made. Then each session must add up: the server received exactly the samples sent, every
chunk was analysed once (seq 0..n-1, tiling the stream), and no event arrived twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import struct
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import numpy as np

from benchmarks.chaos.outcome import Outcome, Plan
from benchmarks.chaos.target import Target
from benchmarks.load import speech_like
from clients.stream_client import StreamClient, StreamResult
from stream.core.audio.pcm import Encoding

NEEDS_PROCESS = False
RATE = 16_000
FRAME = RATE // 10  # 100 ms: at SPEED x real time that is well under the message-rate limit
SPEED = 8.0  # times real time, so that a few minutes reach 1,000 cuts
AHEAD_S = 4.0  # the producer waits while this much audio is unacknowledged (analysis speed)
SESSIONS = 4
CUT_AFTER_S = (0.0, 0.4)  # a cut comes this long after its connection opened (random)
CONFIG = {"chunk_seconds": 1.0, "when_behind": "wait"}
LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


class Link:
    """One proxied connection: the client's side and the server's side."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.writers = (client, server)
        self.closed = False
        self.cut_mid = False  # the next read in either direction forwards part, then resets
        self.cut_in_message = False  # and it did
        self.cut_done = asyncio.Event()

    def reset(self) -> None:
        self.closed = True
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):  # (no socket: already gone)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            writer.transport.abort()
        self.cut_done.set()


class CuttingProxy:
    """127.0.0.1 TCP proxy to `host:port` that cuts its live connection when asked."""

    def __init__(self, host: str, port: int, rng: random.Random) -> None:
        self.host, self.upstream = host, port
        self.rng = rng
        self.port = 0
        self.connections = 0
        self.cuts = {"between": 0, "mid_message": 0}
        self.live: Link | None = None
        self.connected = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    @property
    def made(self) -> int:
        return sum(self.cuts.values())

    async def cut(self, mid_message: bool) -> bool:
        """Reset the live connection (now, or in the middle of the next read); False when none
        was live, so nothing was cut."""
        link = self.live
        if link is None or link.closed:
            return False
        if mid_message:
            link.cut_mid = True
            with contextlib.suppress(TimeoutError):  # nothing flowed: cut it between messages
                await asyncio.wait_for(link.cut_done.wait(), 1.0)
            if link.cut_in_message:
                self.cuts["mid_message"] += 1
                return True
        if link.closed:
            return False  # it closed on its own meanwhile (the session ended)
        link.reset()
        self.cuts["between"] += 1
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream)
        except OSError:
            writer.transport.abort()
            return
        link = Link(writer, up_writer)
        self.live, self.connections = link, self.connections + 1
        self.connected.set()
        await asyncio.gather(
            self._pump(reader, up_writer, link), self._pump(up_reader, writer, link),
            return_exceptions=True,
        )  # fmt: skip
        for w in link.writers:
            w.transport.abort()
        link.closed = True
        if self.live is link:
            self.live = None
            self.connected.clear()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    link: Link) -> None:  # fmt: skip
        while data := await reader.read(65536):
            if link.cut_mid and not link.closed:
                link.cut_in_message = True
                writer.write(data[: self.rng.randrange(len(data))])  # part of whatever this is
                with contextlib.suppress(OSError):
                    await writer.drain()
                link.reset()
                return
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # pass a half-close on, as TCP would


class TallyingClient(StreamClient):
    """A StreamClient that also counts events arriving a second time (it drops them silently:
    after a resume the server must send only what came after `last_event`)."""

    twice = 0  # (per client: `+=` makes it the instance's own)

    async def _receive(self, ws: Any, result: StreamResult) -> None:
        await super()._receive(self._tally(ws), result)

    async def _tally(self, ws: Any) -> AsyncIterator[str | bytes]:
        async for message in ws:  # before the client's own check drops a number seen before
            if isinstance(message, str):
                n = json.loads(message).get("n", 0)
                if n and n <= self.last_event:
                    self.twice += 1
            yield message


async def cutter(proxy: CuttingProxy, client: StreamClient, rng: random.Random) -> None:
    """Cut each connection at a random moment after it opened, half of them mid-message; once
    the session has begun (a cut before the first `ready` leaves nothing to resume)."""
    while True:
        await proxy.connected.wait()
        await asyncio.sleep(rng.uniform(*CUT_AFTER_S))
        if client.session is not None:
            await proxy.cut(mid_message=rng.random() < 0.5)
        else:
            await asyncio.sleep(0.01)


class Feed:
    """Speech-like audio at SPEED x real time, never more than AHEAD_S unacknowledged, until the
    proxy has made `cuts` cuts; `sent` counts the samples given to the client."""

    def __init__(self, client: StreamClient, proxy: CuttingProxy, cuts: int, seed: int) -> None:
        self.client, self.proxy, self.cuts = client, proxy, cuts
        self.clip = speech_like(20.0, seed)
        self.sent = 0

    async def blocks(self) -> AsyncIterator[np.ndarray]:
        began = time.monotonic()
        while self.proxy.made < self.cuts:
            while (self.sent - self.client.acked) / RATE > AHEAD_S:
                await asyncio.sleep(0.02)
            await asyncio.sleep(max(0.0, began + self.sent / RATE / SPEED - time.monotonic()))
            start = self.sent % len(self.clip)
            block = self.clip[start : start + FRAME, None]
            self.sent += len(block)
            yield block


async def one_session(url: str, cuts: int, seed: int, plan: Plan) -> dict[str, Any]:
    """A session streamed through its own cutting proxy; what it adds up to."""
    parts = urlsplit(url)
    proxy = await CuttingProxy(parts.hostname or "127.0.0.1", parts.port or 80,
                               random.Random(seed)).start()  # fmt: skip
    proxied = urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}"))
    client = TallyingClient(proxied, RATE, 1, Encoding.PCM_S16LE, dict(CONFIG), resume_seconds=30)
    feed = Feed(client, proxy, cuts, seed)
    cutting = asyncio.create_task(cutter(proxy, client, random.Random(seed + 1)))
    try:
        result = await client.run(feed.blocks(), realtime=False)
        tally = from_events(result, feed.sent)
    except Exception as exc:  # noqa: BLE001 - a session that gives up is a finding, not a crash
        tally = {"completed": False, "failure": f"{type(exc).__name__}: {exc}",
                 **await from_record(parts, client.session, feed.sent)}  # fmt: skip
        if tally["lost"] == 0 and tally["chunks_once"]:
            tally["note"] = ("the server received and analysed everything and ended the session, "
                             "but its `end` never reached the client, and the resume that would "
                             "have fetched it was refused")  # fmt: skip
    finally:
        cutting.cancel()
        proxy.close()
    tally.update(twice=tally.get("twice", 0) + client.twice, cuts=dict(proxy.cuts),
                 connections=proxy.connections)  # fmt: skip
    done = "complete" if tally["completed"] else f"INCOMPLETE ({tally['failure']})"
    plan.progress(f"resume: session {seed}: {proxy.made} cuts, {done}")
    return tally


def from_events(result: StreamResult, sent: int) -> dict[str, Any]:
    """What the session's own events say: its `end` and its analysis events."""
    numbers = [e["n"] for e in result.events if "n" in e]
    return {
        # (not the close code: a cut may land between `end` and the closing handshake)
        "completed": result.end is not None and not result.errors,
        "close_code": result.close_code,
        "errors": [e.get("code") for e in result.errors],
        "resumes": result.resumes,
        "twice": len(numbers) - len(set(numbers)),
        **audit(sent, (result.end or {}).get("samples_received"), result.analysis),
    }


async def from_record(parts: SplitResult, session: str | None, sent: int) -> dict[str, Any]:
    """For a session whose client gave up: what the server kept of it (GET /v1/sessions), so
    that a lost `end` is told apart from lost audio."""
    http = urlunsplit(("http", parts.netloc, f"/v1/sessions/{session}", "", ""))
    for _ in range(50):  # the store commits in batches: the session's end may be a moment late
        kept = await asyncio.to_thread(_get_json, http)
        if kept and kept.get("ended"):
            break
        await asyncio.sleep(0.1)
    timeline = await asyncio.to_thread(_get_json, http + "/timeline") or []
    received = ((kept or {}).get("summary") or {}).get("samples_received")
    return {"seen_by": "the server's record", **audit(sent, received, timeline)}


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own server
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def audit(sent: int, received: int | None, analysis: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples lost and duplicated, and whether every chunk was analysed once: seq 0..n-1, each
    chunk starting where the last ended, from 0 to the end of the audio."""
    seqs = [e["seq"] for e in analysis]
    tiles = bool(analysis) and analysis[0]["start"] == 0.0 and all(
        b["start"] == a["end"] for a, b in zip(analysis, analysis[1:], strict=False)
    )  # fmt: skip
    covers = bool(analysis) and abs(analysis[-1]["end"] - sent / RATE) < 0.05
    return {
        "samples_sent": sent,
        "samples_received": received,
        "lost": None if received is None else max(0, sent - received),
        "duplicated": None if received is None else max(0, received - sent),
        "chunks": len(analysis),
        "chunks_once": seqs == list(range(len(seqs))) and tiles and covers,
        "skipped": sum(e.get("skipped", 0) for e in analysis),
    }


async def run(plan: Plan) -> Outcome:
    outcome = Outcome("resume")
    total = plan.size(1000, 20)
    per_session = -(-total // SESSIONS)
    target = None
    if plan.url is None:
        target = Target()
        await asyncio.to_thread(target.start)
    url = plan.url or target.ws  # type: ignore[union-attr]
    began = time.monotonic()
    quiet = logging.getLogger("clients.stream_client")  # a warning per resume: a thousand lines
    level, quiet.level = quiet.level, logging.ERROR
    try:
        tallies = await asyncio.gather(*(
            one_session(url, per_session, plan.seed * 100 + i, plan) for i in range(SESSIONS)
        ))  # fmt: skip
    finally:
        quiet.setLevel(level)
        if target is not None:
            await asyncio.to_thread(target.stop)
    report(outcome, tallies, time.monotonic() - began, total)
    return outcome


def report(outcome: Outcome, tallies: list[dict[str, Any]], seconds: float, goal: int) -> None:
    cuts = sum(sum(t["cuts"].values()) for t in tallies)
    mid = sum(t["cuts"]["mid_message"] for t in tallies)
    lost = sum(t["lost"] for t in tallies if t["lost"] is not None)
    duplicated = sum(t["duplicated"] for t in tallies if t["duplicated"] is not None)
    once = sum(t["chunks_once"] for t in tallies)
    completed = sum(t["completed"] for t in tallies)
    twice = sum(t["twice"] for t in tallies)
    resumes = sum(t.get("resumes", 0) for t in tallies)
    seconds_sent = sum(t.get("samples_sent", 0) for t in tallies) / RATE
    outcome.figures.update(sessions=tallies, cuts=cuts, cuts_mid_message=mid,
                           audio_seconds=round(seconds_sent, 1),
                           wall_seconds=round(seconds, 1))  # fmt: skip
    outcome.summary = (
        f"{len(tallies)} sessions streamed {seconds_sent:.0f} s of audio at up to {SPEED:g}x "
        f"real time through proxies that cut {cuts} live connections ({mid} mid-message) "
        f"in {seconds:.0f} s; the clients resumed {resumes} times"
    )
    outcome.check("connections cut (RST, live, mid-message too)", cuts, f">= {goal}",
                  cuts >= goal)  # fmt: skip
    # A session whose client gave up is counted from the server's record; without one: unknown.
    known = all(t["lost"] is not None for t in tallies)
    outcome.exactly("samples lost", lost if known else f"{lost} (+ unknown)", 0)
    outcome.exactly("samples duplicated", duplicated if known else f"{duplicated} (+ unknown)", 0)
    outcome.exactly("events received twice", twice, 0)
    n = len(tallies)
    outcome.check("chunks analysed once (seq 0..n-1, tiling the stream)", f"{once}/{n} sessions",
                  "all sessions", once == n)  # fmt: skip
    outcome.check("sessions completed (their end, no error)", f"{completed}/{n}", "all",
                  completed == n)  # fmt: skip
