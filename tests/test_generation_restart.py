"""A generation worker that dies while it is being started again: the engine keeps trying, says
honestly that it is down meanwhile, and comes back. Real worker processes (tiny preset), killed
for real with SIGKILL; the server-level test goes through a real server and WebSocket."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time
from typing import Any

import httpx
import pytest

from models.generation import GenerationRequest
from stream.engines.generation import GenerationEngine
from stream.engines.jobs import GenerationJob, GeneratorUnavailable
from stream.engines.reports import Done, Failed, Report
from tests.conftest import run_server
from tests.test_generation_engine import run_one
from tests.test_generation_server import kinds, stream

WAIT_S = 60.0  # generous bounds for a loaded 2-core machine; the tests end as soon as they can


def slow_loader(name: str, bf16: bool | None) -> Any:
    """The real tiny pipeline, a little slower to load: a window in which to kill a worker that
    is still loading, whatever the machine's speed."""
    from stream.engines.worker import load_pipeline

    time.sleep(0.5)
    return load_pipeline(name, bf16)


def workers() -> dict[int, Any]:
    """This process's live generation workers by pid, those still loading too (found from the
    outside, the way an operator's `kill` would)."""
    return {p.pid: p for p in mp.active_children() if p.name == "grym-generation"}


async def until(condition: Any, what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return value


async def kill(pid: int, replaced: bool = True) -> Any:
    """SIGKILL the worker `pid`; the worker started in its place (still loading, it is slow)."""
    known = set(workers())
    os.kill(pid, signal.SIGKILL)
    if not replaced:
        return None
    return await until(
        lambda: next((w for p, w in workers().items() if p not in known), None),
        "a new worker to be started",
    )


async def test_a_worker_killed_while_it_restarts_comes_back() -> None:
    engine = GenerationEngine("tiny", loader=slow_loader)
    await engine.start()
    try:
        first = engine._process
        second = await kill(first.pid)
        # The first restart attempt is under way: a job still waits for the worker.
        heard: list[Report] = []
        request = GenerationRequest("pad", seconds=0.5, steps=2)
        assert engine.available and engine.stats()["restarting"]
        engine.submit(GenerationJob("s", request, heard.append))
        # Killed while it loads: that attempt fails. The job fails, new ones are refused...
        third = await kill(second.pid)
        assert isinstance(heard[-1], Failed) and heard[-1].code == "generator_unavailable"
        assert not engine.available and not engine.running
        with pytest.raises(GeneratorUnavailable):
            engine.submit(GenerationJob("s", request, heard.append))
        stats = engine.stats()
        assert stats["restarting"] and stats["restart_failures"] == 1 and stats["restarts"] == 1
        # ... but the engine kept trying: the next attempt brings it back, and jobs run again.
        await until(lambda: engine.available and engine.running, "the worker to be back")
        assert engine._process is third and not first.is_alive() and not second.is_alive()
        assert isinstance((await run_one(engine, request))[-1], Done)
        stats = engine.stats()
        assert not stats["restarting"] and stats["restart_failures"] == 1
        assert stats["restarts"] == 1 and stats["done"] == 1
    finally:
        await engine.stop()
    assert not third.is_alive()


async def test_stop_during_the_wait_between_restart_attempts_leaves_no_worker() -> None:
    engine = GenerationEngine("tiny", loader=slow_loader, restart_delay=30.0)
    await engine.start()
    try:
        first = engine._process
        second = await kill(first.pid)
        await kill(second.pid, replaced=False)  # the engine waits 30 s before trying again
        await until(lambda: engine.stats()["restart_failures"] == 1, "the attempt to fail")
        assert engine.restarting and not engine.available
    finally:
        started = time.monotonic()
        await engine.stop()
    assert time.monotonic() - started < 5  # the wait was cancelled, not sat out
    assert not engine.restarting and not first.is_alive() and not second.is_alive()
    assert workers().keys().isdisjoint({first.pid, second.pid}) and engine._process is None


async def test_stop_while_a_restarted_worker_loads_kills_it() -> None:
    engine = GenerationEngine("tiny", loader=slow_loader)
    await engine.start()
    try:
        second = await kill(engine._process.pid)
    finally:
        await engine.stop()  # while `second` loads
    assert not engine.restarting and not second.is_alive()
    assert second.pid not in workers()


async def test_readyz_follows_a_worker_killed_while_it_restarts() -> None:
    with run_server(
        generator="tiny", analysis_model="none", generator_loader=slow_loader
    ) as server:  # fmt: skip
        engine = server.app.state.sessions.generator
        async with httpx.AsyncClient(base_url=server.http) as http:
            assert (await http.get("/readyz")).status_code == 200
            second = await kill(engine._process.pid)
            down = await http.get("/readyz")  # restarting: not ready, though jobs may wait
            assert down.status_code == 503 and down.json()["generation"]["restarting"]
            await kill(second.pid)
            await until(lambda: engine.stats()["restart_failures"] == 1, "the attempt to fail")
            down = await http.get("/readyz")
            assert down.status_code == 503
            assert down.json()["generator"] is False and down.json()["generation"] == {
                "available": False, "restarting": True, "restarts": 1, "restart_failures": 1,
            }  # fmt: skip
            deadline = time.monotonic() + WAIT_S
            while (ready := await http.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "the worker did not come back"
                await asyncio.sleep(0.1)
            assert ready.json()["generation"]["restarting"] is False
            health = (await http.get("/healthz")).json()["generation"]
            assert health["available"] and health["restart_failures"] == 1

        def ask(client: Any, event: dict[str, Any]) -> None:
            if event["type"] == "analysis" and event["seq"] == 0:
                message = {"type": "generate", "seconds": 1.0, "steps": 2}
                asyncio.ensure_future(client.send_control(message))

        _, result = await stream(server, 2.0, on_event=ask, realtime=True)
        assert kinds(result, 1)[-1] == "done", result.events
