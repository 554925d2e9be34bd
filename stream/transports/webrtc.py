"""WebRTC transport (aiortc): `POST /v1/webrtc/offer` -> a session, its audio and events.

Signalling is one HTTP exchange: the client posts its SDP offer with the fields of the WebSocket
`start` message (session, config, token); the answer comes back as JSON. Then, per session:

- the client's audio track -> the session API. aiortc delivers 48 kHz s16 frames (stereo from
  browsers); they go to `Session.receive_frames` as float32, and the session's own input stage
  down-mixes and resamples them, once. The track is always read, so aiortc never queues frames
  without bound. Its packets are decoded as they arrive, without aiortc's 4-packet audio
  jitter buffer (webrtc_receiver.py: analysis gains nothing from smoothing arrival jitter);
- a data channel named `events`: the same JSON events as the WebSocket transport (`ready` first),
  and the same control messages (`stop`, `generate`, `cancel`) back;
- one outbound audio track, paced from its start time in 20 ms frames: generated audio when there
  is some, silence otherwise (the session's generation output is set to 48 kHz float for it).

ICE uses host candidates only unless `webrtc_ice_servers` names STUN/TURN servers. Every path
(the client leaves, an error, the server shuts down) ends in `pc.close()` and the session's
release.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
from collections import deque
from typing import Any

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from stream.protocol import ProtocolError, encode_event, nests_deeper, parse_start
from stream.session import Session, SessionManager
from stream.session.outbox import Outbox
from stream.settings import Settings
from stream.transports.access import check_token, http_refusal, offered_token, refusal
from stream.transports.webrtc_receiver import use_audio_receive_buffer

log = logging.getLogger(__name__)
TRACK_RATE = 48_000
FRAME = 960  # 20 ms at 48 kHz
MAX_QUEUED_SECONDS = 60.0  # generated audio waiting to be played out, per session
STOP_QUIET_S = 0.1  # after `stop`, wait until inbound audio has been quiet this long (max 1 s)


class OutboundAudio:
    """The session's outbound track: 20 ms frames from a start time; queued audio or silence."""

    kind = "audio"

    def __init__(self) -> None:
        from aiortc import MediaStreamTrack

        class _Track(MediaStreamTrack):
            kind = "audio"

            async def recv(inner) -> Any:  # noqa: N805 - the track delegates to its owner
                return await self._next_frame(inner)

        self.track = _Track()
        self._queue: deque[np.ndarray] = deque()
        self._queued = 0
        self._start: float | None = None
        self._pts = 0
        self.frames_sent = 0
        self.audio_frames_sent = 0  # frames that carried generated audio

    def push(self, audio: np.ndarray) -> None:
        """Generated audio at 48 kHz mono, played after what is already queued."""
        if self._queued + len(audio) > MAX_QUEUED_SECONDS * TRACK_RATE:
            log.warning("outbound audio queue full: %d samples dropped", len(audio))
            return
        self._queue.append(np.asarray(audio, np.float32))
        self._queued += len(audio)

    async def _next_frame(self, track: Any) -> Any:
        import av
        from aiortc.mediastreams import MediaStreamError

        if track.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._start + self._pts / TRACK_RATE - time.monotonic()))
        samples = self._take(FRAME)
        frame = av.AudioFrame.from_ndarray(
            np.clip(np.round(samples * 32767), -32768, 32767).astype(np.int16)[None],
            format="s16",
            layout="mono",
        )
        frame.sample_rate = TRACK_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, TRACK_RATE)
        self._pts += FRAME
        return frame

    def _take(self, count: int) -> np.ndarray:
        out = np.zeros(count, np.float32)
        filled = 0
        while filled < count and self._queue:
            head = self._queue[0]
            n = min(count - filled, len(head))
            out[filled : filled + n] = head[:n]
            filled += n
            if n == len(head):
                self._queue.popleft()
            else:
                self._queue[0] = head[n:]
        self._queued -= filled
        self.frames_sent += 1
        self.audio_frames_sent += filled > 0
        return out


