"""Continuous generation over real WebSocket sessions: tiny preset, real worker process, real
analysis of the session's audio (DSP), the client streaming in real time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest

from clients.stream_client import StreamClient, StreamResult
from stream.core.audio.pcm import Encoding
from tests.conftest import RunningServer, run_server, tone

RATE = 16_000
MEL_HOP = 160
# seconds 2 and hop 1 are whole latent rows (4 mel frames) of the tiny generator: 200 frames a
# segment, 100 new, an overlap of 100 joined at its middle over 10 frames (0.1 s).
STREAM = {"mode": "continuous", "seconds": 2.0, "hop_seconds": 1.0, "steps": 3, "seed": 7,
          "encoding": "pcm_f32le"}  # fmt: skip
FIRST, HOP, TAIL = (100 + 50 - 5) * MEL_HOP, 100 * MEL_HOP, 10 * MEL_HOP


@pytest.fixture(scope="module")
def gen_server() -> Iterator[RunningServer]:
    with run_server(generator="tiny", analysis_model="none") as running:
        yield running


async def low_then_high(seconds: float, block: float = 0.1) -> AsyncIterator[np.ndarray]:
    """A low tone for the first half, a high one for the second: the context changes."""
    half = seconds / 2
    audio = np.concatenate([tone(half, RATE, 110.0, 0.3), tone(half, RATE, 880.0, 0.3)])
    step = int(block * RATE)
    for i in range(0, len(audio), step):
        yield audio[i : i + step]


async def run(
    server: RunningServer, seconds: float, config: dict[str, Any], on_event: Any = None
) -> StreamResult:
    client = StreamClient(server.ws, RATE, 1, Encoding.PCM_S16LE, config=config)
    if on_event is not None:
        client.on_event = lambda event: on_event(client, event)
    return await client.run(low_then_high(seconds), realtime=True)


def kinds(result: StreamResult, number: int) -> list[str]:
    return [e["type"].removeprefix("generation.") for e in result.generation(number)]


async def test_a_stream_is_gapless_and_follows_the_context(gen_server: RunningServer) -> None:
    config = {"generation": {**STREAM, "window_seconds": 2.0}}
    result = await run(gen_server, 8.0, config)
    events = result.generation(1)
    assert kinds(result, 1)[:2] == ["queued", "started"] and kinds(result, 1)[-1] == "done"
    started = events[1]
    assert started["mode"] == "continuous" and started["trigger"]["reason"] == "start"
    segments = [e for e in events if e["type"] == "generation.segment"]
    assert len(segments) >= 6  # about one a second of the 8 s session
    # Segments follow one another exactly: each starts where the one before ended.
    assert [s["segment"] for s in segments] == list(range(len(segments)))
    assert [s["samples"] for s in segments] == [FIRST] + [HOP] * (len(segments) - 1)
    assert [s["start"] for s in segments] == np.cumsum([0] + [s["samples"] for s in
                                                              segments[:-1]]).tolist()  # fmt: skip
    assert [s["seed"] for s in segments] == [7 + k for k in range(len(segments))]
    # The frames tile the stream; the last is the held-back tail, faded out.
    frames = result.audio[1]
    assert [h.index for h, _ in frames] == list(range(len(frames)))
    assert [h.start for h, _ in frames] == np.cumsum([0] + [len(a) for _, a in
                                                            frames[:-1]]).tolist()  # fmt: skip
    assert [h.last for h, _ in frames] == [False] * (len(frames) - 1) + [True]
    done = events[-1]
    assert done["segments"] == len(segments) and done["chunks"] == len(frames)
    assert done["samples"] == sum(s["samples"] for s in segments) + TAIL == len(result.clip(1))
    assert len(frames[-1][1]) == TAIL and abs(frames[-1][1][-1]) < 1e-3
    # The prompt of each segment is made from the context as it is then: low, then high.
    registers = [s["prompt"]["text"] for s in segments]
    assert "low register" in registers[0] and "high register" in registers[-1]
    assert all(s["prompt"]["window"]["end"] <= t["prompt"]["window"]["end"]
               for s, t in zip(segments, segments[1:], strict=False))  # fmt: skip
    assert all(s["realtime_factor"] > 0 and s["timings"]["total_s"] > 0 for s in segments)
    assert not result.errors and result.end is not None


async def test_cancel_stops_the_stream_until_asked_again(gen_server: RunningServer) -> None:
    sent: list[str] = []

    def on_event(client: StreamClient, event: dict[str, Any]) -> None:
        if event["type"] == "generation.segment" and event["id"] == 1 and event["segment"] == 1:
            sent.append("cancel")
            asyncio.ensure_future(client.send_control({"type": "cancel", "id": 1}))
        elif event["type"] == "generation.cancelled" and not sent[1:]:
            sent.append("generate")  # a second stream, asked for; a third is refused
            asyncio.ensure_future(client.send_control({"type": "generate", "mode": "continuous"}))
            asyncio.ensure_future(client.send_control({"type": "generate", "mode": "continuous"}))

    result = await run(gen_server, 6.0, {"generation": STREAM}, on_event)
    assert sent == ["cancel", "generate"]
    first = result.generation(1)
    assert kinds(result, 1)[-1] == "cancelled" and first[-1]["reason"] == "client"
    segments = [e for e in first if e["type"] == "generation.segment"]
    assert 2 <= len(segments) <= 3  # the one being made when the cancel came may finish
    assert first[-1]["samples"] == len(result.clip(1)) == sum(s["samples"] for s in segments) + TAIL
    assert result.audio[1][-1][0].last
    # Triggers did not start it again; the client's `generate` did (number 2), the second
    # `generate` while it ran was refused, and `stop` ended it with done.
    assert kinds(result, 2)[:2] == ["queued", "started"] and kinds(result, 2)[-1] == "done"
    assert result.generation(2)[1]["trigger"]["reason"] == "manual"
    assert [e["code"] for e in result.errors] == ["generation_running"]
    assert not result.generation(3)
    analysed_after = [e for e in result.analysis if e["end"] > 4.0]
    assert analysed_after  # the session went on


async def test_config_turns_the_stream_on_and_off(gen_server: RunningServer) -> None:
    """A `config` that sets continuous mode starts the stream at the next analysed chunk; one
    that leaves it ends the stream (`done`), and the session goes on making clips on request."""
    sent: list[str] = []
    live = {k: v for k, v in STREAM.items() if k != "encoding"}  # (fixed for a session)

    def on_event(client: StreamClient, event: dict[str, Any]) -> None:
        if event["type"] == "analysis" and event["seq"] == 0 and not sent:
            sent.append("continuous")
            asyncio.ensure_future(client.send_control({"type": "config", "generation": live}))
        elif event["type"] == "generation.segment" and event["segment"] == 1 and len(sent) == 1:
            sent.append("text")
            text = {**live, "mode": "text", "seconds": 1.0, "hop_seconds": None}
            asyncio.ensure_future(client.send_control({"type": "config", "generation": text}))
            asyncio.ensure_future(client.send_control({"type": "generate", "steps": 2}))

    config = {"generation": {"mode": "text", "encoding": "pcm_f32le"}}
    result = await run(gen_server, 5.0, config, on_event)
    assert sent == ["continuous", "text"]
    assert result.generation(1)[1]["trigger"]["reason"] == "start"
    assert kinds(result, 1)[-1] == "done" and result.generation(1)[-1]["segments"] in (2, 3)
    assert kinds(result, 2)[-1] == "done" and result.generation(2)[1]["mode"] == "text"
    assert not result.generation(3) and not result.errors
