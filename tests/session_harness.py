"""Sessions without a transport: a SessionManager and its Sessions driven with bytes and control
messages, their events read straight from the outbox (in the spirit of the `websockets`
library's protocol tests and pipecat's `run_test`).

The analysis engine is the real one; its model is the real DSP analyser behind a `Gate`, so a
test decides when each chunk's analysis may finish (and so when analysis is behind). Generation
runs on a `HeldGenerator`: the engine's contract with the real typed reports, each job run when
the test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np

from models.dsp import DspAnalyser
from models.generation import SAMPLE_RATE as GENERATED_RATE
from models.generation import AudioBlock
from stream.engines.analysis import AnalysisEngine, start_engines
from stream.engines.jobs import GenerationJob
from stream.engines.reports import Audio, Cancelled, Done, Progress, Queued, Started, Terminal
from stream.pipeline import load_presets
from stream.protocol import StartMessage, parse_start
from stream.session import Session, SessionManager
from stream.session.outbox import Outgoing
from stream.settings import Settings
from stream.store import Store

RATE = 16_000


class Gate:
    """Holds each analysis call until the test lets it through (or opens the gate for good)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._passes = 0
        self._open = False
        self.waiting = 0  # calls held at the gate now

    def allow(self, calls: int = 1) -> None:
        with self._condition:
            self._passes += calls
            self._condition.notify_all()

    def open(self) -> None:
        with self._condition:
            self._open = True
            self._condition.notify_all()

    def wait(self, timeout: float = 30.0) -> None:
        with self._condition:
            self.waiting += 1
            try:
                if not self._condition.wait_for(lambda: self._open or self._passes, timeout):
                    raise TimeoutError("the test never let this analysis through")
                if not self._open:
                    self._passes -= 1
            finally:
                self.waiting -= 1


class GatedDsp(DspAnalyser):
    """The real DSP analyser; each batch waits at the gate first."""

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    def analyse(self, windows: Sequence[Any]) -> list[Any]:
        self.gate.wait()
        return super().analyse(windows)


class HeldGenerator:
    """A generation engine whose jobs wait until the test runs them. It keeps the contract
    sessions rely on (stream/engines/generation.py): Queued on submit, a job cancelled while
    waiting or running is settled with Cancelled(reason), exactly one terminal report each."""

    available = running = True

    def __init__(self) -> None:
        self.jobs: list[GenerationJob] = []

    def describe(self) -> dict[str, Any]:
        return {"model": "held", "trained": False, "note": "the session tests' generator"}

    def stats(self) -> dict[str, Any]:
        return {"queued": len(self.waiting), "running": False}

    @property
    def waiting(self) -> list[GenerationJob]:
        return [job for job in self.jobs if not job.finished]

    def submit(self, job: GenerationJob) -> None:
        self.jobs.append(job)
        job.sink(Queued(len(self.waiting)))

    async def cancel(self, job: GenerationJob, reason: str = "client") -> None:
        if not job.finished:
            self._settle(job, Cancelled(reason))

    async def cancel_session(self, session: str, reason: str) -> None:
        for job in self.waiting:
            if job.session == session:
                self._settle(job, Cancelled(reason))

    def run(self, job: GenerationJob, seconds: float = 0.5) -> None:
        """The job, start to end at once: one step, one block of silence, done."""
        job.sink(Started())
        job.sink(Progress(1, 1))
        silence = np.zeros(round(seconds * GENERATED_RATE), np.float32)
        job.sink(Audio(AudioBlock(0, 0, silence, last=True)))
        self._settle(job, Done({"total_s": 0.0}))

    def _settle(self, job: GenerationJob, report: Terminal) -> None:
        job.state = report.outcome
        job.sink(report)


def start(**fields: Any) -> StartMessage:
    """A start message as a client sends it (mono float32 at 16 kHz unless given)."""
    message = {"type": "start", "sample_rate": RATE, "channels": 1, "encoding": "pcm_f32le"}
    return parse_start(json.dumps({**message, **fields}))


def audio(seconds: float, freq: float = 440.0) -> bytes:
    """A sine as one binary frame of mono float32 PCM at 16 kHz."""
    t = np.arange(round(seconds * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32).tobytes()


async def frames(session: Session, seconds: float, frame_seconds: float = 0.1) -> None:
    """`seconds` of audio in frames of `frame_seconds`, as a transport hands them over (the
    loop runs between frames, as it does while a transport waits for the next one)."""
    for _ in range(round(seconds / frame_seconds)):
        await session.receive_bytes(audio(frame_seconds))
        await asyncio.sleep(0)


async def take(session: Session, timeout: float = 10.0) -> Outgoing | None:
    """The next item the session sends (None once it has closed and sent everything)."""
    return await asyncio.wait_for(session.outbox.get(), timeout)


async def events_until(session: Session, kind: str, timeout: float = 10.0) -> list[dict]:
    """Events (binary frames left out) up to and including the first of type `kind`."""
    events: list[dict] = []
    while not events or events[-1]["type"] != kind:
        item = await take(session, timeout)
        if item is None:
            raise AssertionError(f"the session closed before a {kind!r} event: {events}")
        if item.event is not None:
            events.append(item.event)
    return events


async def queued(session: Session) -> list[dict]:
    """The events waiting in the outbox now (taking them does not wait)."""
    events = []
    while len(session.outbox):
        item = await take(session)
        if item is not None and item.event is not None:
            events.append(item.event)
    return events


async def settle(condition: Any, timeout: float = 10.0) -> None:
    """Let the loop run until `condition()` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("the session did not get there in time")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def harness(
    store: Store | None = None, generator: HeldGenerator | None = None, **settings: Any
) -> AsyncIterator[tuple[SessionManager, Gate]]:
    """A manager over one gated DSP engine (one window per batch), and `generator` if given."""
    settings = {"persist": False, "generator": "none", "analysis_model": "none", **settings}
    chosen = Settings(**settings)
    gate = Gate()
    engines: list[AnalysisEngine] = await start_engines([GatedDsp(gate)], 1, 0.0)
    pipelines = load_presets(None, [engine.name for engine in engines])
    manager = SessionManager(
        chosen,
        engines,
        generator,
        store=store,
        pipelines=pipelines,  # type: ignore[arg-type]
    )
    try:
        yield manager, gate
    finally:
        gate.open()
        await manager.close_all()
        for engine in engines:
            await engine.stop()