class Peers:
    """One app's live peer connections: the app closes them (and so their sessions) when it
    shuts down, before the session manager ends the rest."""

    def __init__(self) -> None:
        self._live: set[WebRtcPeer] = set()

    def add(self, peer: WebRtcPeer) -> None:
        self._live.add(peer)

    def discard(self, peer: WebRtcPeer) -> None:
        self._live.discard(peer)

    def __len__(self) -> int:
        return len(self._live)

    async def close_all(self) -> None:
        for peer in list(self._live):
            await peer.close()


# The offer's body: an SDP offer is a few KB. A bigger one is refused (413 `offer_too_large`)
# without being read when its Content-Length says so, else as soon as the running count passes.
OFFER_MAX_BYTES = 64 * 1024
OFFER_MAX_DEPTH = 32  # nesting of the offer's JSON (its `config` is a few levels deep)


async def offer_endpoint(request: Request) -> JSONResponse:
    """Access first, from the request line and headers alone: the Origin allow-list, and a token
    in the header or query. Then the body (at most OFFER_MAX_BYTES), then a token in the body
    where none came with the request, and only then anything else (no session before that)."""
    manager: SessionManager = request.app.state.sessions
    settings = manager.settings
    offered = offered_token(request.headers, request.query_params)
    if (refused := http_refusal(request, settings, token=offered is not None)) is not None:
        return refused
    try:
        body = await _read_offer(request)
        check_token(settings, offered, body.get("token"), "the offer")
        start = _start_message(body, settings, manager.generator is not None)
        client = request.client.host if request.client else None
        session = await manager.open(start, transport="webrtc", client=client)
    except ProtocolError as error:
        return refusal(error)
    peer = WebRtcPeer(session, manager, settings, request.app.state.webrtc_peers)
    try:
        answer = await peer.answer(body["sdp"])
    except Exception as exc:  # noqa: BLE001 - a bad SDP: refuse it, leave nothing behind
        await peer.close()
        return refusal(ProtocolError("invalid_offer", f"the offer was not usable: {exc}"))
    return JSONResponse({"type": "answer", "sdp": answer, "session": session.id})


async def _read_offer(request: Request) -> dict[str, Any]:
    """The offer as JSON, read with a cap; ProtocolError `offer_too_large` / `invalid_offer`."""
    too_large = ProtocolError("offer_too_large", f"an offer is at most {OFFER_MAX_BYTES} bytes")
    try:
        declared = int(request.headers.get("content-length", "0"))
    except ValueError:  # (the HTTP parser has vetted it: only absurdly long digit strings)
        raise too_large from None
    if declared > OFFER_MAX_BYTES:
        raise too_large  # nothing of the body read
    data = bytearray()
    try:
        async for chunk in request.stream():
            data += chunk
            if len(data) > OFFER_MAX_BYTES:
                raise too_large
    except ClientDisconnect:
        raise ProtocolError("invalid_offer", "the client left before the offer was sent") from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ProtocolError("invalid_offer", "the body is not UTF-8 JSON") from None
    if nests_deeper(text, OFFER_MAX_DEPTH):  # before parsing: json.loads recurses per level
        raise ProtocolError("invalid_offer", f"the offer nests deeper than {OFFER_MAX_DEPTH}")
    try:
        body = json.loads(text)
    except ValueError:
        raise ProtocolError("invalid_offer", "the body is not JSON") from None
    if not isinstance(body, dict) or body.get("type") != "offer" or "sdp" not in body:
        raise ProtocolError("invalid_offer", 'post {"type": "offer", "sdp": ..., ...} as JSON')
    return body


def _start_message(body: dict[str, Any], settings: Settings, generates: bool) -> Any:
    config = body.get("config")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ProtocolError("invalid_config", "config must be an object")
    config = dict(config)
    if isinstance(config.get("generation"), dict):
        # Generated audio goes out on the track: 48 kHz float, whatever was asked.
        config["generation"] = {
            **config["generation"],
            "sample_rate": TRACK_RATE,
            "encoding": "pcm_f32le",
        }
    elif generates:  # (without a generator, a generation config would only earn an error)
        config["generation"] = {"sample_rate": TRACK_RATE, "encoding": "pcm_f32le"}
    start = {
        "type": "start",
        "sample_rate": TRACK_RATE,
        "channels": 2,
        "encoding": "pcm_s16le",
        "config": config,
    }
    if body.get("session") is not None:
        start["session"] = body["session"]
    return parse_start(json.dumps(start))


