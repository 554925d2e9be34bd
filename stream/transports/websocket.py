"""WebSocket transport: `/v1/stream` frames in -> session calls; session events -> text frames,
generated audio -> binary frames.

Thin by design: it checks access, parses the start message, and then only moves data between
the socket and the session. Reading and sending run as two tasks, so a session's events go out
while its audio is still arriving, and a client that stops reading cannot stall input handling.
A connection that breaks leaves its session to the manager, which keeps it for a resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

from stream.core.audio.pcm import encode
from stream.protocol import (
    CloseCode,
    ProtocolError,
    StartMessage,
    encode_event,
    error_event,
    pack_audio,
    parse_start,
)
from stream.protocol.messages import header_traceparent
from stream.session import Attachment, Session, SessionManager
from stream.settings import Settings
from stream.transports.access import check_token, check_upgrade

log = logging.getLogger(__name__)
# What a send or receive on a socket the peer has left may raise, depending on the moment.
_GONE = (WebSocketDisconnect, RuntimeError, OSError)
# An address refused at the door for flooding hears so only after this pause: a flooder that
# reconnects the moment it is refused then costs a sleeping task, not a stream of handshakes.
DOOR_PAUSE_S = 1.0


async def stream_endpoint(websocket: WebSocket) -> None:
    manager: SessionManager = websocket.app.state.sessions
    await websocket.accept()
    try:
        start = await _handshake(websocket, manager.settings)
        client = websocket.client.host if websocket.client else None
        if start.resume:
            session, lost = await manager.resume(start, client)
        else:
            session, lost = await manager.open(start, client=client), 0
    except ProtocolError as error:
        if error.code == "rate_limited":  # at the door: the address kept flooding
            await asyncio.sleep(DOOR_PAUSE_S)
        await _refuse(websocket, error)
        return
    except _GONE:
        return
    attachment: Attachment = session.attachment
    resumable = True
    try:
        await websocket.send_text(json.dumps(session.ready_event(resumed=start.resume)))
        if lost:
            message = f"{lost} events sent before the break are no longer kept"
            await websocket.send_text(
                json.dumps(error_event(session.id, "events_lost", message, fatal=False))
            )
        resumable = await _run(websocket, session, attachment, manager.settings)
    except _GONE:
        pass
    finally:
        await manager.disconnected(session, attachment, resumable)


async def _handshake(websocket: WebSocket, settings: Settings) -> StartMessage:
    """Access checks and the start message; raises ProtocolError for anything wrong."""
    policy = CloseCode.POLICY_VIOLATION
    offered = check_upgrade(websocket.headers, websocket.query_params, settings)
    try:
        message = await asyncio.wait_for(websocket.receive(), settings.start_timeout_seconds)
    except TimeoutError:
        raise ProtocolError(
            "start_timeout",
            f"no start message within {settings.start_timeout_seconds:g} s",
            policy,
        ) from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is None:
        raise ProtocolError(
            "start_required",
            'the first message must be a text frame {"type": "start", ...}, not audio',
            policy,
        )
    start = parse_start(message["text"])
    check_token(settings, offered, start.token)
    # The upgrade's `traceparent` header: the session's trace parent, unless `start` names one.
    header = header_traceparent(websocket.headers.get("traceparent"))
    if start.traceparent is None and header is not None:
        start = start.model_copy(update={"traceparent": header})
    return start


async def _refuse(websocket: WebSocket, error: ProtocolError, session: str | None = None) -> None:
    try:
        async with asyncio.timeout(2.0):  # the peer may be gone without a word
            await websocket.send_text(json.dumps(error.to_event(session)))
            await websocket.close(error.close_code or CloseCode.POLICY_VIOLATION, error.code)
    except (*_GONE, TimeoutError):
        pass


async def _run(
    websocket: WebSocket, session: Session, attachment: Attachment, settings: Settings
) -> bool:
    """Move data until the session ends or the connection does. True when the session should
    wait for a resume: the connection broke, or the session ended well, and its last events
    (`end`) may yet be lost on the way (ASGI does not show whether the client answered the close
    frame): the manager keeps it a few seconds for a resume that sends them again. False when
    it failed, or the client closed the connection on purpose (close code 1000 or 1001)."""
    receiver = asyncio.create_task(_receive_loop(websocket, session))
    sender = asyncio.create_task(_send_loop(websocket, session, settings.slow_consumer_seconds))
    closed = asyncio.create_task(session.outbox.wait_closed())
    taken = asyncio.create_task(attachment.taken_over.wait())
    tasks = (receiver, sender, closed, taken)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # (Once the sender has closed, the disconnect the receiver saw is the server's own.)
        client_closed = receiver.result() if receiver.done() and not sender.done() else None
        if client_closed is not None:
            return client_closed not in (CloseCode.NORMAL, CloseCode.GOING_AWAY)
        if not taken.done():
            # Input ended (stop) or the session ended (a fatal error): the sender gets a
            # bounded time to deliver the rest and close. A client that reads nothing at all
            # would hold it forever; past the timeout the connection is dropped instead.
            await asyncio.wait(
                {sender, taken},
                timeout=settings.close_timeout_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        if taken.done():
            # Stop sending first: from here on the session's events belong to the new one.
            for task in (receiver, sender):
                task.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)
            if attachment.farewell is not None:  # the session moves: the client resumes it
                with contextlib.suppress(*_GONE, TimeoutError):
                    async with asyncio.timeout(2.0):
                        await websocket.close(attachment.farewell, "resume the session")
                return False
            resumed = ProtocolError(
                "session_resumed",
                "the session was resumed on another connection",
                CloseCode.POLICY_VIOLATION,
            )
            await _refuse(websocket, resumed, session.id)
            return False
        if not sender.done():
            return True
        sender.result()  # re-raise a send failure
        return session.outbox.close_code == CloseCode.NORMAL
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _receive_loop(websocket: WebSocket, session: Session) -> int | None:
    """Returns the close code when the client went away, None when the session stopped."""
    while session.accepting:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return int(message.get("code", CloseCode.ABNORMAL))
        try:
            if message.get("bytes") is not None:
                await session.receive_bytes(message["bytes"])
            elif message.get("text") is not None:
                await session.receive_text(message["text"])
        except Exception:  # a server bug must end this session, never the server
            log.exception("session %s failed", session.id)
            session.fail(
                ProtocolError("internal_error", "the server failed", CloseCode.INTERNAL_ERROR)
            )
    return None


async def _send_loop(websocket: WebSocket, session: Session, patience: float) -> None:
    """Sends what the outbox yields. A send that cannot complete within `patience` seconds
    (the client reads nothing, and every buffer on the way is full) fails the session as a
    slow consumer; a client that reads nothing at all is found by the keepalive pings."""
    outbox = session.outbox
    while (item := await outbox.get()) is not None:
        try:
            async with asyncio.timeout(patience):
                if item.audio is not None:  # a binary frame: the protocol's header, the PCM
                    header, samples = item.audio.header, item.audio.samples
                    pcm = encode(samples, header.encoding)
                    await websocket.send_bytes(pack_audio(header, pcm))
                else:
                    await websocket.send_text(encode_event(item.event_to_send()))
        except TimeoutError:
            session.slow_consumer(f"a send waited {patience:g} s for the client to read")
            return
    await websocket.close(outbox.close_code)
