"""What a generation job reports to its sink, and what the engine and its worker say to each other.

The flow, for one job:

    session --submit--> engine (generation.py) --RunJob--> worker process (worker.py)
    worker --JobReport(job_id, Started | Progress | Audio | Done | Stopped | Failed)--> engine
    engine --Queued | Started | Progress | Audio | Retrying | Done | Cancelled | Failed--> sink

The engine also sends the worker CancelJob and StopWorker; the worker answers its start with
WorkerReady or LoadFailed. The engine passes the worker's reports on to the job's sink, on the
event loop, turning Stopped into Cancelled(reason) (the engine knows why it cancelled; the worker
does not), and adds its own: Queued on submit, Retrying when the worker died under the job, and
Cancelled or Failed for jobs it settles without the worker (superseded, shut down, worker down).
A sink hears exactly one Terminal report, last.

Plain frozen data, no behaviour: every message is pickled over the worker's pipe, and may cross
machines one day.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from models.generation import AudioBlock, GenerationRequest

# --- what a job's sink hears ----------------------------------------------------------------


@dataclass(frozen=True)
class Queued:
    position: int  # 1 = next to run


@dataclass(frozen=True)
class Started:
    """The worker took the job."""


@dataclass(frozen=True)
class Progress:
    step: int  # 1-based, of `steps` denoising steps
    steps: int


@dataclass(frozen=True)
class Audio:
    block: AudioBlock


@dataclass(frozen=True)
class Retrying:
    """The worker died under the job: it runs again, first in line, as attempt `attempt`."""

    attempt: int
    code: str
    message: str


@dataclass(frozen=True)
class Done:
    outcome: ClassVar[str] = "done"
    timings: dict[str, Any]  # seconds per stage, from the generator and the worker


@dataclass(frozen=True)
class Cancelled:
    outcome: ClassVar[str] = "cancelled"
    reason: str  # "client", "superseded", "session_end", "server_shutdown"...


@dataclass(frozen=True)
class Failed:
    outcome: ClassVar[str] = "failed"
    code: str
    message: str


# A job's last report (usable with isinstance); its `outcome` is the job's final state.
Terminal = Done | Cancelled | Failed
Report = Queued | Started | Progress | Audio | Retrying | Terminal

# --- engine -> worker -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunJob:
    job_id: int
    request: GenerationRequest
    traceparent: str | None = None  # the job's span (W3C trace context), when tracing is on
    # Most seconds the job may pause for analysis in all (None: MAX_YIELD_S at each boundary,
    # no total): a continuous stream's segment must arrive in time (worker.py).
    pause_budget_s: float | None = None


@dataclass(frozen=True)
class CancelJob:
    job_id: int


@dataclass(frozen=True)
class StopWorker:
    """End the worker: a job it is running stops at its next step boundary."""


ToWorker = RunJob | CancelJob | StopWorker

# --- worker -> engine -----------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorInfo:
    """The generator the worker loaded, as `ready` events and /healthz describe it."""

    model: str
    trained: bool  # False: random weights (the `tiny` and `s-random` presets)
    note: str  # a word on the model for clients and the log
    bf16: bool  # denoising under bf16 autocast
    device: str = "cpu"  # cuda: on a GPU, under fp16 autocast


@dataclass(frozen=True)
class WorkerReady:
    info: GeneratorInfo


@dataclass(frozen=True)
class LoadFailed:
    message: str


@dataclass(frozen=True)
class Stopped:
    """The job stopped at a CancelJob (or StopWorker); the engine knows why."""


WorkerReport = Started | Progress | Audio | Done | Stopped | Failed  # about a job: in a JobReport


@dataclass(frozen=True)
class JobReport:
    job_id: int
    report: WorkerReport


FromWorker = WorkerReady | LoadFailed | JobReport
