"""What a session hands the generation engine (generation.py): a job, the sink its reports go
to, and the two refusals `submit` may raise."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models.generation import GenerationRequest
from stream.engines.reports import Failed, Report

_ids = itertools.count(1)


class EngineBusy(RuntimeError):
    """The job queue is full."""


class GeneratorUnavailable(RuntimeError):
    """The worker could not load the generator (or, after a crash, could not be started again
    yet: the engine keeps trying)."""


Sink = Callable[[Report], None]


@dataclass(eq=False)
class GenerationJob:
    session: str
    request: GenerationRequest
    sink: Sink
    id: int = field(default_factory=lambda: next(_ids))  # engine-wide, what the worker sees
    state: str = "queued"  # queued | running | done | cancelled | failed
    cancel_reason: str = "client"  # what its sink hears once the worker has Stopped it
    attempt: int = 1
    streamed: bool = False  # some of its audio went out
    cancelling: bool = False  # a cancel was sent to the worker
    # W3C trace context of the job's span (with tracing on): carried to the worker (worker.py)
    traceparent: str | None = None
    lane: str = "clip"  # or "stream": a continuous stream's segments never supersede clips
    pause_budget_s: float | None = None  # the most it pauses for analysis (RunJob)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")


def submit_or_fail(engine: Any, job: GenerationJob) -> None:
    """Queue `job` on `engine` (a GenerationEngine); a refusal becomes the job's Failed report
    (`generator_busy`, `generator_unavailable`) rather than an exception."""
    try:
        engine.submit(job)
    except EngineBusy as exc:
        job.sink(Failed("generator_busy", f"{exc}; try again shortly"))
    except GeneratorUnavailable as exc:
        job.sink(Failed("generator_unavailable", str(exc)))
