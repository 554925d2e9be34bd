"""The generation engine on its own: a real worker process, the tiny preset."""

from __future__ import annotations

import asyncio
from typing import Any

from models.generation import GenerationRequest
from stream.engines.generation import GenerationEngine, GenerationJob


async def run_one(engine: GenerationEngine, request: GenerationRequest) -> list[tuple]:
    reports: list[tuple] = []
    finished = asyncio.Event()

    def sink(kind: str, *payload: Any) -> None:
        reports.append((kind, *payload))
        if kind in ("done", "cancelled", "failed"):
            finished.set()

    engine.submit(GenerationJob("s", request, sink))
    await asyncio.wait_for(finished.wait(), 60)
    return reports


async def test_the_worker_pauses_between_steps_while_analysis_is_behind() -> None:
    behind = {"now": False}
    engine = GenerationEngine("tiny", busy=lambda: behind["now"])
    await engine.start()
    try:
        request = GenerationRequest("pad", seconds=0.5, steps=3)
        free = (await run_one(engine, request))[-1]
        behind["now"] = True
        await asyncio.sleep(0.1)  # the flag reaches the worker within BUSY_POLL_S
        yielding = (await run_one(engine, request))[-1]
    finally:
        await engine.stop()
    assert free[0] == yielding[0] == "done"
    assert free[1]["paused_for_analysis_s"] == 0
    # Paused before each step and each vocoder block, at most MAX_YIELD_S each: it still ends.
    assert yielding[1]["paused_for_analysis_s"] > 1.0
    assert engine.counts["done"] == 2 and engine.stats()["queued"] == 0
