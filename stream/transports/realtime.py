"""OpenAI-Realtime transport: `/v1/realtime`, transcription sessions as the OpenAI Realtime API
defines them, onto the same session API as `/v1/stream` (docs/protocol.md, "OpenAI Realtime").

Thin by design: the translation is stream/protocol/realtime (no I/O); this moves messages.
The session opens with the first audio (the client may set its format until then); a connection
that ends ends its session (the API has no resume). Three tasks: reading the client, pumping
the session's events through the translator, and one writer for both, so replies and events
leave in the order they were made and a client that reads nothing is found out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from stream.core.audio.pcm import Encoding, encode
from stream.core.audio.turns import TurnSettings
from stream.protocol import CloseCode, ProtocolError, StartMessage
from stream.protocol.messages import header_traceparent
from stream.protocol.realtime import (
    Append,
    Clear,
    Commit,
    Configure,
    RealtimeConfig,
    RealtimeError,
    Request,
    Translator,
)
from stream.session import Attachment, Session, SessionManager
from stream.session.options import turn_settings
from stream.session.rates import SendRates
from stream.transports.access import check_origin, check_token, offered_token

log = logging.getLogger(__name__)
_GONE = (WebSocketDisconnect, RuntimeError, OSError)
# Browsers cannot set headers on a WebSocket: the API takes the key as a subprotocol instead.
KEY_PROTOCOL = "openai-insecure-api-key."
OUTGOING = 256  # events waiting for the writer; past it, the pump (then the reader) waits


async def realtime_endpoint(websocket: WebSocket) -> None:
    manager: SessionManager = websocket.app.state.sessions
    settings = manager.settings
    offered, subprotocol = _offered(websocket)
    await websocket.accept(subprotocol=subprotocol)
    session_id = "sess_" + secrets.token_urlsafe(12)
    turns = turn_settings(None, settings) or TurnSettings()  # the server's: on by default
    translator = Translator(session_id, RealtimeConfig(turns=turns, server_turns=turns))
    try:
        check_origin(websocket.headers.get("origin"), settings)
        check_token(settings, offered, None, "")
    except ProtocolError as error:
        await _refuse(websocket, translator, error)
        return
    connection = _Connection(websocket, manager, translator)
    try:
        await connection.run()
    finally:
        await connection.close()


def _offered(websocket: WebSocket) -> tuple[str | None, str | None]:
    """The token (an `Authorization: Bearer` header or ?token=, else the browser's
    subprotocol) and the subprotocol to answer with."""
    protocols = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",")]
    keys = [p[len(KEY_PROTOCOL) :] for p in protocols if p.startswith(KEY_PROTOCOL)]
    token = offered_token(websocket.headers, websocket.query_params)
    if token is None and keys:
        token = keys[0]
    return token, "realtime" if "realtime" in protocols else None


async def _refuse(websocket: WebSocket, translator: Translator, error: ProtocolError) -> None:
    with contextlib.suppress(*_GONE, TimeoutError):
        async with asyncio.timeout(2.0):
            await websocket.send_text(json.dumps(translator.error(error)))
            await websocket.close(error.close_code or CloseCode.POLICY_VIOLATION, error.code)


class _Connection:
    def __init__(self, websocket: WebSocket, manager: SessionManager, translator: Translator):
        self.websocket, self.manager, self.translator = websocket, manager, translator
        self.settings = manager.settings
        self.client = websocket.client.host if websocket.client else None
        self.session: Session | None = None
        self.attachment: Attachment | None = None
        self.outgoing: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(OUTGOING)
        self.close_code: int = CloseCode.NORMAL
        self._pump: asyncio.Task[None] | None = None
        self._rates = SendRates(self.settings.max_messages_per_second, None)

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        reader = asyncio.create_task(self._read())
        try:
            await self.outgoing.put(self.translator.created())
            await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not writer.done() and reader.result():
                # The session failed (its error is on the way) or refused to open.
                await asyncio.wait({writer}, timeout=self.settings.close_timeout_seconds)
        except _GONE:
            pass
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        if self.session is not None and self.attachment is not None:
            await self.manager.disconnected(self.session, self.attachment, resumable=False)

    async def _read(self) -> bool:
        """Until the client goes (False) or the session ends (True)."""
        while self.session is None or self.session.accepting:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return False
            text = message.get("text")
            requests, replies = self.translator.client_event(text) if text is not None else ([], [])
            try:  # as frames on /v1/stream: appends of ordinary sizes cost nothing here
                self._rates.message(self._seconds(requests))
            except ProtocolError as error:
                return await self._fatal(error)
            if text is None:
                error = RealtimeError("invalid_event", "messages are JSON text, not binary frames")
                await self.outgoing.put(self.translator.error(error))
                continue
            for reply in replies:
                await self.outgoing.put(reply)
            for request in requests:
                try:
                    await self._carry_out(request)
                except ProtocolError as error:  # the session could not open
                    return await self._fatal(error)
        return True

    def _seconds(self, requests: list[Request]) -> float | None:
        """The audio a message appends (None: it appends none, and counts as a text message)."""
        fmt = self.translator.config
        audio = sum(len(r.audio) for r in requests if isinstance(r, Append))
        return audio / (fmt.encoding.bytes_per_sample * fmt.sample_rate) if audio else None

    async def _fatal(self, error: ProtocolError) -> bool:
        self.close_code = error.close_code or CloseCode.POLICY_VIOLATION
        if self.session is not None and self.session.accepting:
            self.session.fail(error)  # its error event comes through the pump
        else:
            await self.outgoing.put(self.translator.error(error))
            await self.outgoing.put(None)
        return True

    async def _carry_out(self, request: Request) -> None:
        if isinstance(request, Append):
            session = self.session or await self._open()
            step = max(1, session.intake.max_frame_bytes // session.format.frame_bytes)
            step *= session.format.frame_bytes
            for offset in range(0, len(request.audio), step):
                await session.receive_bytes(request.audio[offset : offset + step])
        elif isinstance(request, Commit | Clear) and self.session is not None:
            at = self.session.commit()
            if at is None:
                return
            if isinstance(request, Commit):
                for event in self.translator.committed(at):
                    await self.outgoing.put(event)
            else:
                self.translator.cleared(at)
        elif isinstance(request, Configure) and self.session is not None:
            self.session.configure_turns(request.config.turns)

    async def _open(self) -> Session:
        config = self.translator.config
        start = StartMessage(
            type="start", sample_rate=config.sample_rate, channels=1, encoding=config.encoding,
            session=self.translator.session_id, config=config.start_config(),
            traceparent=header_traceparent(self.websocket.headers.get("traceparent")),
        )  # fmt: skip
        session = await self.manager.open(
            start, transport="realtime", client=self.client, resumable=False
        )
        self.session, self.attachment = session, session.attachment
        self._pump = asyncio.create_task(self._pump_events(session), name=f"realtime-{session.id}")
        return session

    async def _pump_events(self, session: Session) -> None:
        """The session's events, translated, to the writer; None once its outbox closed."""
        while (item := await session.outbox.get()) is not None:
            if item.audio is not None:
                header = item.audio.header
                described = {
                    "generation": header.generation, "index": header.index, "start": header.start,
                    "sample_rate": header.sample_rate, "last": header.last, "encoding": "pcm_s16le",
                }  # fmt: skip
                pcm = encode(item.audio.samples, Encoding.PCM_S16LE)
                events = self.translator.generated_audio(described, pcm)
            else:
                events = self.translator.session_event(item.event_to_send())
            for event in events:
                await self.outgoing.put(event)
        self.close_code = session.outbox.close_code
        await self.outgoing.put(None)

    async def _write(self) -> None:
        patience = self.settings.slow_consumer_seconds
        while (event := await self.outgoing.get()) is not None:
            try:
                async with asyncio.timeout(patience):
                    await self.websocket.send_text(json.dumps(event))
            except TimeoutError:
                if self.session is not None:
                    self.session.slow_consumer(f"a send waited {patience:g} s for the client")
                return
        with contextlib.suppress(*_GONE):
            await self.websocket.close(self.close_code)
