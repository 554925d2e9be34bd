"""A client of `/v1/media-stream` that plays the telephony side, as Twilio's media streams do:
`connected`, `start`, the call's audio as base64 G.711 `media` messages of 20 ms, `stop`.

For trying a server without a phone line, and for the tests. What comes back is sorted as it
arrives: the server's JSON events (a `type` field), generated audio (`media` messages) and the
`mark` after each clip, which the client echoes once everything before it has been "played"
(here: received), as the phone side does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from stream.core.audio.g711 import decode_alaw, decode_mulaw
from stream.core.audio.pcm import Encoding, encode

# The media formats of `start.mediaFormat.encoding` and the session encodings they are.
MEDIA_FORMATS = {"audio/x-mulaw": Encoding.PCM_MULAW, "audio/x-alaw": Encoding.PCM_ALAW}
PIECE_SECONDS = 0.02


@dataclass
class CallResult:
    events: list[dict[str, Any]] = field(default_factory=list)  # the server's JSON events
    media: list[bytes] = field(default_factory=list)  # generated audio, each message's bytes
    # The marks the server sent, each with how many media messages had come before it.
    marks: list[tuple[str, int]] = field(default_factory=list)
    other: list[dict[str, Any]] = field(default_factory=list)  # anything else with an `event`
    close_code: int | None = None
    close_reason: str = ""
    samples_sent: int = 0
    media_format: str = "audio/x-mulaw"

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]

    @property
    def ready(self) -> dict[str, Any] | None:
        found = self.of_type("ready")
        return found[0] if found else None

    @property
    def end(self) -> dict[str, Any] | None:
        found = self.of_type("end")
        return found[-1] if found else None

    @property
    def analysis(self) -> list[dict[str, Any]]:
        return self.of_type("analysis")

    @property
    def errors(self) -> list[dict[str, Any]]:
        return self.of_type("error")

    @property
    def transcript(self) -> str:
        """Every utterance's final text (the end event's included), joined by spaces."""
        events = self.analysis + ([self.end] if self.end else [])
        finals = [((e.get("transcript") or {}).get("final") or {}) for e in events]
        return " ".join(t for f in finals if (t := str(f.get("text", "")).strip()))

    def audio(self, first: int = 0, last: int | None = None) -> np.ndarray:
        """The generated audio of media messages [first, last) as float32 at the call's rate."""
        data = b"".join(self.media[first:last])
        if MEDIA_FORMATS[self.media_format] is Encoding.PCM_ALAW:
            return decode_alaw(data)
        return decode_mulaw(data)


