"""The holes that probing the server as an attacker and as a careless client found (issue 17),
each shut and checked through a real server: sessions whose connections vanish, floods of tiny
frames, floats near the float maximum, deeply nested JSON, loose start messages, clients that
never read, and connections that never finish a request."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from stream.core.audio.pcm import Encoding, encode
from tests.conftest import run_server, tone
from tests.test_errors import StalledReader, exchange, start

FRAME = encode(tone(0.1, 16000), Encoding.PCM_S16LE)  # 100 ms


async def opened(url: str, message: str, **connect_args: Any) -> tuple[ClientConnection, dict]:
    ws = await connect(url, **connect_args)
    await ws.send(message)
    return ws, json.loads(await ws.recv())


def vanish(ws: ClientConnection) -> None:
    """The connection dies without a word (no close frame, no FIN): a resumable break."""
    ws.transport.abort()


async def wait_for(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.05)


# --- 1. Broken connections must not hold the live session slots -------------------------------


async def test_vanished_connections_do_not_lock_out_new_sessions() -> None:
    """Four connections that open a session, send a frame and vanish, on a server with four
    slots and a minute of resume grace: a fifth client is admitted at once, and each vanished
    session still waits in the detached pool for its resume."""
    with run_server(max_sessions=4, resume_grace_seconds=60) as server:
        manager = server.app.state.sessions
        ids = []
        for _ in range(4):
            ws, ready = await opened(server.ws, start())
            await ws.send(FRAME)
            vanish(ws)
            ids.append(ready["session"])
        await wait_for(lambda: manager.state()["sessions_detached"] == 4)
        async with connect(server.ws) as fresh:
            await fresh.send(start())
            assert json.loads(await fresh.recv())["type"] == "ready"
            # One live slot is taken now; a resume takes one too.
            ws, ready = await opened(server.ws, start(session=ids[0], resume=True))
            assert ready["type"] == "ready" and ready["resumed"]
            await ws.close()


async def test_the_detached_pool_evicts_the_oldest_and_each_address_has_a_share() -> None:
    with run_server(max_detached_per_client=2, resume_grace_seconds=60) as server:
        manager = server.app.state.sessions
        ids = []
        for _ in range(3):
            ws, ready = await opened(server.ws, start())
            await ws.send(FRAME)
            vanish(ws)
            ids.append(ready["session"])
            await wait_for(lambda: manager.sessions[ids[-1]].attachment is None)
        await wait_for(lambda: ids[0] not in manager.sessions)  # finalised to make room
        assert manager.state()["sessions_detached"] == 2
        events, close = await exchange(server.ws, start(session=ids[0], resume=True))
        assert (events[0]["code"], close) == ("session_not_found", 1008)
        for session in ids[1:]:  # the two newest still wait for their resume
            ws, ready = await opened(server.ws, start(session=session, resume=True))
            assert ready["resumed"]
            await ws.close()


async def test_one_address_may_hold_at_most_its_share_of_live_sessions() -> None:
    with run_server(max_sessions_per_client=2) as server:
        async with connect(server.ws) as a, connect(server.ws) as b:
            for ws in (a, b):
                await ws.send(start())
                assert json.loads(await ws.recv())["type"] == "ready"
            events, close = await exchange(server.ws, start())
            assert (events[0]["code"], close) == ("too_many_sessions", 1013)


# --- 2. A flood of tiny frames is refused, and other sessions do not notice -------------------


async def test_a_flood_of_one_sample_frames_is_refused_and_others_keep_up() -> None:
    with run_server(max_messages_per_second=200) as server:
        async with connect(server.ws) as calm:
            await calm.send(start(config={"when_behind": "skip"}))
            assert json.loads(await calm.recv())["type"] == "ready"
            flood = asyncio.create_task(flooder(server.ws))
            for _ in range(30):  # 3 s of real-time audio while the flood runs
                await calm.send(FRAME)
                await asyncio.sleep(0.1)
            events, close = await flood
            await calm.send(json.dumps({"type": "stop"}))
            calm_events = [json.loads(m) async for m in calm]
        assert events[-1]["code"] == "rate_limited" and events[-1]["fatal"]
        assert close == 1008
        end = calm_events[-1]
        assert end["type"] == "end" and end["skipped"] == 0 and end["chunks"] == 3


async def flooder(url: str) -> tuple[list[dict], int | None]:
    """1-sample frames as fast as they go, until the server closes."""
    events = []
    async with connect(url) as ws:
        await ws.send(start())
        events.append(json.loads(await ws.recv()))
        one_sample = b"\x01\x00"
        try:
            while True:
                await ws.send(one_sample)
                await asyncio.sleep(0)
        except ConnectionClosed:
            pass
        try:
            async for message in ws:
                events.append(json.loads(message))
        except ConnectionClosed:
            pass
        return [e for e in events if e["type"] != "ack"], ws.close_code


async def test_text_messages_count_against_the_rate_too() -> None:
    with run_server(max_messages_per_second=20) as server:
        junk = [json.dumps({"type": "nonsense"})] * 100
        events, close = await exchange(server.ws, start(), *junk)
        assert events[-1]["code"] == "rate_limited" and close == 1008
        assert sum(e.get("code") == "unknown_message_type" for e in events) <= 21  # 1 s burst


async def test_an_address_that_keeps_flooding_is_refused_at_the_door() -> None:
    """Each flooding session costs its set-up and a burst: after three ended for flooding, the
    address opens no session for a while (rate_limited, 1013, before any session exists)."""
    with run_server(max_messages_per_second=20) as server:
        junk = [json.dumps({"type": "nonsense"})] * 60
        for _ in range(3):
            events, close = await exchange(server.ws, start(), *junk)
            assert (events[-1]["code"], close) == ("rate_limited", 1008)
        events, close = await exchange(server.ws, start())
        assert (events[0]["code"], events[0]["session"], close) == ("rate_limited", None, 1013)


# --- 4. Finite floats near the float maximum --------------------------------------------------


async def test_floats_near_the_float_maximum_are_clipped_and_the_session_goes_on() -> None:
    start_f32 = start(encoding="pcm_f32le")
    huge = np.full(16000, 3.3e38, np.float32)
    huge[::2] = -3.3e38
    with run_server() as server:
        events, close = await exchange(
            server.ws, start_f32, huge.tobytes(), tone(1.0, 16000).astype("<f4").tobytes(),
            json.dumps({"type": "stop"}),
        )  # fmt: skip
    assert close == 1000
    analysis = [e for e in events if e["type"] == "analysis"]
    assert [e["type"] for e in events][-1] == "end" and len(analysis) == 2
    assert analysis[0]["features"]["peak_dbfs"] == pytest.approx(0.0, abs=0.01)  # full scale


# --- 5. Deeply nested JSON, and invalid UTF-8 ---------------------------------------------------


async def test_deeply_nested_json_is_a_typed_error_before_and_during_a_session() -> None:
    nested = "[" * 5000 + "]" * 5000
    with run_server() as server:
        events, close = await exchange(server.ws, nested)
        assert (events[0]["code"], close) == ("invalid_start", 1008)
        assert "nests" in events[0]["message"]
        stop = json.dumps({"type": "stop"})
        events, close = await exchange(server.ws, start(), FRAME, nested, FRAME, stop)
    assert close == 1000
    errors = [e for e in events if e["type"] == "error"]
    assert [(e["code"], e["fatal"]) for e in errors] == [("invalid_message", False)]
    assert events[-1]["type"] == "end" and events[-1]["samples_received"] == 3200


async def test_invalid_utf8_closes_with_1007_without_an_error_log() -> None:
    """(Probing found tracebacks at ERROR for this on another stack; with uvicorn's sans-I/O
    `websockets` protocol the library refuses the frame itself. This keeps it that way.)"""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.addHandler(handler)
    try:
        with run_server() as server:
            client = StalledReader(server.ws, server.port)
            try:
                client.send(start())
                client.read(until_closed=False)
                client.protocol.send_frame(_text_frame(b"\xff\xfe not utf-8"))
                client._flush()
                client.read()
            finally:
                client.sock.close()
            assert client.close_code == 1007
    finally:
        uvicorn_errors.removeHandler(handler)
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info]


def _text_frame(payload: bytes) -> Any:
    from websockets.frames import Frame, Opcode

    return Frame(Opcode.TEXT, payload)


# --- 6. Strict start messages, slow readers, idle connections --------------------------------


@pytest.mark.parametrize(
    ("message", "code", "close"),
    [
        (start(channels=2.0), "unsupported_channels", 1003),
        (start(config={"chunk_seconds": "1"}), "invalid_config", 1008),
        (start(session="abc\n"), "invalid_start", 1008),
        (start(last_event=1.5), "invalid_start", 1008),
        (start(config={"generation": {"steps": 10.0}}), "invalid_config", 1008),
        (start(config={"when_behind": ["skip"]}), "invalid_config", 1008),
    ],
)
async def test_loose_start_messages_are_refused(message: str, code: str, close: int) -> None:
    with run_server() as server:
        events, closed = await exchange(server.ws, message)
    assert (events[0]["code"], closed) == (code, close)


async def test_a_client_that_reads_nothing_is_failed_as_slow_after_the_patience() -> None:
    """The outbound queue is far from full, but no send has gone through for the patience
    setting: the session fails with slow_consumer (seen in the server's recent errors)."""
    with run_server(send_buffer=4096, slow_consumer_seconds=1.0, close_timeout_seconds=1) as server:
        client = StalledReader(server.ws, server.port)
        try:
            client.send(start(config={"chunk_seconds": 0.1, "timing": True, "embeddings": True}))
            (ready,) = client.read(until_closed=False)
            session = server.app.state.sessions.sessions[ready["session"]]
            for _ in range(100):
                if session.outbox.closed:
                    break
                try:
                    await asyncio.to_thread(client.send, FRAME)
                except TimeoutError:
                    break
                await asyncio.sleep(0.05)
            await wait_for(lambda: session.outbox.closed)
        finally:
            client.sock.close()
        errors = list(server.app.state.metrics.recent_errors)
        assert any("a send waited 1 s" in e.get("message", "") for e in errors), errors


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"])
async def test_connections_that_never_finish_a_request_are_closed(sent: bytes) -> None:
    with run_server(header_timeout_seconds=0.5) as server:
        socks = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(sent)
            sock.settimeout(5)
            socks.append(sock)
        began = time.monotonic()
        for sock in socks:
            assert sock.recv(1024) == b""  # closed by the server, not timed out here
            sock.close()
        assert time.monotonic() - began < 5
        # A whole request on a fresh connection is served as ever.
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        sock.close()


# --- Found by `grym-stream chaos`: the end of a session lost on a connection that broke -----


async def test_an_end_lost_on_a_broken_connection_comes_again_on_resume() -> None:
    """The server wrote `end` and its close frame, but the network broke before they arrived:
    a resume within `close_timeout_seconds` gets every event after `last_event` again, `end`
    last, instead of `session_not_found`."""
    drop = asyncio.Event()
    live: list[asyncio.StreamWriter] = []

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lossy: bool):
        while data := await reader.read(65536):
            if not (lossy and drop.is_set()):  # in flight on a network about to break
                writer.write(data)
                await writer.drain()

    with run_server(close_timeout_seconds=10) as server:

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server.port)
            live.extend([writer, up_writer])
            await asyncio.gather(
                pump(reader, up_writer, False), pump(up_reader, writer, True),
                return_exceptions=True,
            )  # fmt: skip
            for w in (writer, up_writer):
                w.close()

        proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"ws://127.0.0.1:{proxy.sockets[0].getsockname()[1]}/v1/stream"
        ws, ready = await opened(url, start(config={"when_behind": "wait"}))
        for _ in range(20):
            await ws.send(FRAME)
        drop.set()
        await ws.send(json.dumps({"type": "stop"}))
        manager = server.app.state.sessions
        await wait_for(lambda: manager.state()["sessions_detached"] == 1)  # it has ended
        for writer in live:
            writer.transport.abort()
        drop.clear()
        events, close = await exchange(
            url, start(session=ready["session"], resume=True, last_event=0)
        )
        for writer in live:  # the resumed connection's, left to the proxy's tasks
            writer.transport.abort()
        proxy.close()
        await proxy.wait_closed()
        await ws.close()
        await asyncio.sleep(0.05)  # the proxy's tasks see their connections go
    assert events[0]["type"] == "ready" and events[0]["resumed"]
    assert [e["type"] for e in events[1:]] == ["analysis", "analysis", "end"]
    assert events[-1]["samples_received"] == 32000 and close == 1000
