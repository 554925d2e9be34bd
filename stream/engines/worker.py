"""The generation worker process: loads the generator once, then runs one job at a time.

It talks to the engine (generation.py) over one duplex pipe, in the messages of reports.py: it
answers its start with WorkerReady or LoadFailed, then takes RunJob, CancelJob and StopWorker and
reports each job as JobReport(job_id, Started | Progress | Audio | Done | Stopped | Failed).

Analysis has priority over generation, and the kernel enforces it: the worker lowers its own
scheduling priority first thing (`priority`, see lower_priority: SCHED_IDLE by default), so that
an analysis thread that wakes up takes a core from it at once, with no polling. At each step
boundary (between denoising steps and vocoder blocks) it also takes in any cancel from the pipe
and, unless cancelled, yields to analysis that has fallen behind: while the shared
`analysis_busy` flag is up, it waits (up to MAX_YIELD_S per boundary, and no more than the
job's `pause_budget_s` in all where it has one: a continuous stream's segments).
A separate process: a hung or crashed generator cannot take the server's event loop or analysis
with it, and torch's thread settings stay its own.

With tracing on (--otel-endpoint), a RunJob carries its job's span as W3C `traceparent`: the
worker makes no spans of its own, but every log record made in it while the job runs (the
generator's included) carries it as `record.traceparent`, and a failure's log line names it,
so a job's logs can be found from its trace.
"""

from __future__ import annotations

import contextvars
import ctypes
import logging
import os
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
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
# The worker's scheduling priority (--generation-priority): see lower_priority.
PRIORITIES = ("idle", "low", "normal")
LOW_NICE = 19  # "low": the weakest nice level (about 1.5% of a core against a nice-0 thread)
MAX_YIELD_S = 2.0  # longest pause per boundary while analysis is behind: generation still ends
YIELD_POLL_S = 0.01
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# The running job's `traceparent` (None between jobs, or with tracing off): see trace_log_records.
_job_trace: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_trace", default=None)


class Generator(Protocol):
    def generate(
        self, request: GenerationRequest, callbacks: Callbacks | None
    ) -> Iterator[AudioBlock]: ...


Loader = Callable[[str, bool | None], tuple[Generator, GeneratorInfo]]


def load_pipeline(
    name: str,
    bf16: bool | None,
    device: str = "cpu",
    *,
    compile_mode: str = "off",
    compile_seconds: tuple[float, ...] = (),
    cache_dir: str | None = None,
) -> tuple[Generator, GeneratorInfo]:
    """The real loader: an AudioLDM pipeline for preset/folder/hub id `name`, and its labels;
    `device` cuda: on the GPU, in fp16 (the Ray generation replicas given one). `compile_mode`,
    `compile_seconds`: Settings.generation_compile(_seconds); missing packages are compiled in
    the background while clips run eagerly."""
    from models.audioldm import AudioLDM, clip_shapes
    from models.audioldm_compiled import CompiledNetworks, wanted
    from models.audioldm_components import load_generator
    from models.export import default_cache_dir

    components = load_generator(name)
    pipeline = AudioLDM(components, bf16=bf16, device=device)
    if wanted(compile_mode, components, pipeline.bf16, device):
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        pipeline.compiled = CompiledNetworks(components, pipeline.bf16, cache)
        row = pipeline.vae_scale
        shapes = [s for seconds in compile_seconds for s in clip_shapes(seconds, row)]
        if missing := pipeline.compiled.missing(shapes):
            log.info("generator: compiling %s in the background (once per machine); clips run "
                     "eagerly until then", ", ".join(map(str, missing)))  # fmt: skip
            pipeline.compiled.compile_in_background(name, missing)
        # Load the packages there are, and pay every first-run cost (oneDNN's primitives for
        # the VAE's shapes too) now rather than in the first clip of each length: measured,
        # 15 s of vocoding in the first 5 s clip otherwise.
        for seconds in compile_seconds:
            for _ in pipeline.generate(GenerationRequest("warm-up", seconds=seconds, steps=1)):
                pass
    return pipeline, GeneratorInfo(components.name, components.trained, components.note,
                                   pipeline.bf16, device)  # fmt: skip


