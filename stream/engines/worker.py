"""The generation worker process: loads the generator once, then runs one job at a time.

It talks to the engine (generation.py) over one duplex pipe, in the messages of reports.py: it
answers its start with WorkerReady or LoadFailed, then takes RunJob, CancelJob and StopWorker and
reports each job as JobReport(job_id, Started | Progress | Audio | Done | Stopped | Failed).

At each step boundary (between denoising steps and vocoder blocks) it takes in any cancel from
the pipe and, unless cancelled, yields to analysis: while the shared `analysis_busy` flag is up,
it waits (up to MAX_YIELD_S per boundary) so that analysis, which has priority, gets the cores.
A separate process: a hung or crashed generator cannot take the server's event loop or analysis
with it, and torch's thread settings stay its own.

With tracing on (--otel-endpoint), a RunJob carries its job's span as W3C `traceparent`: the
worker makes no spans of its own, but every log record made in it while the job runs (the
generator's included) carries it as `record.traceparent`, and a failure's log line names it,
so a job's logs can be found from its trace.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from typing import Any, Protocol

from models.generation import AudioBlock, Callbacks, GenerationCancelled, GenerationRequest
from stream.engines.reports import (
    Audio,
    CancelJob,
    Done,
    Failed,
    GeneratorInfo,
    JobReport,
    LoadFailed,
    Progress,
    RunJob,
    Started,
    Stopped,
    StopWorker,
    ToWorker,
    WorkerReady,
    WorkerReport,
)

log = logging.getLogger(__name__)
MAX_YIELD_S = 2.0  # longest pause per boundary while analysis is behind: generation still ends
YIELD_POLL_S = 0.01
# The running job's `traceparent` (None between jobs, or with tracing off): see trace_log_records.
_job_trace: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_trace", default=None)


class Generator(Protocol):
    def generate(
        self, request: GenerationRequest, callbacks: Callbacks | None
    ) -> Iterator[AudioBlock]: ...


Loader = Callable[[str, bool | None], tuple[Generator, GeneratorInfo]]


def load_pipeline(
    name: str, bf16: bool | None, device: str = "cpu"
) -> tuple[Generator, GeneratorInfo]:
    """The real loader: an AudioLDM pipeline for preset/folder/hub id `name`, and its labels;
    `device` cuda: on the GPU, in fp16 (the Ray generation replicas given one)."""
    from models.audioldm import AudioLDM
    from models.audioldm_components import load_generator

    components = load_generator(name)
    pipeline = AudioLDM(components, bf16=bf16, device=device)
    return pipeline, GeneratorInfo(components.name, components.trained, components.note,
                                   pipeline.bf16, device)  # fmt: skip


def serve(
    conn: Connection,
    name: str,
    threads: int | None,
    bf16: bool | None,
    analysis_busy: Synchronized,
    loader: Loader = load_pipeline,
) -> None:
    """The worker's main: load, warm up, answer jobs until told to stop or the pipe closes.
    `threads`: torch's threads here; None for a loader that runs no model in this process
    (Ray's: stream/engines/ray/generator.py), which then never imports torch."""
    if threads is not None:
        # torch's OpenMP threads spin while idle; next to ONNX Runtime's analysis threads on
        # the same cores that spinning starves both (measured: 20x slower steps with 2 + 2
        # threads on 2 cores). Passive waiting costs a little latency per parallel region.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        torch.set_num_threads(threads)
    trace_log_records()
    try:
        pipeline, info = loader(name, bf16)
        warm = GenerationRequest("warm-up", seconds=0.5, steps=1)
        for _ in pipeline.generate(warm, None):  # first-run costs (allocations, kernels) now
            pass
    except Exception as exc:  # noqa: BLE001 - reported to the engine, which refuses to start
        conn.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(WorkerReady(info))
    while True:
        try:
            message: ToWorker = conn.recv()
        except (EOFError, OSError):
            return  # the server went away
        match message:
            case StopWorker():
                return
            case RunJob():
                if not _run(conn, pipeline, message, analysis_busy):
                    return


def trace_log_records() -> None:
    """From now on, each log record of this process carries the running job's `traceparent`
    (None outside a job)."""
    make = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made = make(*args, **kwargs)
        made.traceparent = _job_trace.get()
        return made

    logging.setLogRecordFactory(record)


def _run(conn: Connection, pipeline: Generator, job: RunJob, busy: Synchronized) -> bool:
    """One job, start to end; False when a StopWorker came during it."""
    cancelled = stop = False
    paused = 0.0  # seconds yielded to analysis

    def at_step_boundary() -> bool:
        """The generator's `cancelled` hook: take in cancels, then, unless cancelled, yield to
        analysis. True stops the job here."""
        nonlocal cancelled, stop, paused
        while conn.poll():
            match conn.recv():
                case CancelJob(job_id=job_id) if job_id == job.job_id:
                    cancelled = True
                case StopWorker():
                    cancelled = stop = True
        if not cancelled:
            paused += yield_to_analysis(busy)
        return cancelled

    def send(report: WorkerReport) -> None:
        conn.send(JobReport(job.job_id, report))

    def progress(step: int, steps: int) -> None:
        send(Progress(step, steps))

    traced = _job_trace.set(job.traceparent)
    send(Started())
    try:
        timings: dict[str, Any] = {}
        for block in pipeline.generate(job.request, Callbacks(progress, at_step_boundary)):
            send(Audio(block))
            timings = block.timings or timings
        send(Done({**timings, "paused_for_analysis_s": paused}))
    except GenerationCancelled:
        send(Stopped())
    except Exception as exc:  # noqa: BLE001 - one job's failure is reported, the worker goes on
        trace = f" (traceparent {job.traceparent})" if job.traceparent else ""
        log.exception("generation %s failed%s", job.job_id, trace)
        send(Failed("generation_failed", f"{type(exc).__name__}: {exc}"))
    finally:
        _job_trace.reset(traced)
    return not stop


def yield_to_analysis(busy: Synchronized) -> float:
    """Sleep while analysis is behind (the engine raises `busy`) so that it gets the cores, for
    up to MAX_YIELD_S; the seconds slept."""
    waited = 0.0
    while busy.value and waited < MAX_YIELD_S:
        time.sleep(YIELD_POLL_S)
        waited += YIELD_POLL_S
    return waited
