"""A session's generation side: trigger or request -> prompt -> job -> events and audio.

Owned by a Session, which calls `start` when its pipeline's triggers fire (steps.py), `manual`
and `cancel` for the client's messages, and `drain` or `close` at the end. Prompts are built from
the rolling context the steps keep. Jobs run on the shared GenerationEngine; its typed reports
(stream/engines/reports.py) become `generation.*` events and `AudioOut` items (float samples,
resampled to the rate the client asked for) in the session's outbox; each transport encodes them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from models.generation import SAMPLE_RATE, AudioBlock, GenerationRequest
from stream.core.audio.resample import StreamResampler
from stream.core.steps.prompts import build_prompt
from stream.core.steps.triggers import Trigger
from stream.engines.generation import (
    EngineBusy,
    GenerationEngine,
    GenerationJob,
    GeneratorUnavailable,
)
from stream.engines.reports import (
    Audio,
    Cancelled,
    Done,
    Failed,
    Progress,
    Queued,
    Report,
    Retrying,
    Started,
    Terminal,
)
from stream.pipeline import GenerateSpec
from stream.protocol import (
    ANALYSIS_SAMPLE_RATE,
    AudioHeader,
    GenerationOptions,
    ProtocolError,
    error_event,
    generation_event,
    generation_options,
)
from stream.session.outbox import AudioOut, Outbox
from stream.session.recorder import Recorder
from stream.session.steps import SessionContext
from stream.session.tracing import JobTrace, SessionTrace

log = logging.getLogger(__name__)

CLIPS_KEPT = 16  # per live session (a 5 s clip is 320 KB)


class SessionGeneration:
    def __init__(
        self,
        session: str,
        options: GenerateSpec,
        context: SessionContext,
        context_seconds: float,
        engine: GenerationEngine,
        outbox: Outbox,
        recorder: Recorder,
        send_audio: bool = True,
        first_number: int = 1,
        trace: SessionTrace | None = None,
    ) -> None:
        self.session, self.options, self.engine, self.outbox = session, options, engine, outbox
        self.trace = trace  # with tracing: the session's span, each job's parent
        self.context, self.context_seconds = context, context_seconds
        self.recorder, self.send_audio = recorder, send_audio
        self.out_rate = options.sample_rate or SAMPLE_RATE
        self._numbers = itertools.count(first_number)
        self._jobs: dict[int, GenerationJob] = {}
        # The last clips made, as generated (16 kHz), for GET .../generations/{id}.wav.
        self.clips: OrderedDict[int, np.ndarray] = OrderedDict()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- what the session calls -----------------------------------------------------------

    async def start(self, trigger: Trigger) -> None:
        """A trigger fired: generate with the session's options."""
        await self._generate(trigger, self.options)

    async def manual(self, message: dict[str, Any], trigger: Trigger) -> None:
        """A `generate` message: its fields over the session's options."""
        await self._generate(trigger, generation_options(message, self.options))

    def reconfigure(self, options: GenerateSpec) -> None:
        """A `config` message changed the pipeline: later generations use its options."""
        self.options = options

    async def cancel(self, number: int) -> None:
        job = self._jobs.get(number)
        if job is None:
            raise ProtocolError(
                "unknown_generation", f"no generation {number} is queued or running"
            )
        await self.engine.cancel(job, "client")

    async def drain(self, timeout: float) -> None:
        """End of input: let queued and running generations finish, for up to `timeout`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            await self.close("session_end")

    async def close(self, reason: str) -> None:
        await self.engine.cancel_session(self.session, reason)

    # --- internals ------------------------------------------------------------------------

    async def _generate(self, trigger: Trigger, options: GenerationOptions) -> None:
        # A trigger's window is the one its chunk's detectors measured (SessionContext).
        measured = self.context.measured(self.context_seconds, end=trigger.at)
        window = measured.window
        if options.mode == "variation" and window.end - window.start < ANALYSIS_SAMPLE_RATE // 2:
            self.outbox.put(
                error_event(
                    self.session,
                    "no_context",
                    "a variation needs at least 0.5 s of session audio to vary; send audio first",
                    fatal=False,
                )
            )
            return
        descriptors = None
        if options.auto_prompt and len(window.audio):
            loop = asyncio.get_running_loop()
            descriptors = await loop.run_in_executor(None, measured.descriptors)
        prompt = build_prompt(
            descriptors, window.describe(), options.template, options.prompt,
            options.negative_prompt, options.auto_prompt,
        )  # fmt: skip
        seed = options.seed if options.seed is not None else secrets.randbelow(2**32)
        request = GenerationRequest(
            prompt=prompt.text, seconds=options.seconds, seed=seed, steps=options.steps,
            guidance=options.guidance, negative_prompt=prompt.negative,
            scheduler=options.scheduler,
            source=window.audio if options.mode == "variation" else None,
            strength=options.strength,
        )  # fmt: skip
        number = next(self._numbers)
        about = {
            "trigger": trigger.describe(ANALYSIS_SAMPLE_RATE),
            "prompt": prompt.describe(),
            "seed": seed,
            "mode": options.mode,
            "seconds": options.seconds,
            "steps": options.steps,
            "sample_rate": self.out_rate,
            "encoding": self.options.encoding.value,
        }
        clip = _Clip(self, number, about)
        traceparent = clip.trace.traceparent if clip.trace is not None else None
        job = GenerationJob(self.session, request, clip.on_report, traceparent=traceparent)
        self._jobs[number] = job
        self._idle.clear()
        try:
            self.engine.submit(job)
        except EngineBusy as exc:
            clip.on_report(Failed("generator_busy", f"{exc}; try again shortly"))
        except GeneratorUnavailable as exc:
            clip.on_report(Failed("generator_unavailable", str(exc)))

    def keep_clip(self, number: int, audio: np.ndarray) -> None:
        self.clips[number] = audio
        while len(self.clips) > CLIPS_KEPT:
            self.clips.popitem(last=False)

    def persist(self, number: int, record: dict[str, Any]) -> None:
        """A finished generation is kept (with its clip when it was made)."""
        audio = self.clips.get(number) if record.get("outcome") == "done" else None
        self.recorder.generation(number, record, audio)

    def settled(self, number: int) -> None:
        self._jobs.pop(number, None)
        if not self._jobs:
            self._idle.set()


class _Clip:
    """One generation's reports -> events and audio chunks (resampled, numbered, in order)."""

    def __init__(self, owner: SessionGeneration, number: int, about: dict[str, Any]) -> None:
        self.owner, self.number, self.about = owner, number, about
        self.resampler = StreamResampler(SAMPLE_RATE, owner.out_rate)
        self.sent = 0  # samples at the output rate
        self.chunks = 0
        self.submitted = time.monotonic()
        self.first_audio: float | None = None
        self.blocks: list[np.ndarray] = []  # as generated, for the clip store
        self.trace: JobTrace | None = owner.trace.job(number, about) if owner.trace else None

    def on_report(self, report: Report) -> None:
        owner, session, number = self.owner, self.owner.session, self.number
        if self.trace is not None:
            self.trace.report(report)
        event = None
        match report:
            case Queued(position):
                event = generation_event(session, "queued", number, position=position)
                event.update(self.about)
            case Started():
                event = generation_event(session, "started", number, **self.about)
            case Progress(step, steps):
                event = generation_event(session, "progress", number, step=step, steps=steps)
            case Retrying(attempt, code, message):
                event = generation_event(
                    session, "retrying", number, attempt=attempt, code=code, message=message
                )
            case Audio(block):
                self._send_audio(block)
            case Done(timings):
                timings = {k: _round(v) for k, v in timings.items()}
                timings["first_audio_after_submit_s"] = _round(
                    (self.first_audio or time.monotonic()) - self.submitted
                )
                event = generation_event(
                    session, "done", number, samples=self.sent, sample_rate=owner.out_rate,
                    chunks=self.chunks, timings=timings,
                )  # fmt: skip
                owner.persist(number, {**self.about, "outcome": "done", "timings": timings})
            case Cancelled(reason):
                event = generation_event(session, "cancelled", number, reason=reason)
                owner.persist(number, {**self.about, "outcome": "cancelled", "reason": reason})
            case Failed(code, message):
                event = generation_event(session, "failed", number, code=code, message=message)
                outcome = {"outcome": "failed", "code": code, "message": message}
                owner.persist(number, {**self.about, **outcome})
        if event is not None:
            owner.outbox.put(event)
        if isinstance(report, Terminal):
            owner.settled(number)

    def _send_audio(self, block: AudioBlock) -> None:
        self.blocks.append(block.audio)
        if block.last:
            self.owner.keep_clip(self.number, np.concatenate(self.blocks))
        audio = self.resampler.process(block.audio)
        if block.last:
            audio = np.concatenate([audio, self.resampler.flush()])
        if self.first_audio is None:
            self.first_audio = time.monotonic()
        header = AudioHeader(
            self.number, self.chunks, self.owner.out_rate, self.sent,
            self.owner.options.encoding, block.last,
        )  # fmt: skip
        if self.owner.send_audio:  # (otherwise the clip is fetched over HTTP)
            self.owner.outbox.put_audio(AudioOut(header, audio))
        self.sent += len(audio)
        self.chunks += 1


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def no_generation_event(session: str, server_generates: bool, pipeline: str) -> dict[str, Any]:
    """Why a session cannot generate: the server has no generator, or its pipeline does not."""
    if not server_generates:
        why = "this server runs without a generator (started with --generator none)"
        return error_event(session, "generation_unavailable", why, fatal=False)
    why = f"this session's pipeline ({pipeline}) does not generate"
    return error_event(session, "generation_disabled", why, fatal=False)
