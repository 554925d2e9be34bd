"""The shared analysis engine: the only place where analysis models run.

Sessions `await engine.analyse(window)`; one consumer task takes whatever windows are waiting
(from any number of sessions, up to `max_batch`), runs every analyser on the batch in a
dedicated executor thread, and resolves each window's future. The event loop never runs model
code, and the queue is bounded: when it is full, `analyse` waits (sessions hold their own
bounded backlogs in front of it, so this is a second line of back-pressure, not the policy).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from models.base import Analyser, AnalysisWindow

log = logging.getLogger(__name__)


class AnalysisFailed(RuntimeError):
    """An analyser raised on the batch holding this window."""


@dataclass
class _Job:
    window: AnalysisWindow
    future: asyncio.Future[dict[str, Any]]


class AnalysisEngine:
    def __init__(
        self, analysers: Sequence[Analyser], max_batch: int = 16, queue_size: int = 256
    ) -> None:
        if not analysers:
            raise ValueError("at least one analyser is needed")
        self.analysers = list(analysers)
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(queue_size)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="analysis")
        self._consumer: asyncio.Task[None] | None = None
        self.batches = 0  # counters for /healthz and the benchmarks
        self.windows = 0

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.analysers]

    async def start(self) -> None:
        if self._consumer is None:
            self._consumer = asyncio.create_task(self._consume(), name="analysis-engine")

    async def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            await asyncio.gather(self._consumer, return_exceptions=True)
            self._consumer = None
        while not self._queue.empty():
            self._queue.get_nowait().future.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def analyse(self, window: AnalysisWindow) -> dict[str, Any]:
        """All analysers' results for one window, merged into one dict of event fields."""
        if self._consumer is None:
            raise RuntimeError("analysis engine is not running")
        job = _Job(window, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # A session that went away cancelled its future: don't spend compute on it.
            batch = [job for job in batch if not job.future.done()]
            if not batch:
                continue
            windows = [job.window for job in batch]
            try:
                merged = await loop.run_in_executor(self._executor, self._run_all, windows)
            except Exception as exc:  # an analyser bug must fail these windows, not the engine
                log.exception("analysis batch of %d failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(AnalysisFailed(f"{type(exc).__name__}: {exc}"))
                continue
            self.batches += 1
            self.windows += len(batch)
            for job, fields in zip(batch, merged):
                if not job.future.done():
                    job.future.set_result(fields)

    def _run_all(self, windows: list[AnalysisWindow]) -> list[dict[str, Any]]:
        """Runs in the engine's executor thread."""
        merged: list[dict[str, Any]] = [{} for _ in windows]
        for analyser in self.analysers:
            results = analyser.analyse(windows)
            if len(results) != len(windows):
                raise RuntimeError(f"{analyser.name} returned {len(results)} for {len(windows)}")
            for fields, result in zip(merged, results):
                fields.update(result.to_event())
        return merged
