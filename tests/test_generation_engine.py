"""The generation engine on its own: a real worker process, the tiny preset."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from models.generation import GenerationRequest
from stream.engines.generation import GenerationEngine
from stream.engines.jobs import GenerationJob
from stream.engines.reports import Audio, Done, Progress, Queued, Report, Started, Terminal
from stream.engines.worker import LOW_NICE, lower_priority


async def run_one(engine: GenerationEngine, request: GenerationRequest) -> list[Report]:
    reports: list[Report] = []
    finished = asyncio.Event()

    def sink(report: Report) -> None:
        reports.append(report)
        if isinstance(report, Terminal):
            finished.set()

    engine.submit(GenerationJob("s", request, sink))
    await asyncio.wait_for(finished.wait(), 60)
    return reports


async def test_a_jobs_sink_hears_its_run_in_order() -> None:
    engine = GenerationEngine("tiny")
    await engine.start()
    try:
        reports = await run_one(engine, GenerationRequest("pad", seconds=1.0, steps=3))
    finally:
        await engine.stop()
    kinds = [type(r) for r in reports]
    progress = [r for r in reports if isinstance(r, Progress)]
    blocks = [r.block for r in reports if isinstance(r, Audio)]
    assert reports[:2] == [Queued(1), Started()]
    assert kinds == [Queued, Started, *[Progress] * 3, *[Audio] * len(blocks), Done]
    assert [(p.step, p.steps) for p in progress] == [(1, 3), (2, 3), (3, 3)]
    # A short first block (0.25 s), so that audio starts early, then blocks twice as long.
    assert [b.last for b in blocks] == [False, False, True]
    assert [len(b.audio) for b in blocks] == [4_000, 8_000, 4_000]
    assert [b.start for b in blocks] == [0, 4_000, 12_000]
    assert sum(len(b.audio) for b in blocks) == 16_000
    assert "total_s" in reports[-1].timings


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
    assert isinstance(free, Done) and isinstance(yielding, Done)
    assert free.timings["paused_for_analysis_s"] == 0
    # Paused before each step and each vocoder block, at most MAX_YIELD_S each: it still ends.
    assert yielding.timings["paused_for_analysis_s"] > 1.0
    assert engine.counts["done"] == 2 and engine.stats()["queued"] == 0


def thread_priorities(pid: int) -> set[tuple[int, int]]:
    """(scheduling policy, nice) of every thread of process `pid`, read back from the kernel."""
    tids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    return {(os.sched_getscheduler(t), os.getpriority(os.PRIO_PROCESS, t)) for t in tids}


@pytest.mark.parametrize("priority", ["idle", "low", "normal"])
async def test_the_worker_runs_at_the_priority_asked(priority: str) -> None:
    engine = GenerationEngine("tiny", priority=priority)
    await engine.start()
    try:
        # After a job, so that every thread torch starts exists and is checked too.
        done = (await run_one(engine, GenerationRequest("pad", seconds=0.5, steps=2)))[-1]
        seen = thread_priorities(engine._process.pid)
    finally:
        await engine.stop()
    assert isinstance(done, Done)  # generation still ends, at any priority, on a quiet machine
    ours = (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))
    expected = {
        "idle": (os.SCHED_IDLE, ours[1]),  # (SCHED_IDLE ignores nice; it is left as it was)
        "low": (os.SCHED_OTHER, max(LOW_NICE, ours[1])),
        "normal": ours,
    }[priority]
    assert seen == {expected}


def lower_priority_refused_idle() -> tuple[str, int, int]:
    """In a throwaway process: lower_priority("idle") where SCHED_IDLE is refused."""

    def refuse(*args: object) -> None:
        raise PermissionError("refused")

    os.sched_setscheduler = refuse  # type: ignore[assignment]
    applied = lower_priority("idle")
    return applied, os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)


def test_lower_priority_falls_back_to_nice_where_sched_idle_is_refused() -> None:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        applied, policy, nice = pool.submit(lower_priority_refused_idle).result(timeout=60)
    assert (applied, policy, nice) == ("low", os.SCHED_OTHER, LOW_NICE)
    with pytest.raises(ValueError, match="priority must be one of"):
        lower_priority("high")
