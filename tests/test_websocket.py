"""The WebSocket transport against a real server: formats, tiling, exact sample accounting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect

from clients.stream_client import StreamClient, StreamResult
from stream.core.audio.pcm import Encoding, encode
from tests.conftest import RunningServer, tone


async def blocks_of(audio: np.ndarray, frame: int) -> AsyncIterator[np.ndarray]:
    for i in range(0, len(audio), frame):
        yield audio[i : i + frame]


def assert_tiles(result: StreamResult, seconds: float) -> None:
    """Analysis events cover [0, seconds] in order, each sample once, none skipped."""
    events = result.analysis
    assert events, "no analysis events"
    assert events[0]["start"] == 0.0
    for before, after in zip(events, events[1:]):
        assert after["start"] == before["end"]
        assert after["seq"] == before["seq"] + 1
    assert abs(events[-1]["end"] - seconds) <= 1.5 / 16000
    assert all(e["skipped"] == 0 for e in events)
    assert result.end is not None and result.end["chunks"] == len(events)


async def test_healthz_and_index(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.http) as http:
        health = (await http.get("/healthz")).json()
        page = await http.get("/")
    assert health["status"] == "ok" and health["analysers"] == ["dsp", "wav2vec2"]
    assert health["trained"] is False  # the tests use the tiny-random preset
    assert page.status_code == 200 and "grym-stream" in page.text


@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
async def test_every_format_is_counted_exactly_and_tiled(
    server: RunningServer, encoding: Encoding, rate: int, channels: int
) -> None:
    seconds = 2.3
    audio = tone(seconds, rate, freq=440, amplitude=0.5, channels=channels)
    client = StreamClient(server.ws, rate, channels, encoding, config={"when_behind": "wait"})
    result = await client.run(blocks_of(audio, rate // 50 + 3), realtime=False)

    assert result.close_code == 1000 and not result.errors
    assert result.ready["sample_rate"] == rate and result.ready["analysis_sample_rate"] == 16000
    assert result.end["samples_received"] == len(audio) == result.samples_sent
    assert result.end["seconds"] == pytest.approx(seconds, abs=1 / rate)
    assert_tiles(result, seconds)
    # The content survives decoding, down-mix and resampling: a -6 dBFS 440 Hz sine.
    for event in result.analysis[1:-1]:
        assert event["features"]["rms_dbfs"] == pytest.approx(-9.03, abs=0.3)
        assert event["features"]["pitch_hz"] == pytest.approx(440, rel=0.01)
        assert event["latency_ms"] >= 0


@pytest.mark.parametrize("rate", [16000, 48000])
async def test_stereo_is_down_mixed_even_at_the_analysis_rate(
    server: RunningServer, rate: int
) -> None:
    # Opposite channels cancel in the mix: analysing one channel alone would hear a loud tone.
    audio = tone(1.5, rate, channels=2)
    audio[:, 1] *= -1
    client = StreamClient(server.ws, rate, 2, Encoding.PCM_F32LE, config={"when_behind": "wait"})
    result = await client.run(blocks_of(audio, 960), realtime=False)
    assert [e["features"]["rms_dbfs"] < -60 for e in result.analysis] == [True, True]


async def test_speech_streamed_in_real_time_is_tiled_and_heard(
    server: RunningServer, speech_wav
) -> None:
    audio, rate = sf.read(speech_wav, dtype="float32", always_2d=True)
    client = StreamClient(server.ws, rate, 1, Encoding.PCM_S16LE, config={"chunk_seconds": 0.5})
    result = await client.run(blocks_of(audio, rate // 50), realtime=True)
    assert result.end["samples_received"] == len(audio)
    assert_tiles(result, len(audio) / rate)
    speech = [e["vad"]["speech"] for e in result.analysis]
    assert sum(speech) >= len(speech) // 2
    assert all(e["client_latency_ms"] is not None for e in result.analysis)


async def test_skipping_when_behind_is_reported_and_accounts_for_every_chunk(
    server: RunningServer,
) -> None:
    # 40 s of audio in one burst, far faster than real time: in "skip" mode the server keeps
    # only the newest waiting chunks and says how many it skipped before each event.
    rate, seconds = 16000, 40.0
    audio = tone(seconds, rate, amplitude=0.1)
    config = {"chunk_seconds": 0.1, "when_behind": "skip"}
    client = StreamClient(server.ws, rate, 1, Encoding.PCM_S16LE, config=config)
    result = await client.run(blocks_of(audio, rate), realtime=False)

    events, end = result.analysis, result.end
    assert end["samples_received"] == len(audio)
    assert end["skipped"] > 0 and end["skipped"] == sum(e["skipped"] for e in events)
    assert end["chunks"] + end["skipped"] == 400
    previous_end = 0.0
    for e in events:  # each gap in the tiling is exactly the chunks the event says it skipped
        assert e["start"] - previous_end == pytest.approx(e["skipped"] * 0.1, abs=1e-9)
        previous_end = e["end"]
    assert previous_end == pytest.approx(seconds)


async def test_per_session_config_is_applied(server: RunningServer) -> None:
    config = {"chunk_seconds": 0.2, "left_context_seconds": 0.1, "lookahead_seconds": 0.05}
    client = StreamClient(server.ws, 16000, 1, config={**config, "when_behind": "wait"})
    result = await client.run(blocks_of(tone(1.0, 16000), 320), realtime=False)
    assert {k: result.ready[k] for k in config} == config
    assert [e["end"] for e in result.analysis] == [0.2, 0.4, 0.6, 0.8, 1.0]


@pytest.mark.parametrize(
    ("asked", "effect"), [(None, "greedy"), ("auto", "greedy"), ("beam", "beam")]
)
async def test_a_session_chooses_its_ctc_decoder(
    server: RunningServer, asked: str | None, effect: str
) -> None:
    """tiny-random has no LM: auto decodes greedily, beam searches without one. Its random
    weights spell noise, which is enough to check the transcript fields: with beam search each
    event's `text` is the tail of what it shows, after what the previous partial already had."""
    config = {"when_behind": "wait", **({"ctc_decoder": asked} if asked else {})}
    client = StreamClient(server.ws, 16000, 1, config=config)
    noise = np.random.default_rng(7).normal(0.0, 0.2, (48000, 1)).astype(np.float32)
    result = await client.run(blocks_of(noise, 1600), realtime=False)
    assert not result.errors and result.ready["ctc_decoder"] == effect
    transcripts = [e["transcript"] for e in result.analysis]
    assert len(transcripts) == 3 and transcripts[-1]["final"] is not None  # ended by `stop`
    previous = ""
    for update in transcripts:
        shown = update["final"]["text"] if update["final"] else update["partial"]
        if effect == "beam":
            assert shown.endswith(update["text"])
            assert previous.startswith(shown[: len(shown) - len(update["text"])])
        previous = update["partial"]


