"""Media-stream transport: `/v1/media-stream`, a telephone call's audio in the message format of
Twilio's media streams, onto a session like any other.

The caller's side (Twilio, or any client of the same format) sends JSON text messages only:
`connected`, then `start` (the stream's ids, `mediaFormat`, `customParameters`), then `media`
(base64 G.711 payloads, 20 ms each), `mark` (the echo of a mark this side sent, once the audio
before it has been played), `dtmf`, and `stop`. Here:

- `start` becomes the session's start message: the media format (8 kHz mu-law for Twilio; A-law
  and other rates are taken too), `customParameters.config` (a JSON string of `start.config`),
  `customParameters.token`; the session's id is the `streamSid` when it is a valid id;
- each `media` payload goes to the session as the wire bytes of its encoding, so the send rates,
  frame limits and exact sample accounting are the session's own (Intake), as on `/v1/stream`;
- `stop` stops the session; `mark` echoes are counted, `dtmf` and `connected` are let be;
- text messages with our protocol's `type` instead of `event` (`generate`, `cancel`, `config`,
  `stop`) go to the session as on `/v1/stream`, for callers that are not Twilio.

Back on the same socket: every session event as JSON text, unchanged (a `type` field, where the
caller's messages have `event`), unless `customParameters.events` is "none"; generated audio as
`media` messages in the call's format, 20 ms each, and after a clip's last piece a `mark` named
`generation-<id>`. A call is not resumable: a broken connection ends its session. The
messages themselves (a call's `start` as the session's) are read in stream/protocol/media_stream.py.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from typing import Any

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from stream.core.audio.pcm import encode
from stream.core.audio.resample import StreamResampler
from stream.protocol import (
    CloseCode,
    ProtocolError,
    encode_event,
    error_event,
)
from stream.protocol.media_stream import MARK_PREFIX, Call, load_message, parse_call
from stream.protocol.messages import header_traceparent
from stream.session import Attachment, Session, SessionManager
from stream.session.outbox import AudioOut
from stream.settings import Settings
from stream.transports.access import check_token, check_upgrade
from stream.transports.websocket import _GONE, DOOR_PAUSE_S, _refuse

log = logging.getLogger(__name__)

PIECE_SECONDS = 0.02  # generated audio goes back in pieces this long, as the caller's come
# Messages besides `connected` tolerated before `start`: Twilio sends none, a confused client
# is told so after these rather than kept waiting for the start timeout.
MAX_BEFORE_START = 8
_STOP = json.dumps({"type": "stop"})


class _Ended(Exception):
    """The caller sent `stop` before `start`: the call ended before its stream began."""


async def media_stream_endpoint(websocket: WebSocket) -> None:
    manager: SessionManager = websocket.app.state.sessions
    await websocket.accept()
    try:
        call = await _handshake(websocket, manager.settings)
        client = websocket.client.host if websocket.client else None
        session = await manager.open(
            call.start, transport="media_stream", client=client, resumable=False
        )
    except ProtocolError as error:
        if error.code == "rate_limited":  # at the door: the address kept flooding
            await asyncio.sleep(DOOR_PAUSE_S)
        await _refuse(websocket, error)
        return
    except _Ended:
        with contextlib.suppress(*_GONE):
            await websocket.close(CloseCode.NORMAL)
        return
    except _GONE:
        return
    attachment: Attachment = session.attachment
    stream = MediaStream(websocket, session, call, manager.settings)
    try:
        if call.events:
            await websocket.send_text(json.dumps(session.ready_event()))
        await stream.run(attachment)
    except _GONE:
        pass
    finally:
        log.info(
            "media stream ended: %d media messages in, %d pieces of audio out, %d of %d marks "
            "played", stream.media_in, stream.media_out, stream.marks_played, stream.marks_sent,
            extra={"session": session.id},
        )  # fmt: skip
        await manager.disconnected(session, attachment, resumable=False)


async def _handshake(websocket: WebSocket, settings: Settings) -> Call:
    """Access checks, then messages up to `start`; raises ProtocolError for anything wrong."""
    policy = CloseCode.POLICY_VIOLATION
    offered = check_upgrade(websocket.headers, websocket.query_params, settings)
    others = 0
    try:
        async with asyncio.timeout(settings.start_timeout_seconds):
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    raise WebSocketDisconnect(message.get("code", 1000))
                if message.get("text") is None:
                    raise ProtocolError(
                        "start_required",
                        'this endpoint takes JSON text messages: {"event": "start", ...} first',
                        policy,
                    )
                data = load_message(message["text"], policy)
                event = data.get("event")
                if event == "start":
                    call = parse_call(data)
                    break
                if event == "stop":
                    raise _Ended
                if event == "media":
                    raise ProtocolError(
                        "start_required", "media before start: send the start message first",
                        policy,
                    )  # fmt: skip
                if event is None:  # most likely our own protocol's start, at the wrong door
                    raise ProtocolError(
                        "invalid_start",
                        'media-stream messages have an "event" ({"event": "start", ...}); the '
                        'protocol of {"type": "start", ...} is served at /v1/stream',
                        policy,
                    )
                if event != "connected":
                    others += 1
                    if others > MAX_BEFORE_START:
                        raise ProtocolError(
                            "start_required",
                            f"{others} messages and no start; the first messages are "
                            '{"event": "connected"} and {"event": "start", ...}',
                            policy,
                        )
    except TimeoutError:
        raise ProtocolError(
            "start_timeout", f"no start message within {settings.start_timeout_seconds:g} s",
            policy,
        ) from None  # fmt: skip
    check_token(settings, offered, call.start.token, "the start's customParameters")
    header = header_traceparent(websocket.headers.get("traceparent"))
    if call.start.traceparent is None and header is not None:  # the session's trace parent
        call.start = call.start.model_copy(update={"traceparent": header})
    return call


class MediaStream:
    """One call's connection: media in, events and media out, until either side ends."""

    def __init__(self, websocket: WebSocket, session: Session, call: Call, settings: Settings):
        self.websocket, self.session, self.call, self.settings = websocket, session, call, settings
        fmt = session.format
        self.rate, self.encoding = fmt.sample_rate, fmt.encoding
        self.stream_sid = call.stream_sid or session.id
        self.piece = max(1, round(PIECE_SECONDS * self.rate))
        self._clips: dict[int, _Clip] = {}  # generated clips being sent, by generation id
        self._marks: set[str] = set()  # marks sent and not yet echoed
        self.media_in = self.other_tracks = self.dtmf = 0
        self.media_out = self.marks_sent = self.marks_played = 0

    async def run(self, attachment: Attachment) -> None:
        """Move data until the session ends or the connection does (websocket.py's `_run`,
        without a resume: whichever way it ends, the session is done with)."""
        settings, session = self.settings, self.session
        receiver = asyncio.create_task(self._receive_loop())
        sender = asyncio.create_task(self._send_loop(settings.slow_consumer_seconds))
        closed = asyncio.create_task(session.outbox.wait_closed())
        taken = asyncio.create_task(attachment.taken_over.wait())
        tasks = (receiver, sender, closed, taken)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if receiver.done() and not sender.done() and receiver.result() is not None:
                return  # the caller hung up
            if not taken.done():
                # The input ended (stop) or the session did: the sender gets a bounded time to
                # deliver the rest and close.
                await asyncio.wait(
                    {sender, taken},
                    timeout=settings.close_timeout_seconds,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            if taken.done():  # the server moves the session (a shutdown with a shared store)
                for task in (receiver, sender):
                    task.cancel()
                await asyncio.gather(receiver, sender, return_exceptions=True)
                if attachment.farewell is not None:
                    with contextlib.suppress(*_GONE, TimeoutError):
                        async with asyncio.timeout(2.0):
                            await self.websocket.close(attachment.farewell)
                    return
                moved = ProtocolError(
                    "session_resumed", "the session was taken over", CloseCode.POLICY_VIOLATION
                )
                await _refuse(self.websocket, moved, session.id)
                return
            if sender.done():
                sender.result()  # re-raise a send failure
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- the caller's messages --------------------------------------------------------------

    async def _receive_loop(self) -> int | None:
        """Returns the close code when the caller went away, None when the session ended."""
        session = self.session
        while session.accepting:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return int(message.get("code", CloseCode.ABNORMAL))
            try:
                await self._take(message)
            except Exception:  # a server bug must end this session, never the server
                log.exception("session %s failed", session.id)
                session.fail(
                    ProtocolError("internal_error", "the server failed", CloseCode.INTERNAL_ERROR)
                )
        return None

    async def _take(self, message: dict[str, Any]) -> None:
        session = self.session
        text = message.get("text")
        if text is None:
            self._refused(
                "invalid_message",
                "this endpoint takes JSON text messages (media streams), not binary frames",
            )
            return
        try:
            data = load_message(text, None)
        except ProtocolError as exc:
            self._refused(exc.code, exc.message)
            return
        event = data.get("event")
        if event == "media":
            await self._media(data.get("media"))
        elif event == "stop":
            await session.receive_text(_STOP)  # counted there, as every text message is
        elif event is None and "type" in data:
            await session.receive_text(text)  # our protocol's control messages
        elif not session.intake.text_allowed():
            return  # past the send rates: the session has failed
        elif event == "mark":
            mark = data.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if name in self._marks:  # (an unknown one is not ours to count)
                self._marks.discard(name)
                self.marks_played += 1
        elif event == "dtmf":
            self.dtmf += 1  # key presses are not audio; nothing uses them yet
        elif event == "start":
            self._report("invalid_message", "the stream has started already; start is sent once")
        elif event != "connected":
            self._report(
                "unknown_message_type",
                f"unknown event {event!r}; a media stream sends connected, start, media, mark, "
                "dtmf and stop",
            )

    async def _media(self, media: Any) -> None:
        """A `media` message: its payload to the session as wire bytes (the session checks the
        rates and limits, decodes and counts every sample)."""
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            self._refused("invalid_message", 'media needs "media": {"payload": base64 audio}')
            return
        if media.get("track", "inbound") != "inbound":
            self.other_tracks += 1  # the far end's audio (both_tracks): not this session's
            self.session.intake.text_allowed()
            return
        try:
            audio = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            self._refused("invalid_message", "media.payload is not valid base64; not used")
            return
        self.media_in += 1
        await self.session.receive_bytes(audio)

    def _refused(self, code: str, message: str) -> None:
        """A message that could not be used: it counts against the send rates all the same,
        and is reported (unless the rates have failed the session)."""
        if self.session.intake.text_allowed():
            self._report(code, message)

    def _report(self, code: str, message: str) -> None:
        self.session.outbox.put(error_event(self.session.id, code, message, fatal=False))

    # --- what goes back ---------------------------------------------------------------------

    async def _send_loop(self, patience: float) -> None:
        """Sends what the outbox yields (websocket.py's `_send_loop`, in the call's format)."""
        outbox = self.session.outbox
        while (item := await outbox.get()) is not None:
            try:
                async with asyncio.timeout(patience):
                    if item.audio is not None:
                        await self._send_audio(item.audio)
                        continue
                    event = item.event_to_send()
                    if event["type"] in ("generation.cancelled", "generation.failed"):
                        self._clips.pop(event.get("id", 0), None)  # no last block will come
                    if self.call.events:
                        await self.websocket.send_text(encode_event(event))
            except TimeoutError:
                self.session.slow_consumer(f"a send waited {patience:g} s for the caller to read")
                return
        await self.websocket.close(outbox.close_code)

    async def _send_audio(self, audio: AudioOut) -> None:
        """A block of a generated clip: at the call's rate, in its encoding, in 20 ms `media`
        messages; the clip's last block is followed by its mark."""
        header = audio.header
        clip = self._clips.get(header.generation)
        if clip is None:
            clip = self._clips[header.generation] = _Clip(header.sample_rate, self.rate)
        pending = clip.take(audio.samples, header.last)
        whole = len(pending) if header.last else len(pending) - len(pending) % self.piece
        for i in range(0, whole, self.piece):
            await self._send_media(pending[i : i + self.piece])
        clip.pending = pending[whole:]
        if header.last:
            del self._clips[header.generation]
            name = f"{MARK_PREFIX}{header.generation}"
            self._marks.add(name)
            self.marks_sent += 1
            mark = {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}
            await self.websocket.send_text(json.dumps(mark))

    async def _send_media(self, samples: np.ndarray) -> None:
        payload = base64.b64encode(encode(samples, self.encoding)).decode("ascii")
        media = {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}
        await self.websocket.send_text(json.dumps(media))
        self.media_out += 1


class _Clip:
    """A generated clip on its way out: its resampler to the call's rate (none when the session
    already makes it at that rate), and what is left over after the last whole 20 ms piece."""

    def __init__(self, rate: int, call_rate: int) -> None:
        self.resampler = StreamResampler(rate, call_rate)
        self.pending = np.zeros(0, np.float32)

    def take(self, samples: np.ndarray, last: bool) -> np.ndarray:
        """The block at the call's rate, after what was left over (and the resampler's tail
        at the end of the clip)."""
        parts = [self.pending, self.resampler.process(samples)]
        if last:
            parts.append(self.resampler.flush())
        return np.concatenate(parts)
