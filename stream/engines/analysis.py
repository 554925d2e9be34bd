"""Analysis engines: the only place where analysis models run.

One engine per model, shared by every session. Sessions `await engine.analyse(window)`; one
consumer task takes the waiting windows (from any sessions, up to `max_batch`, waiting at most
`max_wait_ms` for a batch to fill), runs the model on the batch in one of the engine's own
`workers` executor threads, and resolves each window's future. While every worker is busy,
windows wait in the queue and form larger batches. The event loop never runs model code; engines of
different models run side by side on their own threads. The queue is bounded: when it is full,
`analyse` waits (sessions keep their own bounded backlogs in front, so this is a second line of
back-pressure, not the policy). Windows of sessions that send faster than real time wait in a
lane of their own behind live sessions' windows (`Lanes`).

Model calls follow a retry policy (stream/retry.py): a batch that raises or outlives its timeout
is run again after a backoff, and only then fails its windows (each session gets an
`analysis_failed` error event and goes on). A thread cannot be killed, so a call that timed out
leaves its executor behind: the engine starts a fresh one (a worker restart) and the stuck thread
is abandoned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from models.base import Analyser, AnalyserInfo, AnalysisResult, AnalysisWindow, CtcFrames
from stream.engines.ray.wire import RemoteResult, ReplicaTiming
from stream.metrics import Metrics
from stream.retry import RetryPolicy, call_with_retry

log = logging.getLogger(__name__)


class AnalysisFailed(RuntimeError):
    """The model raised on the batch holding this window."""


@dataclass(frozen=True)
class ChunkFields:
    """What one engine makes of one window: the event fields to send, and the CTC frames the
    session stitches into its transcript (never sent)."""

    fields: dict[str, Any]
    ctc: CtcFrames | None
    remote: ReplicaTiming | None = None  # the window's stay on a Ray Serve replica


@dataclass
class _Job:
    window: AnalysisWindow
    future: asyncio.Future[ChunkFields]
    queued_at: float = 0.0  # loop time the window joined the queue
    stamps: Stamps | None = None  # filled in for sessions that ask for timings
    live: bool = True  # from a session sending at about real time (else: bulk)


class Lanes:
    """The engine's bounded queue, in two lanes: windows of live sessions (audio arriving at
    about real time) are taken first, bulk ones (sessions sending faster than real time: a
    file, a flood) only when no live window waits. A batch that starts with a bulk window takes
    no other, so a live window waits at most for one bulk window's run: however fast some
    clients send, the sessions that are live keep their latency."""

    def __init__(self, maxsize: int) -> None:
        self._live: deque[_Job] = deque()
        self._bulk: deque[_Job] = deque()
        self._room = asyncio.Semaphore(maxsize)
        self._ready = asyncio.Event()

    async def put(self, job: _Job) -> None:
        await self._room.acquire()
        (self._live if job.live else self._bulk).append(job)
        self._ready.set()

    def get_nowait(self, live_only: bool = False) -> _Job | None:
        lane = self._live or (None if live_only else self._bulk)
        if not lane:
            return None
        self._room.release()
        return lane.popleft()

    async def get(self, live_only: bool = False) -> _Job:
        while (job := self.get_nowait(live_only)) is None:
            self._ready.clear()
            await self._ready.wait()
        return job

    def __len__(self) -> int:
        return len(self._live) + len(self._bulk)


@dataclass
class Stamps:
    """When a window passed each point of its engine (monotonic seconds): queued, taken from
    the queue into a batch, the batch closed and sent to a worker, the worker's results back
    on the loop; and the batch's size."""

    queued: float = 0.0
    picked: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    batch: int = 0
    remote: ReplicaTiming | None = None  # a remote analyser's: the window's stay on its replica


