"""Retry policies for model calls: unit, engine, and a real server whose model misbehaves."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest

from clients.stream_client import StreamClient
from models.base import Analyser, AnalysisResult
from models.dsp import DspAnalyser
from stream.engines.analysis import AnalysisEngine, AnalysisFailed
from stream.retry import RetryPolicy, call_with_retry
from tests.conftest import ArrayWindow, run_server
from tests.test_generation_server import blocks


async def test_call_with_retry_tries_waits_and_gives_up() -> None:
    calls: list[float] = []
    failures: list[tuple[int, str]] = []

    async def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ValueError(f"attempt {len(calls)}")
        return "ok"

    policy = RetryPolicy(attempts=3, backoff_seconds=0.05, timeout_seconds=1.0)
    result = await call_with_retry(policy, flaky, lambda n, e: failures.append((n, str(e))))
    assert result == "ok" and failures == [(1, "attempt 1"), (2, "attempt 2")]
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1  # doubling backoff

    async def hangs() -> None:
        await asyncio.sleep(10)

    failures.clear()
    with pytest.raises(TimeoutError):
        quick = RetryPolicy(attempts=2, backoff_seconds=0, timeout_seconds=0.05)
        await call_with_retry(quick, hangs, lambda n, e: failures.append((n, type(e).__name__)))
    assert failures == [(1, "TimeoutError"), (2, "TimeoutError")]


@dataclass
class _Result(AnalysisResult):
    fields: dict[str, Any]

    def to_event(self) -> dict[str, Any]:
        return self.fields


class MisbehavingModel(Analyser):
    """A model whose calls number `fail` raise and whose calls number `hang` hang for a while."""

    name = "flaky"
    sample_rate = 16_000

    def __init__(self, fail: set[int] | None = None, hang: set[int] | None = None,
                 fail_always: bool = False) -> None:  # fmt: skip
        self.fail, self.hang, self.fail_always = fail or set(), hang or set(), fail_always
        self.calls = 0
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def analyse(self, windows: Sequence[Any]) -> list[_Result]:
        with self._lock:
            self.calls += 1
            call = self.calls
        self.threads.add(threading.get_ident())
        if self.fail_always or call in self.fail:
            raise RuntimeError(f"the model broke on call {call}")
        if call in self.hang:
            time.sleep(1.5)
        return [_Result({"flaky": {"call": call, "start": w.audio_start}}) for w in windows]

    def release(self, stream: str) -> None:
        pass


def window(i: int = 0) -> ArrayWindow:
    return ArrayWindow(np.zeros(16_000, np.float32), 0, 16_000, audio_start=i * 16_000)


async def engine_for(model: MisbehavingModel, policy: RetryPolicy) -> AnalysisEngine:
    engine = AnalysisEngine(model, max_batch=1, retry=policy)
    await engine.start()
    return engine


async def test_a_failing_batch_is_retried_and_then_succeeds() -> None:
    model = MisbehavingModel(fail={1})
    engine = await engine_for(model, RetryPolicy(attempts=2, backoff_seconds=0.01))
    try:
        fields = (await engine.analyse(window())).fields
    finally:
        await engine.stop()
    assert fields == {"flaky": {"call": 2, "start": 0}}
    assert (engine.retries, engine.restarts) == (1, 0)


async def test_a_hung_batch_gets_a_fresh_worker() -> None:
    model = MisbehavingModel(hang={1})
    policy = RetryPolicy(attempts=2, backoff_seconds=0.0, timeout_seconds=0.3)
    engine = await engine_for(model, policy)
    try:
        started = time.monotonic()
        fields = (await engine.analyse(window())).fields
        waited = time.monotonic() - started
    finally:
        await engine.stop()
    assert fields["flaky"]["call"] == 2 and waited < 1.5  # did not wait for the hung call
    assert engine.restarts == 1 and len(model.threads) == 2  # the retry ran on a new thread


async def test_a_batch_that_keeps_failing_fails_its_windows_only() -> None:
    model = MisbehavingModel(fail_always=True)
    engine = await engine_for(model, RetryPolicy(attempts=3, backoff_seconds=0.0))
    try:
        with pytest.raises(AnalysisFailed, match="broke on call 3"):
            await engine.analyse(window())
        model.fail_always = False
        assert (await engine.analyse(window(1))).fields["flaky"]["start"] == 16_000  # goes on
    finally:
        await engine.stop()
    assert model.calls == 4 and engine.retries == 2


async def test_sessions_ride_out_a_flaky_model_and_hear_of_a_broken_one() -> None:
    flaky = MisbehavingModel(fail={2, 5}, hang={8})
    settings = {"analysis_attempts": 2, "analysis_timeout_seconds": 0.5,
                "analysis_backoff_seconds": 0.0, "analysis_batch_max": 1}  # fmt: skip
    with run_server(analysers=lambda s: [DspAnalyser(), flaky], **settings) as running:
        clients = [StreamClient(running.ws, 16_000, 1, config={"when_behind": "wait"})
                   for _ in range(2)]  # fmt: skip
        results = await asyncio.gather(*(c.run(blocks(4.0)) for c in clients))
        async with httpx.AsyncClient(base_url=running.http) as http:
            metrics = (await http.get("/metrics")).text
        # Every chunk of both sessions analysed by both models, no error: the retries hid it.
        for result in results:
            assert len(result.analysis) == 4 and not result.errors
            assert all("flaky" in e and "features" in e for e in result.analysis)
        assert 'grym_model_failures_total{kind="error",step="flaky",then="retried"} 2.0' in metrics
        assert 'grym_model_failures_total{kind="timeout",step="flaky",then="retried"} 1.0' in (
            metrics
        )
        # A model that stays broken: each chunk's error says so, the other model goes on.
        flaky.fail_always = True
        result = await StreamClient(running.ws, 16_000, 1).run(blocks(2.0))
        assert len(result.analysis) == 2 and all("flaky" not in e for e in result.analysis)
        assert [e["code"] for e in result.errors] == ["analysis_failed"] * 2
        assert result.end is not None and result.close_code == 1000
