"""`/v1/media-stream`: calls in Twilio's media-stream format against a real server (tiny models,
a real generator worker), with our own client written from the public message format."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from clients.media_stream_client import CallResult, MediaStreamClient
from stream.core.audio.g711 import encode_mulaw
from tests.conftest import RunningServer, run_server, tone

TOKEN = "call-token"
WAIT = json.dumps({"when_behind": "wait"})


@pytest.fixture(scope="module")
def calls() -> Iterator[RunningServer]:
    with run_server(generator="tiny", token=TOKEN) as running:
        yield running


@pytest.fixture(scope="module")
def speech(speech_wav: Path) -> np.ndarray:
    """The test speech as a phone line carries it: 8 kHz, mono."""
    audio, rate = sf.read(speech_wav, dtype="float32")
    return soxr.resample(audio, rate, 8000).astype(np.float32)


def url(server: RunningServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/v1/media-stream{query}"


def caller(
    server: RunningServer, media_format: str = "audio/x-mulaw", **params: str
) -> MediaStreamClient:
    return MediaStreamClient(url(server), {"token": TOKEN, "config": WAIT, **params}, media_format)


async def exchange(
    address: str,
    messages: list[dict[str, Any] | str | bytes],
    headers: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Send `messages` (dicts as JSON text) and read until the server closes: what came back
    and the close code. Sending stops quietly once the server has closed."""
    async with asyncio.timeout(20):
        async with connect(address, additional_headers=headers) as ws:
            try:
                for message in messages:
                    await ws.send(json.dumps(message) if isinstance(message, dict) else message)
            except ConnectionClosed:
                pass
            received = []
            with contextlib.suppress(ConnectionClosed):  # (an error code ends the iteration so)
                async for message in ws:
                    received.append(json.loads(message))
    return received, ws.close_code


def start(encoding: str = "audio/x-mulaw", sid: str | None = None, **params: Any) -> dict[str, Any]:
    sid = sid or "MZ" + uuid.uuid4().hex  # a session's id: each call its own
    return {
        "event": "start", "sequenceNumber": "1", "streamSid": sid,
        "start": {
            "streamSid": sid, "accountSid": "AC" + "0" * 32, "callSid": "CA" + "0" * 32,
            "tracks": ["inbound"], "customParameters": {"token": TOKEN, **params},
            "mediaFormat": {"encoding": encoding, "sampleRate": 8000, "channels": 1},
        },
    }  # fmt: skip


def media(payload: bytes | str, track: str = "inbound") -> dict[str, Any]:
    if isinstance(payload, bytes):
        payload = base64.b64encode(payload).decode()
    return {"event": "media", "media": {"track": track, "chunk": "1", "timestamp": "0",
                                        "payload": payload}}  # fmt: skip


STOP = {"event": "stop", "stop": {}}
CONNECTED = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
PIECE = encode_mulaw(tone(0.02, 8000)[:, 0])  # 20 ms of mu-law, 160 bytes