async def test_chunk_and_context_are_rounded_to_the_20ms_frame_grid(server: RunningServer) -> None:
    config = {"chunk_seconds": 0.25, "left_context_seconds": 0.031, "when_behind": "wait"}
    client = StreamClient(server.ws, 16000, 1, config=config)
    result = await client.run(blocks_of(tone(0.5, 16000), 320), realtime=False)
    assert (result.ready["chunk_seconds"], result.ready["left_context_seconds"]) == (0.24, 0.04)
    assert [e["end"] for e in result.analysis] == [0.24, 0.48, 0.5]


async def test_wire_bytes_can_be_split_anywhere_within_whole_frames(
    server: RunningServer,
) -> None:
    # Frames of 1 sample frame, 7, 1000...: the server's result depends only on the audio.
    rate = 44100
    wire = encode(tone(1.2, rate, channels=2), Encoding.PCM_S16LE)
    sizes = [4, 28, 4000, 4, 40000, 124, 8]
    async with connect(server.ws) as ws:
        start = {
            "type": "start",
            "sample_rate": rate,
            "channels": 2,
            "encoding": "pcm_s16le",
            "config": {"when_behind": "wait"},
        }
        await ws.send(json.dumps(start))
        assert json.loads(await ws.recv())["type"] == "ready"
        pos, k = 0, 0
        while pos < len(wire):
            size = sizes[k % len(sizes)]
            await ws.send(wire[pos : pos + size])
            pos, k = pos + size, k + 1
        await ws.send(json.dumps({"type": "stop"}))
        events = [json.loads(m) async for m in ws]
    assert ws.close_code == 1000
    end = events[-1]
    assert end["type"] == "end" and end["samples_received"] == len(wire) // 4
    assert [e["type"] for e in events[:-1] if e["type"] != "ack"] == ["analysis"] * 2
    assert events[-2] == {**events[-2], "type": "ack", "samples": end["samples_received"]}


async def test_sessions_run_concurrently_and_are_batched(server: RunningServer) -> None:
    rate = 16000
    clients = [StreamClient(server.ws, rate, 1, config={"chunk_seconds": 0.2}) for _ in range(6)]
    results = await asyncio.gather(
        *(c.run(blocks_of(tone(1.6, rate, freq=200 + 100 * i), 320)) for i, c in enumerate(clients))
    )
    for i, result in enumerate(results):
        assert_tiles(result, 1.6)
        pitches = [e["features"]["pitch_hz"] for e in result.analysis[1:]]
        assert pitches == pytest.approx([200 + 100 * i] * len(pitches), rel=0.02)
    assert len({r.ready["session"] for r in results}) == 6
