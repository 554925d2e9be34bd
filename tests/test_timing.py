"""Per-stage timings (`config.timing`) through a real server: every analysis event of a
session that asks carries them, they add up to the server's time, and that time fits inside
the latency the client measured; sessions that do not ask get none, and none are stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np

from clients.stream_client import StreamClient
from stream.core.audio.pcm import Encoding
from stream.session.timing import STAGES
from tests.conftest import RunningServer, run_server, tone


async def frames(audio: np.ndarray) -> AsyncIterator[np.ndarray]:
    for i in range(0, len(audio), 882):  # 20 ms at 44.1 kHz
        yield audio[i : i + 882]


async def test_timing_stages_add_up_and_fit_in_the_client_latency(server: RunningServer) -> None:
    audio = tone(3.0, 44100, channels=2)
    timed = StreamClient(server.ws, 44100, 2, Encoding.PCM_S16LE, config={"timing": True})
    plain = StreamClient(server.ws, 44100, 2, Encoding.PCM_S16LE)
    result = await timed.run(frames(audio), realtime=True)
    untimed = await plain.run(frames(audio), realtime=False)

    assert result.ready["timing"] is True
    events = result.analysis
    assert len(events) == 3 and not result.errors
    for event in events:
        timing = event["timing"]
        assert all(timing[stage] >= 0 for stage in STAGES)
        assert abs(sum(timing[stage] for stage in STAGES) - timing["server_ms"]) < 0.05
        assert timing["inference_ms"] > 0 and timing["batch"] >= 1
        # Both engines report; the event waited for the slower one.
        assert set(timing["engines"]) == {"dsp", "wav2vec2"}
        slowest = max(e["inference_ms"] for e in timing["engines"].values())
        assert timing["inference_ms"] <= slowest + 0.001
        # The server's part of the way is inside what the client measured end to end.
        assert 0 < timing["server_ms"] <= event["client_latency_ms"]
    assert untimed.ready["timing"] is False
    assert untimed.analysis and all("timing" not in e for e in untimed.analysis)


async def test_timings_are_not_kept_with_the_context(tmp_path: Path) -> None:
    """They describe one delivery, not the audio: the stored timeline has none."""
    with run_server(analysis_model="tiny-random", data_dir=str(tmp_path)) as srv:
        client = StreamClient(srv.ws, 44100, 2, Encoding.PCM_S16LE, config={"timing": True})
        result = await client.run(frames(tone(2.0, 44100, channels=2)), realtime=False)
        assert all("timing" in e for e in result.analysis)
        async with httpx.AsyncClient(base_url=srv.http) as http:
            for _ in range(50):  # the writer commits within a batch interval
                kept = (await http.get(f"/v1/sessions/{result.ready['session']}/timeline")).json()
                if len(kept) == len(result.analysis):
                    break
                await asyncio.sleep(0.1)
    assert len(kept) == len(result.analysis) == 2
    assert all("timing" not in entry and "wav2vec2" in entry for entry in kept)