def errors(events: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    return [(e["code"], e["fatal"]) for e in events if e.get("type") == "error"]


# --- calls ---------------------------------------------------------------------------------


async def test_a_call_is_analysed_live_and_counted_exactly(
    calls: RunningServer, speech: np.ndarray
) -> None:
    client = MediaStreamClient(url(calls), {"token": TOKEN})  # as Twilio: paced, token inside
    result = await client.run(speech, realtime=True)
    assert result.close_code == 1000 and not result.errors, result.errors
    assert not result.media and not result.other  # nothing but our events came back
    ready = result.ready
    assert ready is not None and ready["session"] == client.stream_sid
    assert (ready["sample_rate"], ready["channels"], ready["encoding"]) == (8000, 1, "pcm_mulaw")
    assert result.end["samples_received"] == result.samples_sent == len(speech)
    assert result.analysis and result.analysis[-1]["end"] == pytest.approx(len(speech) / 8000)
    assert any(e["vad"]["speech"] for e in result.analysis)
    assert all("transcript" in e for e in result.analysis) and result.transcript.strip()
    assert all("event" not in e for e in result.events)  # ours: told apart by `type`


async def test_a_generation_comes_back_as_media_then_its_mark(calls: RunningServer) -> None:
    # Asked for 16 kHz float: a call gets its own format whatever was asked.
    generation = {"triggers": ["interval"], "interval_seconds": 1.0, "seconds": 1.0,
                  "steps": 2, "seed": 4, "sample_rate": 16000, "encoding": "pcm_f32le"}  # fmt: skip
    config = json.dumps({"when_behind": "wait", "generation": generation})
    result = await caller(calls, config=config).run(tone(1.5, 8000)[:, 0], realtime=False)
    assert result.close_code == 1000 and not result.errors, result.errors
    kinds = [e["type"] for e in result.events if e["type"].startswith("generation.")]
    assert kinds[0] == "generation.queued" and kinds[-1] == "generation.done"
    started = result.of_type("generation.started")[0]
    assert (started["sample_rate"], started["encoding"]) == (8000, "pcm_mulaw")
    done = result.of_type("generation.done")[0]
    assert done["sample_rate"] == 8000 and abs(done["samples"] - 8000) <= 2
    assert_clip(result, done["samples"])
    assert np.abs(result.audio()).max() > 0
    assert result.end["samples_received"] == 12000


def assert_clip(result: CallResult, samples: int) -> None:
    """One clip of `samples` at 8 kHz: 20 ms media messages (the last one shorter if need be),
    then the clip's mark."""
    pieces = -(-samples // 160)
    assert [len(m) for m in result.media[:-1]] == [160] * (pieces - 1)
    assert len(result.audio()) == samples
    assert result.marks == [("generation-1", pieces)]


async def test_a_pipelines_clip_is_resampled_and_control_messages_work(
    calls: RunningServer,
) -> None:
    """A pipeline whose clips are made at 16 kHz: the call resamples them to 8 kHz. Messages
    with our protocol's `type` (here `generate`) reach the session as on /v1/stream."""
    pipeline = {"analyse": ["dsp"], "generate": {"seconds": 1.0, "steps": 2, "seed": 2}}
    client = caller(calls, config=json.dumps({"when_behind": "wait", "pipeline": pipeline}))

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "analysis" and event["seq"] == 0:
            asyncio.ensure_future(client.send_control({"type": "generate", "prompt": "bells"}))

    client.on_event = on_event
    result = await client.run(tone(2.0, 8000)[:, 0], realtime=True)
    assert result.close_code == 1000 and not result.errors, result.errors
    done = result.of_type("generation.done")
    assert done and (done[0]["samples"], done[0]["sample_rate"]) == (16000, 16000)
    assert result.of_type("generation.started")[0]["trigger"]["reason"] == "manual"
    assert abs(len(result.audio()) - 8000) <= 2
    assert_clip(result, len(result.audio()))


async def test_events_none_sends_only_media_and_marks(calls: RunningServer) -> None:
    generation = {"triggers": ["interval"], "interval_seconds": 1.0, "seconds": 0.5, "steps": 1}
    config = json.dumps({"when_behind": "wait", "generation": generation})
    result = await caller(calls, config=config, events="none").run(
        tone(1.2, 8000)[:, 0], realtime=False
    )
    assert result.close_code == 1000 and not result.events and not result.other
    assert abs(len(result.audio()) - 4000) <= 2
    assert_clip(result, len(result.audio()))


async def test_a_broken_call_ends_its_session(calls: RunningServer) -> None:
    sid = "MZbroken"
    async with connect(url(calls)) as ws:
        await ws.send(json.dumps(start(sid=sid, config=WAIT)))
        assert json.loads(await ws.recv())["type"] == "ready"
        for _ in range(10):
            await ws.send(json.dumps(media(PIECE)))
    manager = calls.app.state.sessions
    for _ in range(100):  # finalised at once: nothing waits for a resume
        if sid not in manager.sessions:
            break
        await asyncio.sleep(0.05)
    assert sid not in manager.sessions and manager.state()["sessions_detached"] == 0
    resume = {"type": "start", "sample_rate": 8000, "channels": 1, "encoding": "pcm_mulaw",
              "session": sid, "resume": True, "token": TOKEN}  # fmt: skip
    events, code = await exchange(f"ws://127.0.0.1:{calls.port}/v1/stream", [resume])
    assert code == 1008 and errors(events) == [("session_not_found", True)]


# --- access --------------------------------------------------------------------------------


async def test_tokens(calls: RunningServer) -> None:
    header = {"Authorization": f"Bearer {TOKEN}"}

    def bare() -> dict[str, Any]:
        message = start()
        del message["start"]["customParameters"]["token"]
        return message

    for address, headers, messages in [
        (url(calls), header, [bare(), media(PIECE), STOP]),
        (url(calls, f"?token={TOKEN}"), None, [bare(), media(PIECE), STOP]),
        (url(calls), None, [start(), media(PIECE), STOP]),
    ]:
        events, code = await exchange(address, messages, headers)
        assert code == 1000 and events[-1]["type"] == "end", events
        assert events[-1]["samples_received"] == 160
    wrong = {"Authorization": "Bearer nope"}
    for address, headers, messages in [
        (url(calls), wrong, [CONNECTED]),  # refused before any message
        (url(calls, "?token=nope"), None, [CONNECTED]),
        (url(calls), None, [CONNECTED, bare()]),
        (url(calls), None, [start(token="nope")]),
    ]:
        events, code = await exchange(address, messages, headers)
        assert code == 1008 and errors(events) == [("unauthorized", True)], events


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "code", "close"),
    [
        (["not json"], "invalid_message", 1008),
        (["[1, 2]"], "invalid_message", 1008),
        ([CONNECTED, media(PIECE)], "start_required", 1008),
        ([b"\x00" * 160], "start_required", 1008),
        ([{"event": "dtmf"}] * 9, "start_required", 1008),
        ([start(encoding="audio/l16")], "unsupported_encoding", 1003),
        ([{**start(), "start": {"mediaFormat": {"channels": 2}}}], "unsupported_channels", 1003),
        ([{"event": "start", "start": "now"}], "invalid_start", 1008),
        ([start(config="{not json")], "invalid_config", 1008),
        ([start(config='{"chunk_seconds": "1"}')], "invalid_config", 1008),
        ([start(config='{"pipeline": "nonesuch"}')], "invalid_config", 1008),
        ([start(events="some")], "invalid_start", 1008),
        (
            [{"type": "start", "sample_rate": 8000, "channels": 1, "encoding": "pcm_mulaw"}],
            "invalid_start",
            1008,
        ),  # fmt: skip
    ],
)
async def test_bad_starts_are_refused(
    calls: RunningServer, messages: list[Any], code: str, close: int
) -> None:
    events, closed = await exchange(url(calls), messages)
    assert closed == close and errors(events) == [(code, True)], events