def serve(
    conn: Connection,
    name: str,
    threads: int | None,
    bf16: bool | None,
    analysis_busy: Synchronized,
    loader: Loader = load_pipeline,
    priority: str = "idle",
) -> None:
    """The worker's main: load, warm up, answer jobs until told to stop or the pipe closes.
    `threads`: torch's threads here; None for a loader that runs no model in this process
    (Ray's: stream/engines/ray/generator.py), which then never imports torch, and keeps its
    priority (it only relays the replicas' audio, which should not wait behind analysis).
    `priority`: of this process, one of PRIORITIES (lower_priority)."""
    if threads is not None:
        # First, before torch starts threads: they inherit the calling thread's policy.
        applied = lower_priority(priority)
        keep_freed_memory()
        # torch's OpenMP threads spin between parallel regions. At an ordinary priority that
        # spinning starves analysis next to it (measured: 20x slower steps with 2 + 2 threads
        # on 2 cores), so they wait passively there, which costs generation dearly (AudioLDM-S
        # UNet step 0.255 -> 0.398 s, in-process, 2 threads). SCHED_IDLE threads give way to
        # analysis the moment it wakes whether they spin or not: they may spin.
        if applied != "idle":
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
            budget = job.pause_budget_s
            left = MAX_YIELD_S if budget is None else min(MAX_YIELD_S, budget - paused)
            paused += yield_to_analysis(busy, left)
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


def yield_to_analysis(busy: Synchronized, longest: float = MAX_YIELD_S) -> float:
    """Sleep while analysis is behind (the engine raises `busy`) so that it gets the cores, for
    up to `longest` seconds; the seconds slept."""
    waited = 0.0
    while busy.value and waited < longest:
        time.sleep(YIELD_POLL_S)
        waited += YIELD_POLL_S
    return waited


def keep_freed_memory() -> None:
    """Have glibc's malloc keep what the networks free for their next call instead of handing
    it back to the kernel: every clip allocates the same large activations (16 MB tensors in
    the VAE), and fresh pages fault in one by one. Measured on AudioLDM-S, in-process: the VAE
    0.44-0.59 -> 0.29-0.30 s, the same arithmetic. The worker's memory stays at its peak
    instead (a few hundred MB)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(M_TRIM_THRESHOLD, 2**30)  # keep up to 1 GiB freed at the heap's top
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # its 64-bit maximum: heap, not mmap, below


def lower_priority(priority: str) -> str:
    """Lower this process's CPU scheduling priority so that analysis (the server process, at
    normal priority) gets the cores the moment it wants them; the priority applied (a fallback's
    where the asked one is refused). Every thread the process has now is changed, and threads
    started later inherit it (Linux schedules threads, not processes).

    - "idle" (the default): SCHED_IDLE, the kernel's class for work that should run only on
      otherwise idle cores. An analysis thread that wakes up preempts the worker at once, and
      while analysis runs the worker gets almost nothing (weight 3 against 1024); with nothing
      else to do it runs at full speed. Measured on 2 cores (base-random int8 on 2 threads, 4
      live sessions and a 5th that streams the same audio, with and without generating back to
      back, tiny): analysis p95 1.05-1.13x with "idle", 1.65-1.7x with "normal" (the sleeping
      below reacts only once analysis is already late: it never triggered at this load); "low"
      gave a ~30% higher inference p95 than "idle". The price: clips take longer while analysis
      runs (1.4-1.7x under that load), not on a quiet machine. Any process may lower itself
      to SCHED_IDLE (Linux >= 2.6.39); where it is refused (seccomp, not Linux): "low".
    - "low": nice 19, the weakest ordinary priority: close to SCHED_IDLE, but the worker keeps
      a small guaranteed share (about 1.5% of a core per analysis thread it competes with).
    - "normal": unchanged; only the sleeping at step boundaries (yield_to_analysis) makes room:
      for a deployment where clip latency matters as much as analysis latency.

    The sleeping at step boundaries stays at every priority: under overload (analysis behind)
    pausing the worker also frees the memory bandwidth and caches it shares with analysis.

    Under sustained analysis overload "idle" and "low" slow generation down, as intended; the
    engine's stall watchdog (--generation-stall-seconds) restarts a worker that reports nothing
    for that long, so keep it well above a step's time under the heaviest expected load.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, not {priority!r}")
    if priority == "normal":
        return "normal"
    threads = _thread_ids()
    if priority == "idle":
        try:
            for tid in threads:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except (AttributeError, OSError) as exc:  # not Linux, or refused: nice 19 instead
            log.warning("generation worker: SCHED_IDLE refused (%s); using nice %d", exc, LOW_NICE)
    try:
        for tid in threads:
            os.setpriority(
                os.PRIO_PROCESS, tid, max(LOW_NICE, os.getpriority(os.PRIO_PROCESS, tid))
            )
        return "low"
    except (AttributeError, OSError) as exc:
        log.warning("generation worker: its priority could not be lowered (%s)", exc)
        return "normal"


def _thread_ids() -> list[int]:
    """This process's threads (Linux: /proc/self/task); elsewhere [0], the process itself."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
