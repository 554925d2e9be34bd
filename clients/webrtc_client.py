"""A WebRTC client of the server (aiortc): what a browser does, from Python.

It posts an SDP offer to `/v1/webrtc/offer` with the `start` fields, sends audio on a track
paced in 20 ms frames at 48 kHz (Opus on the wire), reads events from the `events` data channel,
and records what the server's track plays (generated audio, silence otherwise). At the end of the
audio (and 120 ms of silence: see TAIL_FRAMES) it stops its track, sends `stop`, and waits for
`end`. WebRTC carries audio over UDP: the server counts what arrived, which on a healthy link
is the audio sent plus at most the silent tail.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clients.stream_client import SendLog, ServerError, StreamResult
from stream.core.audio.resample import StreamResampler

RATE = 48_000
FRAME = 960
# Silence sent after the audio: a receiver's jitter buffer may hold the last few packets until
# later ones arrive (aiortc's own holds 4; this server's holds none: webrtc_receiver.py), so
# without a tail the end of the audio would not reach such a server's session.
TAIL_FRAMES = 6


@dataclass
class WebRtcResult(StreamResult):
    played: list[np.ndarray] = field(default_factory=list)  # the server's track, 48 kHz mono

    @property
    def played_audio(self) -> np.ndarray:
        return np.concatenate(self.played) if self.played else np.zeros(0, np.float32)


class _FileTrack:
    """An outbound track that plays `audio` (48 kHz, (n, channels)) once, in real time."""

    def __init__(self, audio: np.ndarray) -> None:
        from aiortc import MediaStreamTrack

        owner = self

        class _Track(MediaStreamTrack):
            kind = "audio"

            async def recv(self) -> Any:
                return await owner._next(self)

        self.track = _Track()
        self.audio = audio
        self.position = 0
        self.done = asyncio.Event()
        self._start: float | None = None
        self.sends = SendLog(RATE)  # when each frame was handed to the encoder

    async def _next(self, track: Any) -> Any:
        import av
        from aiortc.mediastreams import MediaStreamError

        if self.position >= len(self.audio):
            self.done.set()
            track.stop()
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._start + self.position / RATE - time.monotonic()))
        block = self.audio[self.position : self.position + FRAME]
        if len(block) < FRAME:  # the encoder takes whole 20 ms frames: pad the last one
            block = np.pad(block, ((0, FRAME - len(block)), (0, 0)))
        channels = block.shape[1]
        pcm = np.clip(np.round(block * 32767), -32768, 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(
            pcm.reshape(1, -1), format="s16", layout="stereo" if channels == 2 else "mono"
        )
        frame.sample_rate = RATE
        frame.pts = self.position
        frame.time_base = fractions.Fraction(1, RATE)
        self.position += FRAME
        self.sends.sent(self.position)
        return frame


class WebRtcClient:
    def __init__(
        self,
        offer_url: str,
        config: dict[str, Any] | None = None,
        token: str | None = None,
        session: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        ice_servers: list[str] | None = None,
    ) -> None:
        self.offer_url = offer_url
        self.config = config or {}
        self.token = token
        self.session = session
        self.on_event = on_event
        self.ice_servers = ice_servers or []
        self._channel: Any = None

    async def run(self, audio: np.ndarray, rate: int, timeout: float = 120.0) -> WebRtcResult:
        """Stream float32 (n, channels) audio at `rate` (resampled to 48 kHz here, as a browser
        captures), then stop; return the events, the end and what the server's track played."""
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

        audio48 = _to_48k(np.asarray(audio, np.float32), rate)
        tail = np.zeros((TAIL_FRAMES * FRAME, audio48.shape[1]), np.float32)
        servers = [RTCIceServer(urls=url) for url in self.ice_servers]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        source = _FileTrack(np.concatenate([audio48, tail]))
        pc.addTrack(source.track)
        channel = self._channel = pc.createDataChannel("events")
        result = WebRtcResult(ready={})
        ended = asyncio.Event()
        readers: list[asyncio.Task[None]] = []

        def on_message(message: Any) -> None:
            event = json.loads(message)
            event["client_time"] = time.monotonic()
            if event["type"] == "analysis":
                event["client_latency_ms"] = source.sends.latency_ms(event["end"])
            if event["type"] == "ready":
                result.ready = event
            result.events.append(event)
            if event["type"] == "end":
                result.end = event
                ended.set()
            if event["type"] == "error" and event.get("fatal"):
                ended.set()
            if self.on_event:
                self.on_event(event)

        channel.on("message", on_message)
        pc.on("track", lambda track: readers.append(asyncio.ensure_future(_play(track, result))))
        try:
            await pc.setLocalDescription(await pc.createOffer())
            body = {"type": "offer", "sdp": pc.localDescription.sdp, "config": self.config}
            if self.session:
                body["session"] = self.session
            if self.token:
                body["token"] = self.token
            answer = await asyncio.to_thread(_post_json, self.offer_url, body)
            if answer.get("type") != "answer":
                raise ServerError(answer)
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
            await asyncio.wait_for(source.done.wait(), timeout)
            result.samples_sent = len(audio48)  # the silent tail is not counted
            if channel.readyState == "open":
                channel.send(json.dumps({"type": "stop"}))
            await asyncio.wait_for(ended.wait(), timeout)
        finally:
            for reader in readers:
                reader.cancel()
            await pc.close()
        return result

    async def send_control(self, message: dict[str, Any]) -> None:
        """A control message (`generate`, `cancel`) on the data channel during `run`."""
        if self._channel is None or self._channel.readyState != "open":
            raise RuntimeError("the events channel is not open")
        self._channel.send(json.dumps(message))


async def _play(track: Any, result: WebRtcResult) -> None:
    """Read the server's track as a player would: every frame, 48 kHz, down-mixed to mono."""
    from aiortc.mediastreams import MediaStreamError

    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
        result.played.append(pcm.mean(axis=1).astype(np.float32) / 32768.0)


def _to_48k(audio: np.ndarray, rate: int) -> np.ndarray:
    if audio.ndim == 1:
        audio = audio[:, None]
    if rate == RATE:
        return audio
    channels = [StreamResampler(rate, RATE) for _ in range(audio.shape[1])]
    out = [np.concatenate([r.process(audio[:, c]), r.flush()]) for c, r in enumerate(channels)]
    return np.stack(out, axis=1)


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # a refusal carries a JSON error event
        return json.loads(exc.read() or b"{}")
