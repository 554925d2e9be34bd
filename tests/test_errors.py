"""Bad input gets a typed error and the right close code, and never disturbs another session."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from clients.stream_client import StreamClient
from stream.core.audio.pcm import Encoding, encode
from tests.conftest import RunningServer, run_server, tone
from tests.test_websocket import assert_tiles, blocks_of

START = {"type": "start", "sample_rate": 16000, "channels": 1, "encoding": "pcm_s16le"}
GOOD_FRAME = encode(tone(0.1, 16000), Encoding.PCM_S16LE)


def start(**changes: Any) -> str:
    return json.dumps({**START, **changes})


async def exchange(
    url: str, *messages: str | bytes, **connect_args: Any
) -> tuple[list[dict[str, Any]], int | None]:
    """Send `messages` in order, then read every event until the server closes. Acks (a
    heartbeat, timed by the server's clock) are left out; tests/test_resume.py checks them."""
    events: list[dict[str, Any]] = []
    async with connect(url, **connect_args) as ws:
        try:
            for message in messages:
                await ws.send(message)
            async for reply in ws:
                events.append(json.loads(reply))
        except ConnectionClosed:
            pass
        try:  # whatever the server sent before closing, even if a send above failed
            async for reply in ws:
                events.append(json.loads(reply))
        except ConnectionClosed:
            pass
    return [e for e in events if e["type"] != "ack"], ws.close_code


FATAL_FIRST_MESSAGES = [
    (b"\x00\x01", "start_required", 1008),
    ("not json", "invalid_start", 1008),
    ("[1, 2]", "invalid_start", 1008),
    (json.dumps({"type": "hello"}), "invalid_start", 1008),
    (start(sample_rate=4000), "unsupported_sample_rate", 1003),
    (start(sample_rate="44100"), "unsupported_sample_rate", 1003),
    (start(sample_rate=200000), "unsupported_sample_rate", 1003),
    (start(channels=3), "unsupported_channels", 1003),
    (start(encoding="mp3"), "unsupported_encoding", 1003),
    (start(config={"chunk_seconds": 0}), "invalid_config", 1008),
    (start(config={"bogus": 1}), "invalid_config", 1008),
    (start(config={"ctc_decoder": "viterbi"}), "invalid_config", 1008),
    (start(volume=11), "invalid_start", 1008),
    (start(session="no spaces allowed"), "invalid_start", 1008),
]


@pytest.mark.parametrize(("first", "code", "close"), FATAL_FIRST_MESSAGES)
async def test_a_bad_start_is_refused_with_its_code(
    server: RunningServer, first: str | bytes, code: str, close: int
) -> None:
    events, close_code = await exchange(server.ws, first, GOOD_FRAME)
    assert [(e["type"], e["code"], e["fatal"]) for e in events] == [("error", code, True)]
    assert events[0]["message"]
    assert close_code == close


async def test_an_oversize_frame_closes_with_1009(server: RunningServer) -> None:
    too_big = b"\x00" * (16000 * 2 + 2)  # one sample frame over 1 s of 16 kHz s16 mono
    events, close_code = await exchange(server.ws, start(), GOOD_FRAME, too_big, GOOD_FRAME)
    assert [e["type"] for e in events] == ["ready", "error"]
    assert events[1]["code"] == "frame_too_large" and close_code == 1009


RECOVERABLE = [
    (b"\x00\x01\x02", "partial_frame", Encoding.PCM_S16LE),
    (np.array([0.0, np.nan], np.float32).tobytes(), "non_finite_samples", Encoding.PCM_F32LE),
    (np.array([np.inf], np.float32).tobytes(), "non_finite_samples", Encoding.PCM_F32LE),
    (json.dumps({"type": "dance"}), "unknown_message_type", Encoding.PCM_S16LE),
    ("{oops", "invalid_message", Encoding.PCM_S16LE),
    ('"stop"', "invalid_message", Encoding.PCM_S16LE),
]


@pytest.mark.parametrize(("bad", "code", "encoding"), RECOVERABLE)
async def test_a_recoverable_error_leaves_the_session_open(
    server: RunningServer, bad: str | bytes, code: str, encoding: Encoding
) -> None:
    good = encode(tone(0.6, 16000), encoding)
    events, close_code = await exchange(
        server.ws, start(encoding=encoding.value), good, bad, good, json.dumps({"type": "stop"})
    )
    errors = [e for e in events if e["type"] == "error"]
    assert [(e["code"], e["fatal"]) for e in errors] == [(code, False)]
    end = events[-1]
    assert end["type"] == "end" and close_code == 1000
    assert end["samples_received"] == 2 * 9600  # the bad frame was rejected whole
    assert [e["end"] for e in events if e["type"] == "analysis"] == [1.0, 1.2]


async def test_bad_clients_do_not_disturb_a_live_session(server: RunningServer) -> None:
    """A well-behaved session streams in real time while every kind of bad input hits the
    same server; it must get every chunk, in order, with nothing skipped."""
    rate = 48000
    healthy = StreamClient(server.ws, rate, 2, config={"chunk_seconds": 0.25})
    live = asyncio.create_task(healthy.run(blocks_of(tone(3.0, rate, channels=2), 960)))
    for first, code, _ in FATAL_FIRST_MESSAGES:
        events, _ = await exchange(server.ws, first, GOOD_FRAME)
        assert events[0]["code"] == code
    for bad, code, encoding in RECOVERABLE:
        events, _ = await exchange(
            server.ws, start(encoding=encoding.value), bad, json.dumps({"type": "stop"})
        )
        assert events[1]["code"] == code
    await exchange(server.ws, start(), b"\x00" * 40000)
    assert not live.done(), "the bad inputs outlasted the healthy stream; lengthen it"
    result = await live
    assert not result.errors and result.close_code == 1000
    assert_tiles(result, 3.0)
    assert result.end["samples_received"] == 3 * rate


# --- servers with access control and tight limits --------------------------------------------


@pytest.fixture(scope="module")
def strict() -> Iterator[RunningServer]:
    with run_server(
        token="s3cret",
        allowed_origins="http://good.example",
        start_timeout_seconds=0.5,
        max_session_seconds=1.0,
    ) as running:
        yield running


async def test_token_is_required_and_checked(strict: RunningServer) -> None:
    events, close = await exchange(strict.ws, start(), GOOD_FRAME)
    assert (events[0]["code"], close) == ("unauthorized", 1008)
    wrong = {"Authorization": "Bearer nope"}
    events, close = await exchange(strict.ws, start(), additional_headers=wrong)
    assert (events[0]["code"], close) == ("unauthorized", 1008)
    events, close = await exchange(strict.ws, start(token="nope"))
    assert (events[0]["code"], close) == ("unauthorized", 1008)

    stop = json.dumps({"type": "stop"})
    ways = [
        {"additional_headers": {"Authorization": "Bearer s3cret"}},
        {"url": strict.ws + "?token=s3cret"},
        {"first": start(token="s3cret")},
    ]
    for way in ways:
        url = way.get("url", strict.ws)
        first = way.get("first", start())
        headers = way.get("additional_headers")
        events, close = await exchange(url, first, GOOD_FRAME, stop, additional_headers=headers)
        assert [e["type"] for e in events] == ["ready", "analysis", "end"] and close == 1000


async def test_origin_allow_list(strict: RunningServer) -> None:
    auth = {"Authorization": "Bearer s3cret"}
    events, close = await exchange(
        strict.ws, start(), origin="http://evil.example", additional_headers=auth
    )
    assert (events[0]["code"], close) == ("origin_not_allowed", 1008)
    events, _ = await exchange(
        strict.ws,
        start(),
        json.dumps({"type": "stop"}),
        origin="http://good.example",
        additional_headers=auth,
    )
    assert [e["type"] for e in events] == ["ready", "end"]


async def test_no_start_message_times_out(strict: RunningServer) -> None:
    events, close = await exchange(strict.ws, additional_headers={"Authorization": "Bearer s3cret"})
    assert (events[0]["code"], close) == ("start_timeout", 1008)


async def test_session_duration_limit_ends_the_session_cleanly(strict: RunningServer) -> None:
    frames = [encode(tone(0.4, 16000), Encoding.PCM_S16LE)] * 4  # 1.6 s against a 1 s limit
    events, close = await exchange(
        strict.ws, start(token="s3cret", config={"when_behind": "wait"}), *frames
    )
    assert close == 1008
    kinds = [e["type"] for e in events]
    assert kinds == ["ready", "error", "analysis", "end"]
    assert events[1]["code"] == "session_too_long" and events[1]["fatal"]
    assert events[-1]["samples_received"] == 12800  # the frame crossing the limit was not used


async def test_session_limit_answers_busy() -> None:
    with run_server(max_sessions=1) as busy:
        async with connect(busy.ws) as first:
            await first.send(start())
            assert json.loads(await first.recv())["type"] == "ready"
            events, close = await exchange(busy.ws, start())
            assert (events[0]["code"], close) == ("server_busy", 1013)


class StalledReader:
    """A WebSocket client on a plain socket (websockets' sans-I/O protocol) that can stop
    reading altogether, as a stuck or overwhelmed client does; its receive buffer is small."""

    def __init__(self, url: str, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(2)
        self.sock.connect(("127.0.0.1", port))
        self.protocol = ClientProtocol(parse_uri(url))
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        while self.protocol.handshake_exc is None and self.protocol.state is not State.OPEN:
            self.protocol.receive_data(self.sock.recv(65536))
        assert self.protocol.state is State.OPEN

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            self.sock.sendall(data)

    def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.protocol.send_text(message.encode())
        else:
            self.protocol.send_binary(message)
        self._flush()

    def read(self, until_closed: bool = True) -> list[dict[str, Any]]:
        """Read text messages: all of them until the server's close frame, or the next one."""
        events: list[dict[str, Any]] = []
        while self.protocol.state is State.OPEN and (until_closed or not events):
            data = self.sock.recv(65536)
            self.protocol.receive_data(data)
            events += [
                json.loads(f.data)
                for f in self.protocol.events_received()
                if isinstance(f, Frame) and f.opcode is Opcode.TEXT
            ]
            if not data:
                break
        return events

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_rcvd.code if self.protocol.close_rcvd else None


async def test_a_client_that_stops_reading_is_closed_not_buffered_forever() -> None:
    """Tiny chunks make many events while the client reads none of them. Once the network's
    buffers are full, the server must end the session with slow_consumer (its outbound queue
    is bounded) instead of queueing events without bound, and tell the client when it reads."""
    # close_timeout: the window in which the stalled client comes back to read its last events
    with run_server(send_buffer=4096, outbound_queue=8, close_timeout_seconds=30) as server:
        client = StalledReader(server.ws, server.port)
        try:
            config = {"chunk_seconds": 0.1, "when_behind": "wait"}
            client.send(start(sample_rate=8000, config=config))
            (ready,) = await asyncio.to_thread(client.read, until_closed=False)
            session = server.app.state.sessions.sessions[ready["session"]]
            audio = encode(tone(1.0, 8000), Encoding.PCM_S16LE)
            for _ in range(300):  # up to 5 minutes of audio, as fast as the server takes it
                if session.outbox.closed:
                    break
                try:
                    await asyncio.to_thread(client.send, audio)
                except TimeoutError:
                    break  # the server stopped reading: it is closing the session
            for _ in range(200):  # a loaded machine may take a while to get there
                if session.outbox.closed:
                    break
                await asyncio.sleep(0.1)
            assert session.outbox.closed, "the server kept queueing events for a stalled client"
            events = await asyncio.to_thread(client.read)
        finally:
            client.sock.close()
        assert events[-1]["code"] == "slow_consumer" and events[-1]["fatal"]
        assert client.close_code == 1008
        assert len(events) < 300 * 10  # far fewer than the chunks sent
        await asyncio.sleep(0.2)
        assert busy_sessions(server) == 0


def busy_sessions(server: RunningServer) -> int:
    return len(server.app.state.sessions.sessions)
