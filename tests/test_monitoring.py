"""/metrics and /readyz on a real server, after real sessions."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from clients.stream_client import StreamClient
from tests.conftest import run_server
from tests.test_generation_server import blocks


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_what_sessions_did() -> None:
    with run_server(generator="tiny", analysis_model="tiny-random") as server:
        async with httpx.AsyncClient(base_url=server.http) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["ready"] is True

            client = StreamClient(server.ws, 16_000, 1)

            def on_event(event: dict[str, Any]) -> None:
                if event["type"] == "analysis" and event["seq"] == 0:
                    message = {"type": "generate", "seconds": 1.0, "steps": 2}
                    asyncio.ensure_future(client.send_control(message))

            client.on_event = on_event
            result = await client.run(blocks(3.0), realtime=True)
            assert result.end is not None
            # A bad frame: an error event, counted by its code.
            async with connect(server.ws) as ws:
                start = {"type": "start", "sample_rate": 16000, "channels": 1,
                         "encoding": "pcm_s16le"}  # fmt: skip
                await ws.send(json.dumps(start))
                await ws.recv()
                await ws.send(b"\x00")
                assert json.loads(await ws.recv())["code"] == "partial_frame"
            text = (await http.get("/metrics")).text
            status = (await http.get("/v1/status")).json()
            page = await status_page_text(server.http)
    m = samples(text)
    assert value(m, "grym_sessions_opened_total") == 2
    assert value(m, "grym_sessions") in (0, 1)  # the second may still be closing
    assert abs(value(m, "grym_audio_seconds_total", transport="websocket") - 3.0) < 1e-6
    chunks = result.end["chunks"]
    assert value(m, "grym_events_total", type="analysis") == chunks
    assert value(m, "grym_events_total", type="generation.done") == 1
    assert value(m, "grym_events_total", type="generation.audio") >= 1
    assert value(m, "grym_errors_total", code="partial_frame") == 1
    total = value(m, "grym_analysis_latency_seconds_count", stage="total", model="all")
    assert total == chunks
    for model in ("dsp", "wav2vec2"):
        queued = value(m, "grym_analysis_latency_seconds_count", stage="queue", model=model)
        batches = value(m, "grym_analysis_batch_size_count", model=model)
        assert queued == chunks and 1 <= batches <= chunks
    assert value(m, "grym_generations_total", outcome="done") == 1
    assert value(m, "grym_generation_seconds_count", stage="total") == 1
    assert value(m, "grym_event_loop_lag_seconds_count") > 10  # ticks every 0.1 s
    assert value(m, "grym_generation_worker_restarts_total") == 0
    assert np.isfinite(value(m, "grym_event_loop_lag_seconds_sum"))

    # The status page's data and the page itself.
    assert status["recent_errors"][0]["code"] == "partial_frame"
    assert status["load"]["sessions_limit"] == 64 and status["load"]["loop_lag_p95_s"] is not None
    assert status["load"]["generation"]["done"] == 1
    if page is not None:
        assert "partial_frame" in page and "generation idle" in page


async def status_page_text(base: str) -> str | None:
    """status.html as Chromium renders it (None where chromium is not installed)."""
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        return None
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            await page.goto(base + "/status.html")
            await page.wait_for_selector("#errors li", timeout=10_000)
            return await page.text_content("body")
        finally:
            await browser.close()