class AnalysisEngine:
    def __init__(
        self,
        analyser: Analyser,
        max_batch: int = 16,
        max_wait_ms: float = 0.0,
        queue_size: int = 256,
        workers: int = 1,
        retry: RetryPolicy | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.analyser = analyser
        self.name = analyser.name
        if Analyser not in type(analyser).__mro__:
            raise TypeError(
                f"analyser {self.name} must subclass models.base.Analyser (which gives the "
                "defaults for what it does not declare in `info`)"
            )
        self.info: AnalyserInfo = analyser.info
        # An analyser that runs windows one by one (int8 wav2vec2) gains nothing from a batch:
        # waiting for one would only delay, and a batch's windows would all wait for its last.
        self.max_batch = max_batch if self.info.batches else 1
        self.max_wait = max_wait_ms / 1000 if self.info.batches else 0.0
        self._queue = Lanes(queue_size)
        # Several workers suit models whose single run uses a core poorly (small ONNX Runtime
        # batches scale sub-linearly with intra-op threads); runs must then be thread-safe,
        # as ONNX Runtime's InferenceSession.run is.
        self.workers = workers
        self.retry = retry or RetryPolicy()
        self._executor = self._new_executor()
        self._free_workers = asyncio.Semaphore(workers)
        self._running: set[asyncio.Task[None]] = set()
        self._consumer: asyncio.Task[None] | None = None
        self.batches = 0  # counters for /healthz and the benchmarks
        self.windows = 0
        self.retries = 0
        self.restarts = 0
        self.metrics = metrics  # stage latencies, batch sizes

    @property
    def trained(self) -> bool:
        """False for a model with random weights (the `tiny-random` preset)."""
        return self.info.trained

    def describe(self) -> dict[str, Any]:
        """The model behind the engine, for `ready` events and /healthz."""
        described: dict[str, Any] = {"model": self.info.label or self.name, "trained": self.trained}
        if self.info.note:
            described["note"] = self.info.note
        if self.info.language_model is not None:
            described["language_model"] = self.info.language_model.describe()
        return described

    def stats(self) -> dict[str, Any]:
        """Work done so far, for /healthz and the benchmarks."""
        stats: dict[str, Any] = {
            "batches": self.batches, "windows": self.windows, "retries": self.retries,
            "restarts": self.restarts,
        }  # fmt: skip
        counts = self.analyser.frame_counts()
        if counts is not None and counts.windowed:
            # Encoder work with feature reuse: the fraction of frames computed.
            stats["encoded_fraction"] = round(counts.encoded / counts.windowed, 3)
        return stats

    async def start(self) -> None:
        if self._consumer is None:
            self._consumer = asyncio.create_task(self._consume(), name=f"engine-{self.name}")

    async def stop(self) -> None:
        if self._consumer is not None:
            for task in (self._consumer, *self._running):
                task.cancel()
            await asyncio.gather(self._consumer, *self._running, return_exceptions=True)
            self._consumer = None
        while (job := self._queue.get_nowait()) is not None:
            job.future.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
        await asyncio.to_thread(self.analyser.close)

    def release(self, stream: str) -> None:
        """A session ended: the model may drop per-stream state (cheap, thread-safe)."""
        self.analyser.release(stream)

    async def analyse(
        self, window: AnalysisWindow, stamps: Stamps | None = None, live: bool = True
    ) -> ChunkFields:
        """This model's fields for one window; `stamps`, if given, records its path. `live`:
        the window's session sends at about real time (Lanes: it goes first)."""
        if self._consumer is None:
            raise RuntimeError(f"analysis engine {self.name} is not running")
        loop = asyncio.get_running_loop()
        job = _Job(window, loop.create_future(), loop.time(), stamps, live)
        if stamps is not None:
            stamps.queued = time.monotonic()
        await self._queue.put(job)
        return await job.future

    async def _next_batch(self) -> list[_Job]:
        batch = [_picked(await self._queue.get())]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while batch[0].live and len(batch) < self.max_batch:  # (bulk windows run alone)
            if (job := self._queue.get_nowait(live_only=True)) is not None:
                batch.append(_picked(job))
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:  # wait a little for other sessions' chunks to join this batch
                job = await asyncio.wait_for(self._queue.get(live_only=True), remaining)
                batch.append(_picked(job))
            except TimeoutError:
                break
        # A session that went away cancelled its future: spend no compute on it.
        return [job for job in batch if not job.future.done()]

    async def _consume(self) -> None:
        while True:
            await self._free_workers.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._free_workers.release()
                raise
            if not batch:
                self._free_workers.release()
                continue
            task = asyncio.create_task(self._process(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def _process(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        _stamp(batch, "started", len(batch))
        try:
            windows = [job.window for job in batch]
            results = await call_with_retry(
                self.retry,
                lambda: loop.run_in_executor(self._executor, self._run, windows),
                lambda number, exc: self._failed_attempt(number, exc, len(windows)),
            )
            _stamp(batch, "finished", len(batch))
            if self.metrics is not None:
                latency = self.metrics.analysis_latency
                for job in batch:
                    latency.labels("queue", self.name).observe(started - job.queued_at)
                latency.labels("inference", self.name).observe(loop.time() - started)
                self.metrics.batch_size.labels(self.name).observe(len(batch))
        except Exception as exc:  # a model failure fails these windows, not the engine
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(AnalysisFailed(f"{type(exc).__name__}: {exc}"))
            return
        finally:
            self._free_workers.release()
        self.batches += 1
        self.windows += len(batch)
        for job, fields in zip(batch, results):
            if job.stamps is not None:
                job.stamps.remote = fields.remote
            if not job.future.done():
                job.future.set_result(fields)

    def _new_executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.workers, thread_name_prefix=f"analysis-{self.name}")

    def _failed_attempt(self, number: int, exc: Exception, size: int) -> None:
        last = number == self.retry.attempts
        if isinstance(exc, TimeoutError):
            # The call is still running on its thread and cannot be stopped: leave that
            # executor to it and carry on with a fresh one.
            log.error("%s: a batch of %d ran past %g s; restarting the worker",
                      self.name, size, self.retry.timeout_seconds)  # fmt: skip
            stuck, self._executor = self._executor, self._new_executor()
            stuck.shutdown(wait=False, cancel_futures=True)
            self.restarts += 1
        else:
            log.error("%s: a batch of %d failed (attempt %d of %d)", self.name, size, number,
                      self.retry.attempts, exc_info=exc)  # fmt: skip
        if not last:
            self.retries += 1
        if self.metrics is not None:
            kind = "timeout" if isinstance(exc, TimeoutError) else "error"
            then = "failed" if last else "retried"
            self.metrics.model_failures.labels(self.name, kind, then).inc()

    def _run(self, windows: list[AnalysisWindow]) -> list[ChunkFields]:
        """Runs in the engine's executor thread."""
        results = self.analyser.analyse(windows)
        if len(results) != len(windows):
            raise RuntimeError(f"{self.name} returned {len(results)} results for {len(windows)}")
        for result in results:
            if AnalysisResult not in type(result).__mro__:  # what declares `ctc`
                raise TypeError(f"{self.name} returned a {type(result).__name__}, which does "
                                "not subclass models.base.AnalysisResult")  # fmt: skip
        return [
            ChunkFields(
                result.to_event(),
                result.ctc,
                result.timing if isinstance(result, RemoteResult) else None,
            )
            for result in results
        ]


def _picked(job: _Job) -> _Job:
    if job.stamps is not None:
        job.stamps.picked = time.monotonic()
    return job


def _stamp(batch: list[_Job], point: str, size: int) -> None:
    now = time.monotonic()
    for job in batch:
        if job.stamps is not None:
            setattr(job.stamps, point, now)
            job.stamps.batch = size


async def start_engines(
    analysers: Sequence[Analyser],
    max_batch: int,
    max_wait_ms: float,
    workers: dict[str, int] | None = None,
    retry: RetryPolicy | None = None,
    metrics: Metrics | None = None,
) -> list[AnalysisEngine]:
    """One engine per analyser; `workers` by analyser name (default 1)."""
    workers = workers or {}
    engines = [
        AnalysisEngine(
            a,
            max_batch,
            max_wait_ms,
            workers=workers.get(a.name, 1),
            retry=retry,
            metrics=metrics,
        )  # fmt: skip
        for a in analysers
    ]
    for engine in engines:
        await engine.start()
    return engines
