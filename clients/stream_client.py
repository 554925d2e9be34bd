"""A client of the public WebSocket protocol, for the CLI, the tests and the load generator.

It knows the protocol (stream.protocol) and nothing of the server's internals. Audio goes out
paced from a start time in samples (or as fast as the server takes it); events come back on a
concurrent task and are handed to a callback, each with its end-to-end latency measured here:
from sending the frame that held the chunk's last sample to receiving the chunk's event.
Generated audio arrives as binary frames (protocol.unpack_audio) and is kept per generation;
`send_control` sends `generate` / `cancel` messages while the audio streams. A broken
connection is resumed (see StreamClient).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from stream.core.audio.pcm import Encoding, PcmFormat, decode, encode
from stream.protocol import AudioHeader, unpack_audio

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    def __init__(self, event: dict[str, Any]) -> None:
        super().__init__(f"{event.get('code')}: {event.get('message')}")
        self.event = event


@dataclass
class StreamResult:
    ready: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    close_code: int | None = None
    samples_sent: int = 0
    resumes: int = 0  # times the session was resumed after a broken connection
    acks: list[int] = field(default_factory=list)  # the server's acks, in order
    # Generated audio frames per generation id, in arrival order: (header, float32 mono).
    audio: dict[int, list[tuple[AudioHeader, np.ndarray]]] = field(default_factory=dict)
    # When each generation's first audio frame arrived (monotonic), for time to first audio.
    first_audio_at: dict[int, float] = field(default_factory=dict)

    def generation(self, number: int) -> list[dict[str, Any]]:
        """The `generation.*` events of generation `number`, in order."""
        return [e for e in self.events if e["type"].startswith("generation.") and e["id"] == number]

    def clip(self, number: int) -> np.ndarray:
        """Generation `number`'s audio, its frames joined."""
        frames = self.audio.get(number, [])
        return np.concatenate([a for _, a in frames]) if frames else np.zeros(0, np.float32)

    @property
    def analysis(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "analysis"]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "error"]

    @property
    def finals(self) -> list[dict[str, Any]]:
        """Final transcripts of the session's utterances, in order (the end event's included)."""
        events = self.analysis + ([self.end] if self.end else [])
        found = [(e.get("transcript") or {}).get("final") for e in events]
        return [final for final in found if final]

    @property
    def transcript(self) -> str:
        """Every utterance's final text, joined by spaces."""
        return " ".join(t for final in self.finals if (t := final["text"].strip()))


