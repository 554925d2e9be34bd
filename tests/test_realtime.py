"""`/v1/realtime`: OpenAI-Realtime transcription sessions, driven by the official `openai` SDK
(unmodified, from PyPI: a test dependency) and by plain `websockets` for the older form and
every error path. Speech is sentences of text the shipped model never saw, spoken by espeak-ng
at test time; the realtime transcripts must equal what our own protocol says for the same audio.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import soxr
import websockets
from openai import AsyncOpenAI

from clients.stream_client import StreamClient
from models.training.synth import Voice, synthesize
from stream.core.audio.g711 import encode_mulaw
from stream.core.audio.pcm import Encoding, encode
from tests.conftest import RunningServer, run_server
from tests.test_trained_model import SENTENCES
from tests.test_websocket import blocks_of

TOKEN = "realtime-test-token"
VOICE = Voice(base="en-us", variant="", speed=160, pitch=50)
VAD = {"threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


@pytest.fixture(scope="module")
def realtime_server() -> Iterator[RunningServer]:
    with run_server(analysis_model="tiny", token=TOKEN) as running:
        yield running


@pytest.fixture(scope="module")
def two_sentences() -> np.ndarray:
    """Two sentences of unseen text at 16 kHz, each followed by 1.5 s of silence."""
    parts = []
    for sentence in SENTENCES[:2]:
        parts += [synthesize(sentence, VOICE), np.zeros(24000, np.float32)]
    return np.concatenate(parts).astype(np.float32)


def at(audio: np.ndarray, rate: int) -> np.ndarray:
    return soxr.resample(audio, 16000, rate).astype(np.float32)


async def our_finals(server: RunningServer, audio: np.ndarray, rate: int, **config: Any) -> list:
    """The transcript finals our own protocol gives for `audio` (16 kHz) sent at `rate`."""
    config = {"when_behind": "wait", **config}  # sent faster than real time: nothing skipped
    client = StreamClient(server.ws, rate, 1, Encoding.PCM_S16LE, config, token=TOKEN)
    result = await client.run(blocks_of(at(audio, rate)[:, None], rate // 10), realtime=False)
    finals = [e["transcript"]["final"] for e in result.analysis if e["transcript"]["final"]]
    end = result.end["transcript"]["final"]
    return [f["text"] for f in finals] + ([end["text"]] if end else [])


def sdk(server: RunningServer, key: str = TOKEN) -> AsyncOpenAI:
    return AsyncOpenAI(
        api_key=key,
        base_url=f"{server.http}/v1",
        websocket_base_url=f"ws://127.0.0.1:{server.port}/v1",
    )


async def test_the_openai_sdk_transcribes_with_server_vad(
    realtime_server: RunningServer, two_sentences: np.ndarray
) -> None:
    pcm = encode(at(two_sentences, 24000), Encoding.PCM_S16LE)
    events: list[Any] = []
    async with sdk(realtime_server).realtime.connect(
        extra_query={"intent": "transcription"}
    ) as conn:
        created = await conn.recv()
        assert created.type == "session.created" and created.session.type == "transcription"
        await conn.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "transcription": {"model": "gpt-4o-transcribe"},
                        "turn_detection": {"type": "server_vad", **VAD},
                    }
                },
                "grym": {"config": {"ctc_decoder": "greedy"}},  # ours: exact deltas
            }
        )
        for i in range(0, len(pcm), 9600):  # 200 ms per append
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 9600]).decode())
        async with asyncio.timeout(60):
            async for event in conn:
                events.append(event)
                if sum(e.type == COMPLETED for e in events) == 2:
                    break
    kinds = [e.type for e in events]
    assert kinds[0] == "session.updated"
    assert not [k for k in kinds if k.startswith("grym.")]  # ours only on request
    updated = events[0].session.audio.input
    assert updated.turn_detection.silence_duration_ms == 500 and updated.format.rate == 24000
    started = [e for e in events if e.type == "input_audio_buffer.speech_started"]
    stopped = [e for e in events if e.type == "input_audio_buffer.speech_stopped"]
    committed = [e for e in events if e.type == "input_audio_buffer.committed"]
    completed = [e for e in events if e.type == COMPLETED]
    items = [e.item_id for e in started]
    assert len(items) == 2 and len(set(items)) == 2
    assert [e.item_id for e in stopped] == [e.item_id for e in committed] == items
    assert [e.item_id for e in completed] == items
    assert committed[1].previous_item_id == items[0]
    assert started[0].audio_start_ms < stopped[0].audio_end_ms < started[1].audio_start_ms
    # Each item's deltas add up to its transcript; the texts are our own protocol's finals.
    for item, done in zip(items, completed):
        deltas = [e.delta for e in events if e.type == DELTA and e.item_id == item]
        assert len(deltas) >= 2 and "".join(deltas) == done.transcript
    ours = await our_finals(
        realtime_server, two_sentences, 24000, ctc_decoder="greedy",
        turn_detection={"min_silence_ms": 500, "prefix_padding_ms": 300, "threshold": 0.5},
    )  # fmt: skip
    assert [e.transcript for e in completed] == ours, ours
    assert all(text for text in ours)


async def test_our_own_events_come_on_request(
    realtime_server: RunningServer, two_sentences: np.ndarray
) -> None:
    first = np.concatenate([synthesize(SENTENCES[0], VOICE), np.zeros(16000, np.float32)])
    pcm = encode(at(first, 24000), Encoding.PCM_S16LE)
    async with sdk(realtime_server).realtime.connect() as conn:
        await conn.session.update(
            session={
                "type": "transcription",
                "grym": {"events": True, "config": {"pipeline": "analyse-only"}},
            }  # fmt: skip
        )
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm).decode())
        ours: list[dict] = []
        async with asyncio.timeout(30):
            async for event in conn:
                if event.type == "grym.event":
                    ours.append(event.event)
                if event.type == COMPLETED:
                    break
    analysis = [e for e in ours if e["type"] == "analysis"]
    assert analysis and all({"features", "vad", "transcript"} <= set(e) for e in analysis)
    assert [t["speech"] for e in analysis for t in e.get("turns", [])] == ["started", "stopped"]


async def test_the_older_form_with_mu_law_and_client_commits(
    realtime_server: RunningServer, two_sentences: np.ndarray
) -> None:
    """`transcription_session.update`, G.711 mu-law at 8 kHz, turn_detection null: the client
    commits, and the item holds everything said before the commit."""
    sentence = two_sentences[: np.flatnonzero(np.abs(two_sentences) > 0.01)[-1] + 8000]
    mulaw = encode_mulaw(at(sentence, 8000))
    url = f"ws://127.0.0.1:{realtime_server.port}/v1/realtime?intent=transcription"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({
            "type": "transcription_session.update",
            "session": {"input_audio_format": "g711_ulaw", "turn_detection": None,
                        "input_audio_transcription": {"model": "whisper-1"}},
        }))  # fmt: skip
        updated = json.loads(await ws.recv())
        assert updated["type"] == "transcription_session.updated"
        assert updated["session"]["input_audio_format"] == "g711_ulaw"
        assert updated["session"]["turn_detection"] is None
        for i in range(0, len(mulaw), 1600):
            chunk = base64.b64encode(mulaw[i : i + 1600]).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events = []
        async with asyncio.timeout(30):
            while not events or events[-1]["type"] != COMPLETED:
                events.append(json.loads(await ws.recv()))
    kinds = [e["type"] for e in events]
    assert "input_audio_buffer.speech_started" not in kinds  # no VAD: the client commits
    assert kinds.index("input_audio_buffer.committed") < kinds.index("conversation.item.created")
    transcript = events[-1]["transcript"]
    reference = SENTENCES[0]
    heard = transcript.split()
    recall = sum(word in heard for word in reference.split()) / len(reference.split())
    assert recall >= 0.6, (transcript, reference)
    words = events[-1]["words"]
    assert [w["word"] for w in words] == heard
    assert all(a["end"] <= b["start"] for a, b in zip(words, words[1:]))


async def test_the_sdk_with_a_wrong_key_is_refused(realtime_server: RunningServer) -> None:
    async with sdk(realtime_server, key="wrong").realtime.connect() as conn:
        event = await conn.recv()
        assert event.type == "error" and event.error.code == "unauthorized"


# --- error paths, with plain websockets ---------------------------------------------------------


async def exchange(server: RunningServer, *messages: Any, replies: int = 1) -> list[dict]:
    """Open a connection, send each message (a dict as JSON, bytes as a binary frame), and
    return the first `replies` events after session.created."""
    url = f"ws://127.0.0.1:{server.port}/v1/realtime"
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {TOKEN}"}
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        for message in messages:
            await ws.send(message if isinstance(message, bytes | str) else json.dumps(message))
        return [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(replies)]


def error_of(event: dict) -> tuple[str, str]:
    assert event["type"] == "error", event
    assert set(event["error"]) >= {"type", "code", "message", "param", "event_id"}
    return event["error"]["type"], event["error"]["code"]


PCM_100MS = base64.b64encode(bytes(4800)).decode()


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ("not json", "invalid_json", None),
        ({"type": "response.create"}, "unknown_event", "type"),
        ({"session": {}}, "invalid_event", "type"),
        ({"type": "session.update", "session": {"type": "realtime"}}, "invalid_value",
         "session.type"),
        ({"type": "session.update", "session": {"type": "transcription", "voice": "x"}},
         "unknown_parameter", "session.voice"),
        ({"type": "session.update", "session": {"audio": {"input": {"format": {
            "type": "audio/opus"}}}}}, "invalid_value", "session.audio.input.format.type"),
        ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
            "type": "semantic_vad"}}}}}, "invalid_value",
         "session.audio.input.turn_detection.type"),
        ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
            "threshold": 2.0}}}}}, "invalid_value",
         "session.audio.input.turn_detection.threshold"),
        ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
            "silence_duration_ms": "long"}}}}}, "invalid_type",
         "session.audio.input.turn_detection.silence_duration_ms"),
        ({"type": "transcription_session.update", "session": {"input_audio_format": "mp3"}},
         "invalid_value", "session.input_audio_format"),
        ({"type": "session.update", "session": {"grym": {"config": {"chunk_seconds": -1}}}},
         "invalid_value", "session.grym.config"),
        ({"type": "input_audio_buffer.append", "audio": "%%%"}, "invalid_value", "audio"),
        ({"type": "input_audio_buffer.append", "audio": 12}, "invalid_type", "audio"),
        ({"type": "input_audio_buffer.commit", "event_id": "mine"},
         "input_audio_buffer_commit_empty", None),
        (b"\x00\x01", "invalid_event", None),
    ],
)  # fmt: skip
async def test_bad_input_gets_the_apis_error_and_the_session_goes_on(
    realtime_server: RunningServer, message: Any, code: str, param: str | None
) -> None:
    # After the error, the connection still answers: a valid update comes back updated.
    update = {"type": "session.update", "session": {"type": "transcription"}}
    error, after = await exchange(realtime_server, message, update, replies=2)
    assert error_of(error) == ("invalid_request_error", code)
    assert error["error"]["param"] == param
    if isinstance(message, dict) and "event_id" in message:
        assert error["error"]["event_id"] == message["event_id"]
    assert after["type"] == "session.updated"


async def test_the_format_is_fixed_once_audio_arrived(realtime_server: RunningServer) -> None:
    append = {"type": "input_audio_buffer.append", "audio": PCM_100MS}
    change = {"type": "session.update", "session": {"audio": {"input": {"format": {
        "type": "audio/pcmu"}}}}}  # fmt: skip
    vad = {"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}
    error, updated = await exchange(realtime_server, append, change, vad, replies=2)
    assert error_of(error) == ("invalid_request_error", "invalid_value")
    assert updated["session"]["audio"]["input"]["turn_detection"] is None  # this may change


async def test_a_partial_sample_is_our_error_in_the_apis_shape(
    realtime_server: RunningServer,
) -> None:
    odd = {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(4801)).decode()}
    (error,) = await exchange(realtime_server, odd)
    assert error_of(error) == ("invalid_request_error", "partial_frame")


async def test_clear_answers_cleared(realtime_server: RunningServer) -> None:
    append = {"type": "input_audio_buffer.append", "audio": PCM_100MS}
    clear = {"type": "input_audio_buffer.clear"}
    commit = {"type": "input_audio_buffer.commit"}
    cleared, empty = await exchange(realtime_server, append, clear, commit, replies=2)
    assert cleared["type"] == "input_audio_buffer.cleared"
    assert error_of(empty)[1] == "input_audio_buffer_commit_empty"


async def test_refusals_close_the_connection(realtime_server: RunningServer) -> None:
    url = f"ws://127.0.0.1:{realtime_server.port}/v1/realtime"
    async with websockets.connect(url) as ws:  # no key
        assert error_of(json.loads(await ws.recv()))[1] == "unauthorized"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 1008
    with run_server(max_messages_per_second=20.0) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"
        async with websockets.connect(url) as ws:
            await ws.recv()  # session.created
            append = {"type": "input_audio_buffer.append", "audio": PCM_100MS}
            for _ in range(100):  # audio in ordinary pieces is not a flood, however fast
                await ws.send(json.dumps(append))
            for _ in range(200):
                await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            replies = []
            with pytest.raises(websockets.ConnectionClosedError) as closed:
                while True:
                    replies.append(json.loads(await ws.recv()))
            assert error_of(replies[-1])[1] == "rate_limited"
            assert closed.value.rcvd.code == 1008
            # The appends all passed: the clears after them were answered until the limit.
            assert [r["type"] for r in replies[:-1]] and all(
                r["type"] == "input_audio_buffer.cleared" for r in replies[:-1]
            )


async def test_a_front_end_that_stops_ends_its_realtime_sessions(pg_url: str) -> None:
    """With a shared store a stopping front-end hands its sessions to the others (1012: resume
    there); a Realtime client cannot resume, so its session ends here instead (1001), its
    `end` in the store, and the store never offers it for a resume."""
    import psycopg

    server = run_server(store=pg_url, frontend_id="edge-1")
    running, stopping = server.__enter__(), None
    try:
        url = f"ws://127.0.0.1:{running.port}/v1/realtime"
        async with websockets.connect(url) as ws:
            created = json.loads(await ws.recv())
            append = {"type": "input_audio_buffer.append", "audio": PCM_100MS}
            for _ in range(10):
                await ws.send(json.dumps(append))
            stopping = asyncio.create_task(asyncio.to_thread(server.__exit__, None, None, None))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await ws.recv()
            assert closed.value.rcvd.code == 1001
            await stopping
    finally:
        if stopping is None:
            server.__exit__(None, None, None)
    session = created["session"]["id"]
    with psycopg.connect(pg_url) as db:
        (row,) = db.execute("SELECT ended IS NOT NULL FROM sessions WHERE id = %s", (session,))
    assert row == (True,)
