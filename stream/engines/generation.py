"""The generation engine: one worker process shared by every session, and a bounded job queue.

Sessions `submit` jobs (jobs.py); the engine hands them to the worker one at a time, oldest
first, and passes what the worker reports back to each job's `sink` on the event loop, as the
reports of reports.py: Queued, Started, Progress, Audio, then exactly one Terminal (Done,
Cancelled, Failed).

Policy: a session has at most one job waiting in each lane (clips; the segments of a continuous
stream): a newer one supersedes it (the older is cancelled with reason "superseded"); together
with one-at-a-time running, the queue takes sessions in turn, so two sessions generating share
the worker fairly. A full queue refuses with EngineBusy.
Analysis has priority: the worker runs at a lower CPU priority (`priority`: worker.py's
lower_priority), and while `busy()` says analysis is behind it also pauses between steps.
A worker that dies is started again; one that reports nothing for `stall_timeout` seconds
during a job (a hung model call) is killed and started again. Its running job is retried (its
sink hears Retrying and the job goes to the head of the queue) while it has attempts left and
has sent no audio yet (a retry would send a clip's start twice); otherwise it fails with
"worker_crashed" or "worker_stalled".

Restarts never give up: a restart that fails (the new worker killed while it loads, a load that
errors or times out) is tried again after RESTART_DELAY_S, doubling up to RESTART_DELAY_MAX_S,
until one succeeds or the engine stops, so generation comes back on its own once the cause goes
and no server restart is needed. While the first attempt runs, jobs wait in the queue (most
crashes are one-offs, and they run as soon as the worker is back); once an attempt has failed,
the engine says so honestly: `available` is False, waiting jobs fail with
"generator_unavailable" and `submit` refuses, until a later attempt succeeds. `stats()` shows
"restarting" and "restart_failures"; /readyz is 503 throughout. At most one restart runs at a
time, and `stop()` cancels one in progress, killing a worker it had half started.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from stream.engines.jobs import EngineBusy, GenerationJob, GeneratorUnavailable
from stream.engines.reports import (
    Audio,
    CancelJob,
    Cancelled,
    Done,
    Failed,
    FromWorker,
    GeneratorInfo,
    JobReport,
    LoadFailed,
    Progress,
    Queued,
    Retrying,
    RunJob,
    Started,
    Stopped,
    StopWorker,
    Terminal,
    ToWorker,
    WorkerReady,
)
from stream.engines.worker import Loader, load_pipeline, serve
from stream.metrics import Metrics

log = logging.getLogger(__name__)
BUSY_POLL_S = 0.02
# A worker that will not start is tried again forever, so that generation comes back on its own
# once the cause (a kill, memory pressure, a driver hiccup) has gone. The wait doubles after each
# failure so that a cause that persists costs one model load (seconds of CPU next to analysis,
# the model's memory) at most every RESTART_DELAY_MAX_S, not a busy loop; the first wait is short
# because most failures are one-offs.
RESTART_DELAY_S = 0.5
RESTART_DELAY_MAX_S = 30.0


class GenerationEngine:
    def __init__(
        self,
        generator: str,
        threads: int | None = 1,  # None: the loader runs no model in the worker (Ray's)
        bf16: bool | None = None,
        queue_size: int = 8,
        busy: Callable[[], bool] = lambda: False,
        loader: Loader = load_pipeline,
        start_timeout: float = 600.0,
        stall_timeout: float = 120.0,
        attempts: int = 2,
        metrics: Metrics | None = None,
        restart_delay: float = RESTART_DELAY_S,
        restart_delay_max: float = RESTART_DELAY_MAX_S,
        priority: str = "idle",  # the worker's CPU priority: idle | low | normal (worker.py)
    ) -> None:
        self.generator = generator
        self.threads, self.bf16, self.queue_size = threads, bf16, queue_size
        self.priority = priority
        self.info: GeneratorInfo | None = None  # once the worker is up
        self._busy, self._loader, self._start_timeout = busy, loader, start_timeout
        self._stall_timeout = stall_timeout
        self.attempts = attempts
        self._restart_delay, self._restart_delay_max = restart_delay, restart_delay_max
        self._last_report = 0.0  # loop time of the worker's last message about a job
        self._stalled = False
        self._queue: deque[GenerationJob] = deque()
        self._running: GenerationJob | None = None
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._ctx = mp.get_context("spawn")  # the server has threads: never fork it
        self._busy_flag = self._ctx.Value("b", 0, lock=False)
        self._conn: Connection | None = None
        self._process: Any = None
        self._starting: Any = None  # a worker process started but not yet ready
        self._tasks: list[asyncio.Task[None]] = []
        self._respawning: asyncio.Task[None] | None = None  # the one restart loop, while it runs
        self._closing = False
        # False until started, and from a failed restart attempt until one succeeds.
        self.available = False
        self.counts = {
            "submitted": 0, "done": 0, "cancelled": 0, "failed": 0, "restarts": 0, "retried": 0,
            "restart_failures": 0,
        }  # fmt: skip
        self.metrics = metrics  # generation durations

    # --- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._spawn()
        self._tasks = [
            asyncio.create_task(self._dispatch(), name="generation-dispatch"),
            asyncio.create_task(self._watch_busy(), name="generation-busy"),
            asyncio.create_task(self._watch_stalls(), name="generation-stalls"),
        ]

    async def stop(self) -> None:
        self._closing = True
        tasks = [*self._tasks, *([self._respawning] if self._respawning is not None else [])]
        for task in tasks:
            task.cancel()  # a restart in progress kills the worker it was starting
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in [*self._queue, *([self._running] if self._running else [])]:
            self._finish(job, Cancelled("server_shutdown"))
        self._queue.clear()
        await self._stop_worker()

    async def _spawn(self) -> None:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=serve,
            args=(child, self.generator, self.threads, self.bf16, self._busy_flag, self._loader),
            kwargs={"priority": self.priority},
            name="grym-generation",
            daemon=True,
        )
        self._starting = process
        try:
            process.start()
            child.close()
            try:
                first: WorkerReady | LoadFailed = await asyncio.wait_for(
                    asyncio.to_thread(_recv, parent), self._start_timeout
                )
            except (TimeoutError, EOFError, OSError) as exc:
                raise GeneratorUnavailable(f"the generation worker did not start: {exc!r}") from exc
            if isinstance(first, LoadFailed):
                why = first.message
                raise GeneratorUnavailable(f"the generator {self.generator!r} did not load: {why}")
        except BaseException:
            # Failed, or cancelled by stop(): no half-started worker may outlive this. (The pipe
            # is left to the garbage collector: a reader thread may still be blocked on it.)
            await _reap(process)
            raise
        finally:
            self._starting = None
        self.info = first.info
        self._conn, self._process = parent, process
        self.available = True
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=self._read, args=(parent, loop), name="generation-reader", daemon=True
        ).start()

    async def _stop_worker(self) -> None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            try:
                async with self._send_lock:
                    await asyncio.to_thread(conn.send, StopWorker())
            except (OSError, ValueError):
                pass
        if process is not None:
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 5)
        if conn is not None:
            conn.close()

    # --- what sessions call -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """The worker is up now (False while a crashed one is being started again)."""
        return self._conn is not None

    def describe(self) -> dict[str, Any]:
        return asdict(self.info) if self.info is not None else {}

    @property
    def restarting(self) -> bool:
        """A crashed worker is being started again (attempts, and the waits between them)."""
        return self._respawning is not None and not self._respawning.done()

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "queued": len(self._queue),
            "running": self._running is not None,
            "available": self.available,
            "restarting": self.restarting,
        }

    def submit(self, job: GenerationJob) -> None:
        """Queue `job`, superseding the session's waiting one in its lane; EngineBusy when full,
        GeneratorUnavailable while the worker is down after a failed restart attempt."""
        if not self.available:
            failures = self.counts["restart_failures"]
            raise GeneratorUnavailable(
                f"the generation worker is down; starting it again ({failures} failed attempts)"
            )
        for waiting in [j for j in self._queue if (j.session, j.lane) == (job.session, job.lane)]:
            self._queue.remove(waiting)
            self._finish(waiting, Cancelled("superseded"))
        if len(self._queue) >= self.queue_size:
            raise EngineBusy(f"{self.queue_size} generations are already waiting")
        self._queue.append(job)
        self.counts["submitted"] += 1
        job.sink(Queued(len(self._queue)))  # 1 = next to run
        self._wake.set()

    async def cancel(self, job: GenerationJob, reason: str = "client") -> None:
        """Cancel a waiting job now, or a running one at its next step."""
        if job in self._queue:
            self._queue.remove(job)
            self._finish(job, Cancelled(reason))
        elif job is self._running and not job.finished:
            job.cancel_reason = reason
            job.cancelling = True
            await self._send(CancelJob(job.id))

    async def cancel_session(self, session: str, reason: str) -> None:
        for job in [j for j in self._queue if j.session == session]:
            await self.cancel(job, reason)
        if self._running is not None and self._running.session == session:
            await self.cancel(self._running, reason)

    # --- internals ------------------------------------------------------------------------

    async def _send(self, message: ToWorker) -> None:
        # Off the loop (a job with source audio is large), one message at a time on the pipe.
        conn = self._conn
        if conn is None:
            return
        async with self._send_lock:
            try:
                await asyncio.to_thread(conn.send, message)
            except (OSError, ValueError):
                pass  # the worker is gone; the reader reports it

    async def _dispatch(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._running is None and self._queue and self._conn is not None:
                job = self._queue.popleft()
                self._running = job
                job.state = "running"
                self._last_report = asyncio.get_running_loop().time()
                await self._send(RunJob(job.id, job.request, job.traceparent, job.pause_budget_s))

    async def _watch_stalls(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self._stall_timeout / 4))
            quiet = loop.time() - self._last_report
            if self._running is not None and self._process is not None and not self._stalled:
                if quiet > self._stall_timeout:
                    log.error("the generation worker said nothing for %.0f s: killing it", quiet)
                    self._stalled = True
                    self._process.kill()  # the reader sees the pipe close: _worker_died

    async def _watch_busy(self) -> None:
        while True:
            self._busy_flag.value = 1 if self._busy() else 0
            await asyncio.sleep(BUSY_POLL_S)

    def _read(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        """Reader thread: every message from the worker, handed to the loop in order, then None
        once the pipe closes (the worker exited)."""
        while True:
            try:
                message: FromWorker | None = conn.recv()
            except (EOFError, OSError):
                message = None
            try:
                loop.call_soon_threadsafe(self._on_message, conn, message)
            except RuntimeError:  # the loop is closed: the server is gone
                return
            if message is None:
                return

    def _on_message(self, conn: Connection, message: FromWorker | None) -> None:
        if message is None:
            if conn is self._conn and not self._closing:
                self._worker_died()
            return
        job = self._running
        if not isinstance(message, JobReport) or job is None or job.id != message.job_id:
            return  # a late report about a job already settled
        self._last_report = asyncio.get_running_loop().time()
        match message.report:
            case Started() | Progress() as report:
                job.sink(report)
            case Audio() as report:
                job.streamed = True
                job.sink(report)
            case Done(timings) as report:
                if self.metrics is not None:
                    for stage in ("first_audio_s", "total_s"):
                        if stage in timings:
                            seconds = timings[stage]
                            self.metrics.generation_seconds.labels(stage[:-2]).observe(seconds)
                self._finish(job, report)
            case Stopped():
                self._finish(job, Cancelled(job.cancel_reason))
            case Failed() as report:
                self._finish(job, report)

    def _finish(self, job: GenerationJob, report: Terminal) -> None:
        if job.finished:
            return
        job.state = report.outcome
        self.counts[report.outcome] += 1
        if job is self._running:
            self._running = None
            self._wake.set()
        job.sink(report)

    def _worker_died(self) -> None:
        code = self._process.exitcode if self._process is not None else None
        log.error("the generation worker exited (code %s); starting it again", code)
        job = self._running
        if job is not None:
            if self._stalled:
                failure = Failed("worker_stalled", f"the generation worker hung on this job for "
                                 f"over {self._stall_timeout:g} s and was restarted")  # fmt: skip
            else:
                failure = Failed("worker_crashed", f"the generation worker exited (code {code}) "
                                 "during this job")  # fmt: skip
            if job.attempt < self.attempts and not (job.streamed or job.cancelling):
                job.attempt += 1
                job.state = "queued"
                self._running = None
                self._queue.appendleft(job)  # first in line once the worker is back
                self.counts["retried"] += 1
                job.sink(Retrying(job.attempt, failure.code, failure.message))
            else:
                self._finish(job, failure)
        self._stalled = False
        dead = self._process
        self._conn = self._process = None
        self.counts["restarts"] += 1
        if not self.restarting:  # (one loop at a time: it ends once a worker is up)
            self._respawning = asyncio.create_task(self._respawn(dead), name="generation-respawn")

    async def _respawn(self, dead: Any) -> None:
        """Start the worker again until one starts (module docstring); cancelled by stop()."""
        if dead is not None:
            await _reap(dead)
        delay, failures = self._restart_delay, 0
        while not self._closing:
            try:
                await self._spawn()
            except GeneratorUnavailable as exc:
                failures += 1
                self.counts["restart_failures"] += 1
                log.error(
                    "the generation worker could not be started again (%s); next try in %g s",
                    exc, delay,
                )  # fmt: skip
                # Failed once: stop promising that waiting jobs will run (submit refuses new ones).
                self.available = False
                why = "the generation worker could not be started again; the server keeps trying"
                for job in list(self._queue):
                    self._finish(job, Failed("generator_unavailable", why))
                self._queue.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._restart_delay_max)
                continue
            if failures:
                log.warning("the generation worker is back after %d failed restarts", failures)
            self.available = True
            self._wake.set()
            return


async def _reap(process: Any) -> None:
    """Kill `process` if it still runs and wait for it, off the loop: no orphan, no zombie."""
    if process.pid is None:  # never started
        return
    process.kill()
    await asyncio.to_thread(process.join, 5)


def _recv(conn: Connection) -> Any:
    return conn.recv()