class SendLog:
    """When each frame was first sent, by the sample count it brought the stream to: what a
    client needs to measure an event's end-to-end latency from the event's `end`."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._samples: list[int] = []  # after each frame first sent: samples so far
        self._at: list[float] = []  # and when (monotonic)

    def sent(self, samples: int) -> None:
        """The stream now reaches `samples` (a frame sent again after a resume is not new)."""
        if not self._samples or samples > self._samples[-1]:
            self._samples.append(samples)
            self._at.append(time.monotonic())

    def latency_ms(self, end_seconds: float) -> float | None:
        """Time since the frame holding the sample at `end_seconds` was first sent."""
        i = bisect.bisect_left(self._samples, round(end_seconds * self.sample_rate))
        if not self._at:
            return None
        # past the last frame: the flushed tail of a resampler rounds past it
        return round((time.monotonic() - self._at[min(i, len(self._at) - 1)]) * 1000, 3)


class ConnectionLost(ConnectionError):
    """The connection broke and the session could not be resumed in time."""


class UnackedAudio:
    """Encoded frames the server has not acknowledged, kept to send again after a reconnect.

    Positions are sample counts at the client's rate. An ack forgets the frames wholly before
    it; the buffer grows only while the server is unreachable (bounded by the resume time).
    """

    def __init__(self, frame_bytes: int) -> None:
        self.frame_bytes = frame_bytes
        self._starts: list[int] = []
        self._frames: list[bytes] = []
        self._head = 0  # frames before this index are acknowledged (and emptied)
        self.end = 0  # samples appended so far
        self.acked = 0

    def append(self, data: bytes) -> None:
        self._starts.append(self.end)
        self._frames.append(data)
        self.end += len(data) // self.frame_bytes

    def ack(self, samples: int) -> None:
        self.acked = max(self.acked, min(samples, self.end))
        while self._head < len(self._frames) and self._frame_end(self._head) <= self.acked:
            self._frames[self._head] = b""
            self._head += 1
        if self._head > 256 and 2 * self._head > len(self._frames):
            del self._starts[: self._head], self._frames[: self._head]
            self._head = 0

    @property
    def kept(self) -> int:
        """Samples kept for a resend."""
        return self.end - (self._starts[self._head] if self._head < len(self._starts) else self.end)

    def after(self, position: int) -> bytes | None:
        """The audio from `position` to the end of the frame that holds it; None past the end."""
        if position >= self.end:
            return None
        i = bisect.bisect_right(self._starts, position, lo=self._head) - 1
        if i < self._head:
            raise ValueError(
                f"the server asks for audio from sample {position}, before what it acknowledged "
                f"({self.acked})"
            )
        return self._frames[i][(position - self._starts[i]) * self.frame_bytes :]

    def _frame_end(self, i: int) -> int:
        return self._starts[i] + len(self._frames[i]) // self.frame_bytes


class StreamClient:
    """One session over the WebSocket protocol. If the connection breaks, the client resumes
    the session (with backoff, for up to `resume_seconds`; 0 = never): the server says how much
    audio it has, the client sends the rest from what it kept unacknowledged, and events the
    break swallowed are sent again (each once: they are numbered)."""

    def __init__(
        self,
        url: str,
        sample_rate: int,
        channels: int,
        encoding: Encoding = Encoding.PCM_S16LE,
        config: dict[str, Any] | None = None,
        token: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        resume_seconds: float = 60.0,
    ) -> None:
        self.url = url
        self.sample_rate = sample_rate
        self.channels = channels
        self.encoding = encoding
        self.config = config or {}
        self.token = token
        self.on_event = on_event
        self.resume_seconds = resume_seconds
        self.session: str | None = None
        self.last_event = 0  # the number of the last event received
        self._ws: ClientConnection | None = None
        self._audio = UnackedAudio(PcmFormat(sample_rate, channels, encoding).frame_bytes)
        self._more = asyncio.Event()  # new audio, or the end of it
        self._input_done = False
        self._frames_seen: set[tuple[int, int]] = set()
        self._sends = SendLog(sample_rate)

    async def run(self, blocks: AsyncIterator[np.ndarray], realtime: bool = True) -> StreamResult:
        """Stream float32 (n, channels) blocks, then `stop`; return everything the server said."""
        producer = asyncio.create_task(self._produce(blocks, realtime))
        result: StreamResult | None = None
        lost_at = attempt = 0.0
        try:
            while True:
                try:
                    ws = await connect(self.url, additional_headers=self._headers(), max_size=None)
                except (OSError, InvalidHandshake, TimeoutError) as exc:
                    if result is None:
                        raise  # no session yet: nothing to resume
                    attempt += 1
                    await self._back_off(attempt, lost_at, exc)
                    continue
                async with ws:
                    try:
                        ready = await self._start(ws, resume=result is not None)
                    except (ConnectionClosed, ServerError) as exc:
                        if result is None or not _worth_retrying(exc):
                            raise
                        attempt += 1
                        await self._back_off(attempt, lost_at, exc)
                        continue
                    if result is None:
                        result = StreamResult(ready)
                    else:
                        result.resumes += 1
                        log.warning("session %s resumed at sample %d", self.session,
                                    ready["samples_received"])  # fmt: skip
                    ended = await self._stream(ws, result, ready["samples_received"])
                    result.close_code = ws.close_code
                result.samples_sent = self._audio.end
                if ended or not self.resume_seconds:
                    return result
                log.warning("connection to session %s lost; resuming", self.session)
                lost_at, attempt = time.monotonic(), 0
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)

    async def send_control(self, message: dict[str, Any]) -> None:
        """A control message (`generate`, `cancel`) during `run`."""
        if self._ws is None:
            raise ConnectionError("not connected (the client may be resuming)")
        await self._ws.send(json.dumps(message))

    @property
    def connected(self) -> bool:
        """Whether `send_control` can send now (started, not between connections)."""
        return self._ws is not None

    @property
    def acked(self) -> int:
        """Samples the server has acknowledged so far."""
        return self._audio.acked

    def _headers(self) -> dict[str, str] | None:
        return {"Authorization": f"Bearer {self.token}"} if self.token else None

    async def _back_off(self, attempt: float, lost_at: float, cause: Exception) -> None:
        if time.monotonic() - lost_at > self.resume_seconds:
            raise ConnectionLost(
                f"could not resume session {self.session} within {self.resume_seconds:g} s"
            ) from cause
        delay = min(2.0, 0.1 * 2**attempt) * random.uniform(0.8, 1.2)  # noqa: S311 - jitter
        await asyncio.sleep(delay)

    async def _start(self, ws: ClientConnection, resume: bool) -> dict[str, Any]:
        start: dict[str, Any] = {
            "type": "start",
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "encoding": self.encoding.value,
            "config": self.config,
        }
        if resume:
            start.update(session=self.session, resume=True, last_event=self.last_event)
        await ws.send(json.dumps(start))
        ready = json.loads(await ws.recv())
        if ready["type"] == "error":
            raise ServerError(ready)
        self.session = ready["session"]
        return ready

    async def _produce(self, blocks: AsyncIterator[np.ndarray], realtime: bool) -> None:
        """Blocks -> the unacknowledged buffer, paced from the start time when `realtime`:
        a block is due when its last sample would have been captured, so timing errors never
        accumulate (and a broken connection does not stop the clock)."""
        t0 = time.monotonic()
        async for block in blocks:
            if realtime:
                due = t0 + (self._audio.end + len(block)) / self.sample_rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            self._audio.append(encode(block, self.encoding))
            self._more.set()
        self._input_done = True
        self._more.set()

    async def _stream(self, ws: ClientConnection, result: StreamResult, position: int) -> bool:
        """Send from `position` and receive until the connection closes; True when the session
        ended (its `end`, or a fatal error), False when the connection broke."""
        self._ws = ws
        sender = asyncio.create_task(self._send(ws, position))
        receiver = asyncio.create_task(self._receive(ws, result))
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done and not isinstance(sender.exception(), ConnectionClosed | None):
                raise sender.exception()  # type: ignore[misc]
            await receiver
        finally:
            self._ws = None
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
        fatal = any(e["type"] == "error" and e.get("fatal") for e in result.events)
        return result.end is not None or fatal

    async def _send(self, ws: ClientConnection, position: int) -> None:
        while True:
            self._more.clear()
            data = self._audio.after(position)
            if data is None:
                if self._input_done:
                    await ws.send(json.dumps({"type": "stop"}))
                    return
                await self._more.wait()
                continue
            await ws.send(data)
            position += len(data) // self._audio.frame_bytes
            self._sends.sent(position)

    async def _receive(self, ws: ClientConnection, result: StreamResult) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    header, pcm = unpack_audio(message)
                    if (header.generation, header.index) in self._frames_seen:
                        continue  # sent again after a resume
                    self._frames_seen.add((header.generation, header.index))
                    fmt = PcmFormat(header.sample_rate, 1, header.encoding)
                    audio = decode(pcm, fmt)[:, 0]
                    result.audio.setdefault(header.generation, []).append((header, audio))
                    result.first_audio_at.setdefault(header.generation, time.monotonic())
                    continue
                event = json.loads(message)
                n = event.get("n", 0)
                if n and n <= self.last_event:
                    continue  # sent again after a resume; already here
                self.last_event = max(self.last_event, n)
                if event["type"] == "ack":
                    self._audio.ack(event["samples"])
                    result.acks.append(event["samples"])
                    continue
                event["client_time"] = time.monotonic()
                if event["type"] == "analysis":
                    event["client_latency_ms"] = self._sends.latency_ms(event["end"])
                result.events.append(event)
                if event["type"] == "end":
                    result.end = event
                if self.on_event:
                    self.on_event(event)
        except ConnectionClosed:
            pass  # closed without a close frame: close_code tells


# Refusals of a resume that say "try again" (close 1013): the server is full, the session's
# front-end has not let go of it yet, or the shared store is unreachable for a moment.
RETRY_CODES = ("server_busy", "session_in_use", "store_unavailable")


def _worth_retrying(error: Exception) -> bool:
    """A broken connection, or a refusal that a later try may not get."""
    return not isinstance(error, ServerError) or error.event.get("code") in RETRY_CODES


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")
