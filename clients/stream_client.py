"""A client of the public WebSocket protocol, for the CLI, the tests and the load generator.

It knows the protocol (stream.protocol) and nothing of the server's internals. Audio goes out
paced from a start time in samples (or as fast as the server takes it); events come back on a
concurrent task and are handed to a callback, each with its end-to-end latency measured here:
from sending the frame that held the chunk's last sample to receiving the chunk's event.
Generated audio arrives as binary frames (protocol.unpack_audio) and is kept per generation;
`send_control` sends `generate` / `cancel` messages while the audio streams.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from stream.core.pcm import Encoding, PcmFormat, decode, encode
from stream.protocol import AudioHeader, unpack_audio


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
    # Generated audio frames per generation id, in arrival order: (header, float32 mono).
    audio: dict[int, list[tuple[AudioHeader, np.ndarray]]] = field(default_factory=dict)

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


class StreamClient:
    def __init__(
        self,
        url: str,
        sample_rate: int,
        channels: int,
        encoding: Encoding = Encoding.PCM_S16LE,
        config: dict[str, Any] | None = None,
        token: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.url = url
        self.sample_rate = sample_rate
        self.channels = channels
        self.encoding = encoding
        self.config = config or {}
        self.token = token
        self.on_event = on_event
        self._ws: ClientConnection | None = None
        # After each frame: samples sent so far, and when (monotonic).
        self._sent_samples: list[int] = []
        self._sent_at: list[float] = []

    async def run(self, blocks: AsyncIterator[np.ndarray], realtime: bool = True) -> StreamResult:
        """Stream float32 (n, channels) blocks, then `stop`; return everything the server said."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        async with connect(self.url, additional_headers=headers, max_size=None) as ws:
            start = {
                "type": "start",
                "sample_rate": self.sample_rate,
                "channels": self.channels,
                "encoding": self.encoding.value,
                "config": self.config,
            }
            await ws.send(json.dumps(start))
            ready = json.loads(await ws.recv())
            if ready["type"] == "error":
                raise ServerError(ready)
            result = StreamResult(ready)
            self._ws = ws
            receiver = asyncio.create_task(self._receive(ws, result))
            try:
                try:
                    await self._send(ws, blocks, result, realtime)
                    await ws.send(json.dumps({"type": "stop"}))
                except ConnectionClosed:
                    pass  # the server ended the session; its error event says why
                await receiver
            finally:
                receiver.cancel()
            result.close_code = ws.close_code
            return result

    async def send_control(self, message: dict[str, Any]) -> None:
        """A control message (`generate`, `cancel`) during `run`."""
        if self._ws is None:
            raise RuntimeError("not connected")
        await self._ws.send(json.dumps(message))

    async def _send(
        self,
        ws: ClientConnection,
        blocks: AsyncIterator[np.ndarray],
        result: StreamResult,
        realtime: bool,
    ) -> None:
        t0 = time.monotonic()
        async for block in blocks:
            if realtime:
                # Pace from the start time: a block leaves when its last sample would have
                # been captured, so timing errors never accumulate.
                due = t0 + (result.samples_sent + len(block)) / self.sample_rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            await ws.send(encode(block, self.encoding))
            result.samples_sent += len(block)
            self._sent_samples.append(result.samples_sent)
            self._sent_at.append(time.monotonic())

    async def _receive(self, ws: ClientConnection, result: StreamResult) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    header, pcm = unpack_audio(message)
                    fmt = PcmFormat(header.sample_rate, 1, header.encoding)
                    audio = decode(pcm, fmt)[:, 0]
                    result.audio.setdefault(header.generation, []).append((header, audio))
                    continue
                event = json.loads(message)
                event["client_time"] = time.monotonic()
                if event["type"] == "analysis":
                    event["client_latency_ms"] = self._latency_ms(event["end"])
                result.events.append(event)
                if event["type"] == "end":
                    result.end = event
                if self.on_event:
                    self.on_event(event)
        except ConnectionClosed:
            pass  # closed without a close frame: close_code tells

    def _latency_ms(self, end_seconds: float) -> float | None:
        """Time since the frame holding the sample at `end_seconds` was sent."""
        last_sample = round(end_seconds * self.sample_rate)
        i = bisect.bisect_left(self._sent_samples, last_sample)
        if i == len(self._sent_at):
            i -= 1  # the flushed tail of the resampler rounds past the last frame
        if i < 0:
            return None
        return round((time.monotonic() - self._sent_at[i]) * 1000, 3)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")
