"""Generation end to end over real WebSocket sessions, tiny preset, real worker process."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest

from clients.stream_client import StreamClient, StreamResult
from stream.core.audio.pcm import Encoding
from tests.conftest import RunningServer, run_server, tone

RATE = 16_000


@pytest.fixture(scope="module")
def gen_server() -> Iterator[RunningServer]:
    with run_server(generator="tiny", analysis_model="none") as running:
        yield running


async def blocks(
    seconds: float, rate: int = RATE, block: float = 0.1, freq: float = 330.0
) -> AsyncIterator[np.ndarray]:
    audio = tone(seconds, rate, freq=freq, amplitude=0.3)
    step = int(block * rate)
    for i in range(0, len(audio), step):
        yield audio[i : i + step]


async def stream(
    server: RunningServer,
    seconds: float,
    config: dict[str, Any] | None = None,
    on_event: Any = None,
    realtime: bool = False,
) -> tuple[StreamClient, StreamResult]:
    client = StreamClient(server.ws, RATE, 1, Encoding.PCM_S16LE, config=config)
    if on_event is not None:
        client.on_event = lambda event: on_event(client, event)
    result = await client.run(blocks(seconds), realtime=realtime)
    return client, result


def kinds(result: StreamResult, number: int) -> list[str]:
    return [e["type"].removeprefix("generation.") for e in result.generation(number)]


async def test_interval_trigger_streams_a_clip_in_order(gen_server: RunningServer) -> None:
    config = {
        "generation": {
            "triggers": ["interval"], "interval_seconds": 3.0, "seconds": 1.5, "steps": 3,
            "seed": 5, "sample_rate": 22_050, "encoding": "pcm_f32le",
        }
    }  # fmt: skip
    _, result = await stream(gen_server, 4.0, config)
    assert result.ready["generator"]["model"] == "tiny"
    assert not result.ready["generator"]["trained"]
    assert kinds(result, 1) == ["queued", "started", "progress", "progress", "progress", "done"]
    started = result.generation(1)[1]
    assert started["trigger"]["reason"] == "interval" and started["trigger"]["at"] == 3.0
    assert started["seed"] == 5 and started["prompt"]["text"].startswith("calm ambient pad")
    assert started["prompt"]["window"] == {"start": 0.0, "end": 3.0}
    assert "tempo_bpm" in started["prompt"]["descriptors"]
    done = result.generation(1)[-1]
    frames = result.audio[1]
    assert [h.index for h, _ in frames] == list(range(len(frames))) and frames[-1][0].last
    assert all(h.sample_rate == 22_050 and h.encoding is Encoding.PCM_F32LE for h, _ in frames)
    starts = np.cumsum([0] + [len(a) for _, a in frames[:-1]])
    assert [h.start for h, _ in frames] == starts.tolist()
    clip = result.clip(1)
    assert done["samples"] == len(clip) and abs(len(clip) - int(1.5 * 22_050)) <= 2
    assert done["timings"]["total_s"] > 0 and len(done["timings"]["unet_steps"]) == 3
    assert np.isfinite(clip).all() and np.abs(clip).max() > 0
    # The generation came after the analysis that triggered it, and the end after it all.
    assert result.events[-1]["type"] == "end"


async def test_manual_generation_is_reproducible_by_seed(gen_server: RunningServer) -> None:
    async def one(seed: int) -> np.ndarray:
        def on_event(client: StreamClient, event: dict[str, Any]) -> None:
            if event["type"] == "analysis" and event["seq"] == 0:
                message = {"type": "generate", "prompt": "bells", "seconds": 1.0, "steps": 2}
                asyncio.ensure_future(client.send_control({**message, "seed": seed}))

        _, result = await stream(gen_server, 2.0, on_event=on_event, realtime=True)
        assert kinds(result, 1)[-1] == "done", result.events
        assert result.generation(1)[1]["trigger"]["reason"] == "manual"
        assert result.generation(1)[1]["prompt"]["text"].startswith("bells, calm ambient pad")
        return result.clip(1)

    first, again, other = await one(7), await one(7), await one(8)
    np.testing.assert_array_equal(first, again)
    assert len(first) == 16_000 and not np.array_equal(first, other)


async def test_cancel_and_supersede(gen_server: RunningServer) -> None:
    sent: list[str] = []

    def on_event(client: StreamClient, event: dict[str, Any]) -> None:
        long = {"type": "generate", "seconds": 8.0, "steps": 60, "auto_prompt": False}
        if event["type"] == "analysis" and event["seq"] == 0 and not sent:
            sent.append("first")
            asyncio.ensure_future(client.send_control({**long, "prompt": "one"}))
        elif event["type"] == "generation.progress" and event["id"] == 1 and len(sent) == 1:
            # While 1 runs: 2 queues, 3 supersedes it; then cancel 1 mid-run.
            sent.append("more")
            short = {"type": "generate", "seconds": 1.0, "steps": 2}
            asyncio.ensure_future(client.send_control({**short, "prompt": "two"}))
            asyncio.ensure_future(client.send_control({**short, "prompt": "three"}))
            asyncio.ensure_future(client.send_control({"type": "cancel", "id": 1}))

    _, result = await stream(gen_server, 2.0, on_event=on_event, realtime=True)
    assert kinds(result, 1)[-1] == "cancelled" and result.generation(1)[-1]["reason"] == "client"
    assert "done" not in kinds(result, 1)
    steps = [e["step"] for e in result.generation(1) if e["type"] == "generation.progress"]
    assert steps and max(steps) < 60  # stopped within a step of the request
    assert kinds(result, 2) == ["queued", "cancelled"]
    assert result.generation(2)[-1]["reason"] == "superseded"
    assert kinds(result, 3)[-1] == "done" and len(result.clip(3)) == 16_000
    # Every generation is accounted for in the session's kept context, whatever its end.
    import httpx

    async with httpx.AsyncClient(base_url=gen_server.http) as http:
        for _ in range(50):
            kept = (await http.get(f"/v1/sessions/{result.ready['session']}")).json()
            if len(kept["generations"]) == 3:
                break
            await asyncio.sleep(0.1)
    outcomes = [(g["id"], g["outcome"], g.get("reason")) for g in kept["generations"]]
    assert outcomes == [
        (1, "cancelled", "client"),
        (2, "cancelled", "superseded"),
        (3, "done", None),
    ]


async def test_bad_generation_messages_are_errors_not_crashes(gen_server: RunningServer) -> None:
    def on_event(client: StreamClient, event: dict[str, Any]) -> None:
        if event["type"] == "analysis" and event["seq"] == 0:
            for message in (
                {"type": "generate", "template": "opera"},
                {"type": "generate", "volume": 11},
                {"type": "generate", "seconds": 500},
                {"type": "cancel", "id": "x"},
                {"type": "cancel", "id": 99},
            ):
                asyncio.ensure_future(client.send_control(message))

    _, result = await stream(gen_server, 2.0, on_event=on_event, realtime=True)
    codes = [e["code"] for e in result.errors]
    assert codes.count("invalid_message") == 4 and codes.count("unknown_generation") == 1
    assert all(not e["fatal"] for e in result.errors)
    assert result.end is not None and result.end["chunks"] == 2


async def test_variation_needs_context_and_follows_it(gen_server: RunningServer) -> None:
    config = {
        "generation": {
            "triggers": ["interval"], "interval_seconds": 2.0, "mode": "variation",
            "strength": 0.5, "seconds": 1.0, "steps": 2, "window_seconds": 2.0,
        }
    }  # fmt: skip
    _, result = await stream(gen_server, 2.5, config)
    assert kinds(result, 1)[-1] == "done"
    assert result.generation(1)[0]["mode"] == "variation" and len(result.clip(1)) == 16_000


async def test_two_sessions_share_the_worker_in_turn(gen_server: RunningServer) -> None:
    order: list[tuple[str, int]] = []
    queued: set[str] = set()
    started: set[str] = set()
    clients: dict[str, StreamClient] = {}
    second_sent = {"a": asyncio.Event(), "b": asyncio.Event()}
    request = {"type": "generate", "seconds": 2.0, "steps": 12, "auto_prompt": False}

    def send_second_requests() -> None:
        # A session asks again once its first generation runs and both first ones are in the
        # queue: the one that ran first then asks while the other's first is still waiting.
        # (Asking while one's own is waiting would supersede it; waiting for events, not for
        # the clock, keeps that race out of the test on a slow machine.)
        for name in started:
            if len(queued) == 2 and not second_sent[name].is_set():
                second_sent[name].set()
                asyncio.ensure_future(clients[name].send_control({**request, "prompt": name}))

    def on_event(name: str):
        def handle(client: StreamClient, event: dict[str, Any]) -> None:
            if event["type"] == "generation.queued" and event["id"] == 1:
                queued.add(name)
            if event["type"] == "generation.started":
                order.append((name, event["id"]))
                started.add(name)
            if event["type"] == "analysis" and event["seq"] == 0:
                asyncio.ensure_future(client.send_control({**request, "prompt": name}))
            send_second_requests()

        return handle

    async def audio_until_asked_twice(name: str) -> AsyncIterator[np.ndarray]:
        async for block in blocks(2.0):
            yield block
        # The session takes messages until its audio ends: hold the end back until it asked.
        await asyncio.wait_for(second_sent[name].wait(), 60)

    async def run(name: str) -> StreamResult:
        client = clients[name] = StreamClient(gen_server.ws, RATE, 1, Encoding.PCM_S16LE)
        handle = on_event(name)
        client.on_event = lambda event: handle(client, event)
        return await client.run(audio_until_asked_twice(name), realtime=True)

    ra, rb = await asyncio.gather(run("a"), run("b"))
    # Each session asked twice; the queue takes sessions in turn, so neither runs both of
    # its generations before the other's first.
    assert sorted(order) == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert {order[0][0], order[1][0]} == {"a", "b"}
    assert all(kinds(r, n)[-1] == "done" for r in (ra, rb) for n in (1, 2))


async def test_analysis_keeps_flowing_while_a_long_generation_runs() -> None:
    with run_server(generator="tiny", analysis_model="tiny-random") as server:
        busy = {"type": "generate", "seconds": 30.0, "steps": 100, "auto_prompt": False}
        generator_client: list[StreamClient] = []

        def start_long(client: StreamClient, event: dict[str, Any]) -> None:
            if event["type"] == "analysis" and event["seq"] == 0:
                generator_client.append(client)
                asyncio.ensure_future(client.send_control(busy))

        generating = asyncio.ensure_future(stream(server, 1.5, on_event=start_long, realtime=True))
        await asyncio.sleep(2.0)  # the generation is running by now
        _, live = await stream(server, 6.0, realtime=True)
        await generator_client[0].send_control({"type": "cancel", "id": 1})
        _, gen = await generating
    assert [e["type"] for e in gen.generation(1)][-1] == "generation.cancelled"
    running = [e for e in gen.events if e["type"] == "generation.progress"]
    times = [e["client_time"] for e in running]
    analysis = live.analysis
    assert len(analysis) == 6 and sum(e["skipped"] for e in analysis) == 0
    # The other session's analysis arrived throughout the generation, chunk after chunk,
    # each within a generous bound of its audio (only a blocked loop or a starved analysis
    # engine would miss it).
    assert times and analysis[0]["client_time"] < times[-1]
    assert max(e["client_latency_ms"] for e in analysis) < 2500


async def test_worker_crash_retries_then_fails_the_job_and_the_worker_comes_back() -> None:
    with run_server(generator="tiny", analysis_model="none") as server:
        engine = server.app.state.sessions.generator
        killed: list[int] = []

        def on_event(client: StreamClient, event: dict[str, Any]) -> None:
            long = {"type": "generate", "seconds": 8.0, "steps": 80, "auto_prompt": False}
            if event["type"] == "analysis" and event["seq"] == 0:
                asyncio.ensure_future(client.send_control(long))
            # Killed at its first step, twice: once retried, then out of attempts.
            if event["type"] == "generation.progress" and engine._process.pid not in killed:
                killed.append(engine._process.pid)
                os.kill(engine._process.pid, signal.SIGKILL)

        _, result = await stream(server, 2.0, on_event=on_event, realtime=True)
        assert kinds(result, 1) == [
            "queued", "started", "progress", "retrying", "started", "progress", "failed"
        ]  # fmt: skip
        retrying, failed = result.generation(1)[3], result.generation(1)[-1]
        assert retrying["attempt"] == 2 and retrying["code"] == "worker_crashed"
        assert failed["type"] == "generation.failed" and failed["code"] == "worker_crashed"
        assert result.end is not None  # the session itself went on to its end

        def again(client: StreamClient, event: dict[str, Any]) -> None:
            if event["type"] == "analysis" and event["seq"] == 0:
                message = {"type": "generate", "seconds": 1.0, "steps": 2}
                asyncio.ensure_future(client.send_control(message))

        for _ in range(100):  # the restart takes a few seconds
            if engine._conn is not None:
                break
            await asyncio.sleep(0.2)
        _, result = await stream(server, 2.0, on_event=again, realtime=True)
        assert kinds(result, 1)[-1] == "done" and engine.counts["restarts"] == 2
        assert engine._process.pid not in killed


def failing_loader(name: str, bf16: bool | None) -> Any:
    """The real tiny pipeline, except that prompts containing "explode" raise."""
    from stream.engines.worker import load_pipeline

    pipeline, info = load_pipeline(name, bf16)

    class Failing:
        def generate(self, request: Any, callbacks: Any) -> Any:
            if "explode" in request.prompt:
                raise RuntimeError("injected failure")
            return pipeline.generate(request, callbacks)

    return Failing(), info


async def test_a_failing_generator_reports_and_the_session_goes_on() -> None:
    with run_server(
        generator="tiny", analysis_model="none", generator_loader=failing_loader
    ) as server:

        def on_event(client: StreamClient, event: dict[str, Any]) -> None:
            message = {"type": "generate", "seconds": 1.0, "steps": 2, "auto_prompt": False}
            if event["type"] == "analysis" and event["seq"] == 0:
                asyncio.ensure_future(client.send_control({**message, "prompt": "explode"}))
            if event["type"] == "generation.failed":
                asyncio.ensure_future(client.send_control({**message, "prompt": "fine"}))

        _, result = await stream(server, 3.0, on_event=on_event, realtime=True)
    failed = result.generation(1)[-1]
    assert failed["code"] == "generation_failed" and "injected failure" in failed["message"]
    assert kinds(result, 2)[-1] == "done" and len(result.analysis) == 3


async def test_without_a_generator_requests_get_a_clear_error(server: RunningServer) -> None:
    config = {"generation": {"triggers": ["interval"]}}
    _, result = await stream(server, 1.0, config)
    assert result.ready["generator"] is None
    assert [e["code"] for e in result.errors] == ["generation_unavailable"]


async def test_config_messages_change_the_triggers_while_live(gen_server: RunningServer) -> None:
    def on_event(client: StreamClient, event: dict[str, Any]) -> None:
        if event["type"] == "analysis" and event["seq"] == 1:
            change = {"triggers": ["interval"], "interval_seconds": 2.0, "seconds": 1.0}
            for message in (
                {"type": "config", "generation": change},
                {"type": "config", "generation": {"window_seconds": 3}},
                {"type": "config", "chunk_seconds": 2},
            ):
                asyncio.ensure_future(client.send_control(message))

    # No trigger at first; from 2 s on, an interval of 2 s: generations at 4 and 6 s.
    _, result = await stream(gen_server, 6.5, on_event=on_event, realtime=True)
    started = [e for e in result.events if e["type"] == "generation.started"]
    assert [e["trigger"]["at"] for e in started] == [4.0, 6.0]
    assert [e["code"] for e in result.errors] == ["invalid_message", "invalid_message"]


async def test_a_live_sessions_clips_download_as_wav(gen_server: RunningServer) -> None:
    import io

    import httpx
    import soundfile as sf

    fetched: dict[str, Any] = {}

    async def fetch(session: str) -> None:
        async with httpx.AsyncClient(base_url=gen_server.http) as http:
            fetched["clip"] = await http.get(f"/v1/sessions/{session}/generations/1.wav")
            fetched["missing"] = await http.get(f"/v1/sessions/{session}/generations/9.wav")

    def on_event(client: StreamClient, event: dict[str, Any]) -> None:
        if event["type"] == "analysis" and event["seq"] == 0:
            message = {"type": "generate", "seconds": 1.0, "steps": 2, "seed": 4}
            asyncio.ensure_future(client.send_control(message))
        if event["type"] == "generation.done":
            fetched["task"] = asyncio.ensure_future(fetch(event["session"]))

    _, result = await stream(gen_server, 3.0, on_event=on_event, realtime=True)
    await fetched["task"]
    clip = fetched["clip"]
    assert clip.status_code == 200 and clip.headers["content-type"] == "audio/wav"
    audio, rate = sf.read(io.BytesIO(clip.content), dtype="float32")
    assert rate == 16_000 and len(audio) == 16_000
    # The same audio as the frames sent (those at 16 kHz here), to 16-bit precision.
    np.testing.assert_allclose(audio, result.clip(1), atol=1 / 32768 + 1e-6)
    assert fetched["missing"].status_code == 404


def hanging_loader(name: str, bf16: bool | None) -> Any:
    """The real tiny pipeline, except that prompts containing "hang" never return."""
    import time

    from stream.engines.worker import load_pipeline

    pipeline, info = load_pipeline(name, bf16)

    class Hanging:
        def generate(self, request: Any, callbacks: Any) -> Any:
            if "hang" in request.prompt:
                time.sleep(3600)
            return pipeline.generate(request, callbacks)

    return Hanging(), info


async def test_a_hung_generator_is_restarted_and_its_job_failed() -> None:
    with run_server(
        generator="tiny", analysis_model="none", generator_loader=hanging_loader,
        generation_stall_seconds=2.0, generation_attempts=1,  # (the crash test retries)
    ) as server:  # fmt: skip

        def on_event(client: StreamClient, event: dict[str, Any]) -> None:
            message = {"type": "generate", "seconds": 1.0, "steps": 2, "auto_prompt": False}
            if event["type"] == "analysis" and event["seq"] == 0:
                asyncio.ensure_future(client.send_control({**message, "prompt": "hang"}))
            if event["type"] == "generation.failed":
                asyncio.ensure_future(client.send_control({**message, "prompt": "fine"}))

        # (6 s of audio: the second request goes out well before the session's stop.)
        _, result = await stream(server, 6.0, on_event=on_event, realtime=True)
        engine = server.app.state.sessions.generator
    failed = result.generation(1)[-1]
    assert failed["type"] == "generation.failed" and failed["code"] == "worker_stalled"
    assert kinds(result, 2)[-1] == "done" and engine.counts["restarts"] == 1