async def test_stop_before_start_closes_quietly(calls: RunningServer) -> None:
    assert await exchange(url(calls), [CONNECTED, STOP]) == ([], 1000)


async def test_bad_messages_during_a_call_are_reported_and_the_call_goes_on(
    calls: RunningServer,
) -> None:
    good = media(PIECE)
    messages: list[Any] = [
        CONNECTED, start(config=WAIT), good,
        "not json", b"\x01\x02", {"event": "dance"}, media("***not base64***"),
        {"event": "media", "media": {}}, start(), good,
        {"event": "dtmf", "dtmf": {"digit": "1"}}, {"event": "mark", "mark": {"name": "x"}},
        media(PIECE, track="outbound"), {"type": "dance"}, good, STOP,
    ]  # fmt: skip
    events, code = await exchange(url(calls), messages)
    assert code == 1000 and events[-1]["type"] == "end"
    assert events[-1]["samples_received"] == 3 * 160  # only the good media
    assert errors(events) == [
        ("invalid_message", False),  # not JSON
        ("invalid_message", False),  # binary
        ("unknown_message_type", False),  # an event we do not know
        ("invalid_message", False),  # bad base64
        ("invalid_message", False),  # no payload
        ("invalid_message", False),  # a second start
        ("unknown_message_type", False),  # our protocol's `type`, but no such message
    ]


async def test_limits_apply_as_on_the_stream_endpoint(calls: RunningServer) -> None:
    big = encode_mulaw(tone(1.5, 8000)[:, 0])  # more than a frame may hold (1 s)
    events, code = await exchange(url(calls), [start(config=WAIT), media(big)])
    assert code == 1009 and errors(events) == [("frame_too_large", True)]
    flood = [start(config=WAIT)] + [{"event": "dtmf", "dtmf": {"digit": "5"}}] * 600
    events, code = await exchange(url(calls), flood)
    assert code == 1008 and errors(events) == [("rate_limited", True)]


async def test_a_call_in_a_law(calls: RunningServer) -> None:
    result = await caller(calls, "audio/x-alaw").run(tone(1.0, 8000)[:, 0], realtime=False)
    assert result.ready["encoding"] == "pcm_alaw" and result.end["samples_received"] == 8000
    pitches = [e["features"]["pitch_hz"] for e in result.analysis]
    assert pitches and all(p == pytest.approx(440, rel=0.01) for p in pitches)
