"""Persisted context through the HTTP API, with real SQLite files and a real server."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import httpx
import soundfile as sf

from clients.stream_client import StreamClient
from tests.conftest import run_server
from tests.test_generation_server import blocks


async def test_sessions_are_kept_and_served(tmp_path: Path) -> None:
    with run_server(generator="tiny", analysis_model="tiny-random", data_dir=str(tmp_path)) as srv:
        client = StreamClient(srv.ws, 16_000, 1)

        def on_event(event: dict[str, Any]) -> None:
            if event["type"] == "analysis" and event["seq"] == 0:
                message = {"type": "generate", "seconds": 1.0, "steps": 2, "seed": 9}
                asyncio.ensure_future(client.send_control(message))

        client.on_event = on_event
        result = await client.run(blocks(3.0), realtime=True)
        session = result.ready["session"]
        async with httpx.AsyncClient(base_url=srv.http) as http:
            for _ in range(50):  # the writer commits within a batch interval
                listed = (await http.get("/v1/sessions")).json()
                if listed and listed[0]["summary"] and listed[0]["generations"]:
                    break
                await asyncio.sleep(0.1)
            one = (await http.get(f"/v1/sessions/{session}")).json()
            timeline = (await http.get(f"/v1/sessions/{session}/timeline?from=1&to=2.5")).json()
            whole = (await http.get(f"/v1/sessions/{session}/timeline")).json()
            clip = await http.get(f"/v1/sessions/{session}/generations/1.wav")
            replayed = await replay_page(srv.http, session)
            deleted = await http.delete(f"/v1/sessions/{session}")
            after = await http.get(f"/v1/sessions/{session}")
    assert listed[0]["id"] == session and listed[0]["chunks"] == result.end["chunks"]
    assert not listed[0]["live"]
    assert one["summary"]["samples_received"] == 48_000 and one["info"]["sample_rate"] == 16_000
    gen = one["generations"][0]
    assert gen["seed"] == 9 and gen["trigger"]["reason"] == "manual" and gen["audio"] is True
    assert gen["outcome"] == "done" and gen["timings"]["total_s"] > 0
    # The timeline tiles the audio: consecutive chunks, no gap, no duplicate.
    assert [e["seq"] for e in whole] == list(range(result.end["chunks"]))
    assert all(a["end"] == b["start"] for a, b in zip(whole, whole[1:]))
    assert [e["seq"] for e in timeline] == [1, 2]
    audio, rate = sf.read(io.BytesIO(clip.content))
    assert clip.status_code == 200 and rate == 16_000 and len(audio) == 16_000
    assert deleted.status_code == 204 and after.status_code == 404
    if replayed is not None:  # the page that replays a past session shows what was kept
        rows, clips, listed_text = replayed
        assert rows == result.end["chunks"] and clips == 1 and session in listed_text
    assert not any((tmp_path / "audio").rglob("*.flac"))


async def test_a_running_server_enforces_retention_periodically(tmp_path: Path) -> None:
    # Sessions older than ~0.9 s go, checked every 0.3 s; a live session is never taken.
    limits = {"retention_days": 1e-5, "retention_interval_seconds": 0.3}
    with run_server(data_dir=str(tmp_path), **limits) as running:
        client = StreamClient(running.ws, 16_000, 1)
        ended = (await client.run(blocks(0.5))).ready["session"]
        live = StreamClient(running.ws, 16_000, 1)

        async def slow() -> Any:
            async for block in blocks(2.5):
                yield block

        live_run = asyncio.create_task(live.run(slow(), realtime=True))
        async with httpx.AsyncClient(base_url=running.http) as http:
            listed = [s["id"] for s in (await http.get("/v1/sessions")).json()]
            assert ended in listed
            await asyncio.sleep(1.6)
            listed = [s["id"] for s in (await http.get("/v1/sessions")).json()]
            assert ended not in listed and live.session in listed
        await live_run


async def replay_page(base: str, session: str) -> tuple[int, int, str] | None:
    """replay.html as Chromium shows it: (analysis rows, clips with audio, the sessions list);
    None where chromium is not installed."""
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        return None
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            await page.goto(f"{base}/replay.html#{session}")
            await page.wait_for_selector("#rows[data-count]", timeout=10_000)
            rows = int(await page.get_attribute("#rows", "data-count"))
            clips = await page.locator("#clips li audio").count()
            return rows, clips, await page.text_content("#sessions") or ""
        finally:
            await browser.close()
