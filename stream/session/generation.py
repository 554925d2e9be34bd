"""A session's generation side: trigger or request -> prompt -> job -> events and audio.

Owned by a Session, which calls `react` after each analysed chunk with the trigger its pipeline
fired, if any (steps.py), `manual` and `cancel` for the client's messages, and `drain` or
`close` at the end. In continuous mode the session's generation is one endless stream
(continuous.py) that starts with the first analysed chunk (or a `generate`) instead of clips.
Prompts are built from the rolling context the steps keep. Jobs run on the shared
GenerationEngine; its typed reports (stream/engines/reports.py) become `generation.*` events and
`AudioOut` items (float samples, resampled to the rate the client asked for) in the session's
outbox; each transport encodes them.
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

from models.generation import SAMPLE_RATE, GenerationRequest
from stream.core.audio.resample import StreamResampler
from stream.core.steps.prompts import Prompt, build_prompt
from stream.core.steps.triggers import Trigger
from stream.engines.generation import GenerationEngine
from stream.engines.jobs import GenerationJob, submit_or_fail
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
from stream.session.continuous import ContinuousStream
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
        self.stream: ContinuousStream | None = None
        # Continuous mode starts its stream by itself, until the client cancels one.
        self._auto_stream = True
        # The last clips made, as generated (16 kHz), for GET .../generations/{id}.wav.
        self.clips: OrderedDict[int, np.ndarray] = OrderedDict()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- what the session calls -----------------------------------------------------------

    async def react(self, trigger: Trigger | None, at: int) -> None:
        """A chunk ending at timeline sample `at` was analysed, and fired `trigger` (or none):
        a clip, or in continuous mode the stream if none runs (triggers do not matter then)."""
        if self.options.mode == "continuous":
            if self.stream is None and self._auto_stream:
                self._start_stream(trigger or Trigger("start", at), self.options)
        elif trigger is not None:
            await self._generate(trigger, self.options)

    async def manual(self, message: dict[str, Any], trigger: Trigger) -> None:
        """A `generate` message: its fields over the session's options."""
        options = generation_options(message, self.options)
        if options.mode != "continuous":
            await self._generate(trigger, options)
        elif self.stream is not None:
            why = f"continuous generation {self.stream.number} is running; cancel it first"
            raise ProtocolError("generation_running", why)
        else:
            self._auto_stream = True
            self._start_stream(trigger, options)

    def reconfigure(self, options: GenerateSpec) -> None:
        """A `config` message changed the pipeline: later generations use its options (a
        running stream's next segments too; one that leaves continuous mode ends it)."""
        self.options = options
        if options.mode == "continuous":
            self._auto_stream = True  # the client asks for it (again)
        if self.stream is not None:
            if options.mode == "continuous":
                self.stream.reconfigure(options)
            else:
                self.stream.finish()

    async def cancel(self, number: int) -> None:
        if self.stream is not None and self.stream.number == number:
            self._auto_stream = False  # until the client asks again (`generate`)
            await self.stream.cancel("client")
            return
        job = self._jobs.get(number)
        if job is None:
            raise ProtocolError(
                "unknown_generation", f"no generation {number} is queued or running"
            )
        await self.engine.cancel(job, "client")

    async def drain(self, timeout: float) -> None:
        """End of input: let queued and running generations finish (a stream its segment),
        for up to `timeout`."""
        self._auto_stream = False
        if self.stream is not None:
            self.stream.finish()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            await self.close("session_end")

    async def close(self, reason: str) -> None:
        self._auto_stream = False
        if self.stream is not None:
            await self.stream.cancel(reason)
        await self.engine.cancel_session(self.session, reason)

    async def prompt(self, options: GenerationOptions, end: int | None) -> Prompt:
        """The prompt from the context window ending at timeline sample `end`."""
        measured = self.context.measured(self.context_seconds, end=end)
        window = measured.window
        descriptors = None
        if options.auto_prompt and len(window.audio):
            loop = asyncio.get_running_loop()
            descriptors = await loop.run_in_executor(None, measured.descriptors)
        return build_prompt(
            descriptors, window.describe(), options.template, options.prompt,
            options.negative_prompt, options.auto_prompt,
        )  # fmt: skip

    def stream_ended(self, stream: ContinuousStream) -> None:
        if self.stream is stream:
            self.stream = None
        self.settled(stream.number)

    # --- internals ------------------------------------------------------------------------

    async def _generate(self, trigger: Trigger, options: GenerationOptions) -> None:
        # A trigger's window is the one its chunk's detectors measured (SessionContext).
        window = self.context.measured(self.context_seconds, end=trigger.at).window
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
        prompt = await self.prompt(options, trigger.at)
        seed = options.seed if options.seed is not None else secrets.randbelow(2**32)
        request = GenerationRequest(
            prompt=prompt.text, seconds=options.seconds, seed=seed, steps=options.steps,
            guidance=options.guidance, negative_prompt=prompt.negative,
            guidance_until=options.guidance_until,
            deep_cache_interval=options.deep_cache_interval,
            progressive_vae=options.progressive_vae,
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
        submit_or_fail(self.engine, job)

    def keep_clip(self, number: int, audio: np.ndarray) -> None:
        self.clips[number] = audio
        while len(self.clips) > CLIPS_KEPT:
            self.clips.popitem(last=False)

    def persist(self, number: int, record: dict[str, Any]) -> None:
        """A finished generation is kept (with its clip when it was made)."""
        audio = self.clips.get(number) if record.get("outcome") == "done" else None
        self.recorder.generation(number, record, audio)

    def _start_stream(self, trigger: Trigger, options: GenerationOptions) -> None:
        number = next(self._numbers)
        self._idle.clear()
        sender = AudioSender(self, number)
        self.stream = ContinuousStream(self, number, options, trigger, sender)

    def settled(self, number: int) -> None:
        self._jobs.pop(number, None)
        if not self._jobs and self.stream is None:
            self._idle.set()


class AudioSender:
    """A generation's audio to the client: resampled once to the session's rate, in numbered
    chunks that tile it (`start` and `sent` count samples at that rate)."""

    def __init__(self, owner: SessionGeneration, number: int) -> None:
        self.owner, self.number = owner, number
        self.resampler = StreamResampler(SAMPLE_RATE, owner.out_rate)
        self.sent = 0
        self.chunks = 0
        self.first_audio: float | None = None  # monotonic time of the first chunk

    def send(self, audio: np.ndarray, last: bool) -> None:
        out = self.resampler.process(audio)
        if last:
            out = np.concatenate([out, self.resampler.flush()])
        if self.first_audio is None:
            self.first_audio = time.monotonic()
        owner = self.owner
        header = AudioHeader(
            self.number, self.chunks, owner.out_rate, self.sent, owner.options.encoding, last
        )
        if owner.send_audio:  # (otherwise the clip is fetched over HTTP)
            owner.outbox.put_audio(AudioOut(header, out))
        self.sent += len(out)
        self.chunks += 1


class _Clip:
    """One generation's reports -> events and audio chunks (resampled, numbered, in order)."""

    def __init__(self, owner: SessionGeneration, number: int, about: dict[str, Any]) -> None:
        self.owner, self.number, self.about = owner, number, about
        self.audio = AudioSender(owner, number)
        self.submitted = time.monotonic()
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
                self.blocks.append(block.audio)
                if block.last:
                    self.owner.keep_clip(self.number, np.concatenate(self.blocks))
                self.audio.send(block.audio, block.last)
            case Done(timings):
                timings = {k: _round(v) for k, v in timings.items()}
                timings["first_audio_after_submit_s"] = _round(
                    (self.audio.first_audio or time.monotonic()) - self.submitted
                )
                event = generation_event(
                    session, "done", number, samples=self.audio.sent, sample_rate=owner.out_rate,
                    chunks=self.audio.chunks, timings=timings,
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