class WebRtcPeer:
    """One RTCPeerConnection and its session, from the answer to `pc.close()`."""

    def __init__(
        self, session: Session, manager: SessionManager, settings: Settings, peers: Peers
    ) -> None:
        from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

        servers = [RTCIceServer(urls=url) for url in settings.webrtc_ice_servers]
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        self.session, self.manager, self.peers = session, manager, peers
        self.outbound = OutboundAudio()
        self.pc.addTrack(self.outbound.track)
        self.channel: Any = None
        self._channel_open = asyncio.Event()
        self._last_audio = time.monotonic()
        self.samples_in = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        peers.add(self)
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_state)

    async def answer(self, sdp: str) -> str:
        from aiortc import RTCSessionDescription

        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        # The offer's transceivers exist now, and no media flows before the answer: inbound
        # audio reaches the session as it arrives, not 4 packets later (webrtc_receiver.py).
        use_audio_receive_buffer(self.pc)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._spawn(self._send_loop())
        return self.pc.localDescription.sdp

    async def close(self) -> None:
        """Idempotent: stop reading and sending, close the connection, release the session."""
        if self._closed:
            return
        self._closed = True
        self.peers.discard(self)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        await self.pc.close()
        await self.manager.release(self.session)

    # --- aiortc callbacks -----------------------------------------------------------------

    def _on_track(self, track: Any) -> None:
        if track.kind == "audio":
            self._spawn(self._read_audio(track))

    def _on_datachannel(self, channel: Any) -> None:
        if channel.label != "events" or self.channel is not None:
            return
        self.channel = channel
        channel.on("message", self._on_message)
        if channel.readyState == "open":
            self._channel_open.set()
        channel.on("open", self._channel_open.set)

    def _on_message(self, message: Any) -> None:
        if isinstance(message, str):
            self._spawn(self._control(message))

    async def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self._spawn(self.close())

    # --- the session's two directions ---------------------------------------------------------

    async def _read_audio(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self._last_audio = time.monotonic()
            pcm = frame.to_ndarray()  # (1, samples * channels) packed s16
            channels = len(frame.layout.channels)
            audio = pcm.reshape(-1, channels).astype(np.float32) / 32768.0
            if channels == 1:
                audio = np.repeat(audio, 2, axis=1)  # the session was declared stereo
            if frame.sample_rate != TRACK_RATE:
                log.warning("inbound audio at %d Hz, expected %d", frame.sample_rate, TRACK_RATE)
                continue
            self.samples_in += len(audio)
            await self.session.receive_frames(audio)

    async def _control(self, text: str) -> None:
        try:
            kind = json.loads(text).get("type")
        except (ValueError, AttributeError):
            kind = None
        if kind == "stop":
            # RTP and the data channel are separate paths: let audio already on its way land
            # before the session counts it (the client stops its track before sending stop).
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                quiet = time.monotonic() - self._last_audio
                if quiet >= STOP_QUIET_S:
                    break
                await asyncio.sleep(STOP_QUIET_S - quiet)
        await self.session.receive_text(text)

    async def _send_loop(self) -> None:
        await self._channel_open.wait()
        self.channel.send(json.dumps(self.session.ready_event()))
        outbox: Outbox = self.session.outbox
        try:
            while (item := await outbox.get()) is not None:
                if item.audio is not None:  # the session makes it at the track's rate
                    self.outbound.push(item.audio.samples)
                    continue
                if self.channel.readyState != "open":
                    break
                self.channel.send(encode_event(item.event_to_send()))
            # Let the last events leave (the channel's buffer drains asynchronously).
            for _ in range(100):
                if self.channel.bufferedAmount == 0:
                    break
                await asyncio.sleep(0.01)
        finally:
            self._spawn(self.close())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