class MediaStreamClient:
    """One call. `custom_parameters` are the `<Parameter>`s of Twilio's `<Stream>`: strings,
    such as `config` (a JSON string of the session's config) and `token`."""

    def __init__(
        self,
        url: str,
        custom_parameters: dict[str, str] | None = None,
        media_format: str = "audio/x-mulaw",
        sample_rate: int = 8000,
        token: str | None = None,
        stream_sid: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.url = url
        self.custom_parameters = custom_parameters or {}
        self.media_format = media_format
        self.sample_rate = sample_rate
        self.token = token
        self.stream_sid = stream_sid or "MZ" + uuid.uuid4().hex
        self.on_event = on_event
        self._sequence = 0
        self._ws: ClientConnection | None = None

    async def run(
        self, audio: np.ndarray, realtime: bool = True, linger: float = 30.0
    ) -> CallResult:
        """Stream mono float32 `audio` at the call's rate in 20 ms `media` messages (paced in
        real time, or as fast as the socket takes them), send `stop`, and collect what comes
        back until the server closes the connection (at most `linger` seconds after `stop`)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        result = CallResult(media_format=self.media_format)
        async with connect(self.url, additional_headers=headers, max_size=None) as ws:
            self._ws = ws
            receiver = asyncio.create_task(self._receive(ws, result))
            try:
                await self.send(ws, {"event": "connected", "protocol": "Call", "version": "1.0.0"})
                await self.send(ws, self.start_message())
                result.samples_sent = await self._send_audio(ws, audio, realtime, receiver)
                if not receiver.done():
                    await self.send(ws, self.stop_message())
                await asyncio.wait_for(asyncio.shield(receiver), linger)
            except ConnectionClosed:
                await asyncio.wait_for(asyncio.shield(receiver), linger)
            finally:
                self._ws = None
                receiver.cancel()
                await asyncio.gather(receiver, return_exceptions=True)
            result.close_code, result.close_reason = ws.close_code, ws.close_reason or ""
        return result

    def start_message(self) -> dict[str, Any]:
        return self._message(
            "start",
            start={
                "streamSid": self.stream_sid,
                "accountSid": "AC" + "0" * 32,
                "callSid": "CA" + uuid.uuid4().hex,
                "tracks": ["inbound"],
                "customParameters": dict(self.custom_parameters),
                "mediaFormat": {
                    "encoding": self.media_format, "sampleRate": self.sample_rate, "channels": 1,
                },
            },
        )  # fmt: skip

    def media_message(self, payload: bytes, chunk: int, timestamp_ms: int) -> dict[str, Any]:
        return self._message(
            "media",
            media={
                "track": "inbound", "chunk": str(chunk), "timestamp": str(timestamp_ms),
                "payload": base64.b64encode(payload).decode("ascii"),
            },
        )  # fmt: skip

    def stop_message(self) -> dict[str, Any]:
        return self._message(
            "stop", stop={"accountSid": "AC" + "0" * 32, "callSid": "CA" + "0" * 32}
        )

    async def send_control(self, message: dict[str, Any]) -> None:
        """A message of the server's own protocol (`{"type": "generate", ...}`) during `run`:
        the endpoint passes messages with a `type` to the session."""
        if self._ws is None:
            raise ConnectionError("not connected")
        await self._ws.send(json.dumps(message))

    async def send(self, ws: ClientConnection, message: dict[str, Any]) -> None:
        await ws.send(json.dumps(message))

    def _message(self, event: str, **fields: Any) -> dict[str, Any]:
        self._sequence += 1
        message = {"event": event, "sequenceNumber": str(self._sequence), **fields}
        if event != "connected":
            message["streamSid"] = self.stream_sid
        return message

    async def _send_audio(
        self, ws: ClientConnection, audio: np.ndarray, realtime: bool, receiver: asyncio.Task
    ) -> int:
        """The call's audio in 20 ms pieces; returns the samples sent (fewer if the server
        ended the session first)."""
        wire = encode(np.asarray(audio, np.float32).reshape(-1), MEDIA_FORMATS[self.media_format])
        piece = round(PIECE_SECONDS * self.sample_rate)  # G.711: one byte per sample
        t0 = time.monotonic()
        sent = 0
        for chunk, i in enumerate(range(0, len(wire), piece), start=1):
            if receiver.done():
                break
            if realtime:
                await asyncio.sleep(max(0.0, t0 + i / self.sample_rate - time.monotonic()))
            payload = wire[i : i + piece]
            await self.send(ws, self.media_message(payload, chunk, i * 1000 // self.sample_rate))
            sent += len(payload)
        return sent

    async def _receive(self, ws: ClientConnection, result: CallResult) -> None:
        try:
            async for message in ws:
                data = json.loads(message)
                if "type" in data:  # one of the server's events
                    result.events.append(data)
                    if self.on_event is not None:
                        self.on_event(data)
                elif data.get("event") == "media":
                    result.media.append(base64.b64decode(data["media"]["payload"]))
                elif data.get("event") == "mark":
                    name = data["mark"]["name"]
                    result.marks.append((name, len(result.media)))
                    # Everything before the mark has arrived ("played"): echo it.
                    await self.send(ws, self._message("mark", mark={"name": name}))
                else:
                    result.other.append(data)
        except ConnectionClosed:
            pass
