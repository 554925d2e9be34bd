"""/metrics and /readyz on a real server, after real sessions."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from clients.stream_client import StreamClient
from tests.conftest import run_server
from tests.test_generation_server import blocks

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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
    if CHROMIUM is None:
        return None
    async with chromium_page() as page:
        await page.goto(base + "/status.html")
        await page.wait_for_selector("#errors li", timeout=10_000)
        return await page.text_content("body")


@asynccontextmanager
async def chromium_page() -> AsyncIterator[Any]:
    """A page of Debian's chromium (Playwright's own browsers are never installed)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


async def test_the_status_page_takes_the_token() -> None:
    """On a server with a token, /v1/status needs it: status.html?token= shows the live sessions,
    the token field does too; without it, or with a wrong one, the page says a token is needed
    (not that the server does not answer); a refused Origin is said as such."""
    assert CHROMIUM is not None, "Debian's chromium is missing: `make test` installs it"
    token, session = "s3cret", "status-page-session"
    start = {"type": "start", "sample_rate": 16000, "channels": 1, "encoding": "pcm_s16le"}
    with run_server(token=token, allowed_origins="http://good.example") as server:
        async with connect(server.ws + f"?token={token}") as ws:
            await ws.send(json.dumps({**start, "session": session}))
            assert json.loads(await ws.recv())["type"] == "ready"
            async with chromium_page() as page:
                await page.goto(server.http + f"/status.html?token={token}")
                await page.wait_for_selector("#sessions tbody tr", timeout=10_000)
                with_token = await page.text_content("#sessions")
                metrics_link = await page.get_attribute("#metrics", "href")
                await page.goto(server.http + "/status.html")
                await page.wait_for_selector("#notices p.error", timeout=10_000)
                without = await page.text_content("#notices"), await page.text_content("#updated")
                without_rows = await page.locator("#sessions tbody tr").count()
                await page.fill("#token", "nope")
                await page.dispatch_event("#token", "change")
                await page.wait_for_function(
                    "document.getElementById('updated').textContent === 'token refused'"
                )
                wrong = await page.text_content("#notices")
                await page.fill("#token", token)
                await page.dispatch_event("#token", "change")
                await page.wait_for_selector("#sessions tbody tr", timeout=10_000)
                typed = await page.text_content("#sessions"), await page.text_content("#notices")
            async with chromium_page() as page:
                # A same-origin GET carries no Origin (and Chromium fails a fetch whose Origin
                # is forged): the request goes to the server with one, its 403 to the page.
                async def elsewhere(route: Any) -> None:
                    headers = {**route.request.headers, "origin": "http://evil.example"}
                    await route.fulfill(response=await route.fetch(headers=headers))

                await page.route("**/v1/status", elsewhere)
                await page.goto(server.http + f"/status.html?token={token}")
                await page.wait_for_selector("#notices p.error", timeout=10_000)
                origin = await page.text_content("#notices"), await page.text_content("#updated")
            await ws.send(json.dumps({"type": "stop"}))
            async for message in ws:
                if json.loads(message)["type"] == "end":
                    break
    assert session in with_token
    assert metrics_link == f"/metrics?token={token}"
    assert "needs a token" in without[0] and "token=" in without[0]
    assert without[1] == "token needed" and without_rows == 0
    assert "needs a token" in wrong and "refused" in wrong
    assert session in typed[0] and typed[1] == ""
    assert "Origin" in origin[0] and "not allowed" in origin[0]
    assert origin[1] == "origin not allowed"
