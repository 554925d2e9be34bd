"""A continuous generation: one endless stream of audio, made segment after segment while it runs.

Each segment is a job on the shared engine, so sessions still take turns on the worker, and its
prompt is built from the context as it is when the segment is submitted: the stream follows the
room. Its request carries the `Continuation` of the segment before (the latent rows they share,
the audio held back for the crossfade: models/generation.py SegmentPlan), so the worker (or a Ray
replica) keeps nothing between segments, and a stream survives a worker restart.

Pacing: the client plays the stream in real time from its first audio, so the stream keeps
what it has sent at most `lead` ahead of that clock (PACE_SEGMENTS times the last segment's
making, at least MIN_LEAD_S), and submits the next segment when it is under: no endless buffer,
and the worker is free between segments for the other sessions. Segments that take longer than
the audio they add, SLOW_SEGMENTS in a row, put the stream behind (so does a client's buffer
that ran dry): the stream says so (`generation.behind`) and adapts (`Pace`): fewer steps first,
down to MIN_STEPS, then a longer hop, up to MAX_HOP_SHARE of the segment; when neither is left
it says so and goes on as fast as it can. Once FAST_SEGMENTS in a row are made RECOVER_FACTOR
times faster than real time (the load that slowed it went away), it goes back one change at a
time toward what was asked (`generation.recovered`): the hop first, then the steps.

Events: `generation.queued` and `generation.started` once (the first segment's), then
`generation.segment` as each segment's audio is out (where it starts, how many samples, its
prompt and timings), `generation.behind` when it falls behind, `generation.recovered` when it
goes back, and one terminal event: `done` (the input ended: `stop`), `cancelled` (the client's
`cancel`, the session's end) or `failed`.
Whatever way it ends, the tail it held back goes out faded to silence as the last audio chunk,
so the sample counts add up and the stream ends without a click.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from models.generation import Continuation, GenerationRequest
from stream.core.steps.triggers import Trigger
from stream.engines.jobs import GenerationJob, submit_or_fail
from stream.engines.reports import (
    Audio,
    Cancelled,
    Done,
    Failed,
    Queued,
    Report,
    Retrying,
    Started,
    Terminal,
)
from stream.protocol import ANALYSIS_SAMPLE_RATE, GenerationOptions, generation_event

if TYPE_CHECKING:
    from stream.session.generation import AudioSender, SessionGeneration

log = logging.getLogger(__name__)

MIN_LEAD_S = 1.0  # least audio kept ahead of the client's playback
PACE_SEGMENTS = 2.0  # lead: this many times the last segment's making
SLOW_SEGMENTS = 2  # this many slower than real time in a row: the stream is behind
MIN_STEPS = 3  # a stream that is behind lowers its steps to no fewer than this
MAX_HOP_SHARE = 0.75  # ... then lengthens its hop up to this share of the segment
# A stream that adapted goes back toward what was asked once this many segments in a row were
# made at least this much faster than real time: a change back costs at most 1.5x (steps) or
# 1.25x (hop), so it still keeps up after it, with room for a hiccup.
FAST_SEGMENTS = 3
RECOVER_FACTOR = 2.0
# The most a segment pauses for analysis that is behind, as a share of the audio it adds: a
# budget, not open-ended sleeps (the worker's SCHED_IDLE priority gives analysis the cores
# anyway; the pauses only free memory bandwidth under overload).
PAUSE_SHARE = 0.2
_NOTHING = np.zeros(0, np.float32)


@dataclass
class Pace:
    """How a stream that falls behind adapts, and goes back once it can (no clocks: given each
    segment's figures). `asked_*`: what the client asked for, the most it goes back to."""

    steps: int
    hop_seconds: float
    seconds: float
    asked_steps: int = field(init=False)
    asked_hop: float = field(init=False)

    def __post_init__(self) -> None:
        self.asked_steps, self.asked_hop = self.steps, self.hop_seconds

    def ask(self, steps: int) -> None:
        """A `config` changed the steps: asked, and taken at once."""
        self.steps = self.asked_steps = steps

    def adapt(self) -> str:
        """One change for a stream that fell behind: "steps" (about a third fewer), else
        "hop" (a quarter longer), else "none" (the machine cannot keep up at any setting)."""
        if self.steps > MIN_STEPS:
            self.steps = max(MIN_STEPS, round(self.steps * 2 / 3))
            return "steps"
        longest = round(self.seconds * MAX_HOP_SHARE, 2)
        if self.hop_seconds < longest:
            self.hop_seconds = min(longest, round(self.hop_seconds * 1.25, 2))
            return "hop"
        return "none"

    def recover(self) -> str | None:
        """One change back for a stream well ahead, undoing the last kind made first: "hop" (a
        fifth shorter), else "steps" (half as many more); None: it runs as asked."""
        if self.hop_seconds > self.asked_hop:
            self.hop_seconds = max(self.asked_hop, round(self.hop_seconds / 1.25, 2))
            return "hop"
        if self.steps < self.asked_steps:
            self.steps = min(self.asked_steps, math.ceil(self.steps * 3 / 2))
            return "steps"
        return None


class ContinuousStream:
    def __init__(
        self,
        owner: SessionGeneration,
        number: int,
        options: GenerationOptions,
        trigger: Trigger,
        sender: AudioSender,
    ) -> None:
        self.owner, self.number, self.options, self.trigger = owner, number, options, trigger
        self.sender = sender
        self.pace = Pace(options.steps, options.hop, options.seconds)
        self.seed = options.seed if options.seed is not None else secrets.randbelow(2**32)
        self.segments = 0
        self.continuation: Continuation | None = None
        self.job: GenerationJob | None = None
        self._last_wall = 0.0  # seconds the last segment took, submit to done
        self._slow = 0  # segments running that took longer than the audio they add
        self._fast = 0  # ... that took under 1 / RECOVER_FACTOR of it
        self._playing_since: float | None = None  # the client's playback clock (_ahead)
        self._dry = False  # the client's buffer ran dry before the current segment's audio
        self._ending: Terminal | None = None  # how it ends, once it was told to
        self._wake = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"stream-{owner.session}-{number}")

    # --- what the session calls -------------------------------------------------------------

    def reconfigure(self, options: GenerationOptions) -> None:
        """Later segments take the new prompt settings, steps and guidance; the segment
        length, hop and crossfade stay the stream's own (its segments must fit together)."""
        self.options = options.model_copy(
            update={k: getattr(self.options, k) for k in ("seconds", "hop_seconds",
                                                          "crossfade_seconds", "scheduler")}
        )  # fmt: skip
        self.pace.ask(options.steps)

    def finish(self) -> None:
        """No more segments: the one being made goes out, then `generation.done`."""
        self._end(Done({}))

    async def cancel(self, reason: str) -> None:
        """Stop now: the segment being made is cancelled, then `generation.cancelled`."""
        self._end(Cancelled(reason))
        if self.job is not None:
            await self.owner.engine.cancel(self.job, reason)

    # --- internals ------------------------------------------------------------------------

    def _end(self, how: Terminal) -> None:
        if self._ending is None:
            self._ending = how
        self._wake.set()

    async def _run(self) -> None:
        ending: Terminal = Done({})
        try:
            while self._ending is None:
                await self._wait_for_room()
                if self._ending is not None:
                    break
                report = await self._segment()
                if not isinstance(report, Done):
                    ending = report
                    break
            if self._ending is not None and isinstance(ending, Done):
                ending = self._ending  # told to finish or stop while a segment was made
        except Exception:  # noqa: BLE001 - reported as the stream's end, never raised
            log.exception("session %s: continuous generation %d failed", self.owner.session,
                          self.number)  # fmt: skip
            ending = Failed("generation_failed", "the continuous generation stopped on an error")
        self._close(ending)

    async def _wait_for_room(self) -> None:
        """Until what was sent is less than the lead ahead of the client's playback."""
        while self._ending is None:
            ahead = self._ahead()
            if ahead <= self._lead():
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), ahead - self._lead())
            except TimeoutError:
                pass

    def _ahead(self) -> float:
        """Seconds of audio sent beyond the client's playback clock (1 s/s from its first
        audio, held while its buffer was dry)."""
        if self._playing_since is None:
            return 0.0
        played = time.monotonic() - self._playing_since
        return self.sender.sent / self.owner.out_rate - played

    def audio_arrives(self) -> None:
        """A segment's first audio goes out: if the client's buffer ran dry before it (as
        reckoned here), its player waited; its clock goes on from now."""
        if self._playing_since is None:
            self._playing_since = time.monotonic()
        elif (ahead := self._ahead()) < 0:
            self._playing_since -= ahead
            self._dry = True

    def _lead(self) -> float:
        return max(MIN_LEAD_S, PACE_SEGMENTS * self._last_wall)

    async def _segment(self) -> Terminal:
        """Make the next segment from the context as it is now; its terminal report."""
        options = self.options
        prompt = await self.owner.prompt(options, self.owner.context.end)
        seed = (self.seed + self.segments) % 2**32
        request = GenerationRequest(
            prompt=prompt.text, seconds=options.seconds, seed=seed, steps=self.pace.steps,
            guidance=options.guidance, negative_prompt=prompt.negative,
            guidance_until=options.guidance_until,
            deep_cache_interval=options.deep_cache_interval,
            progressive_vae=options.progressive_vae,
            scheduler=options.scheduler, hop_seconds=self.pace.hop_seconds,
            crossfade_seconds=options.crossfade_seconds, continuation=self.continuation,
        )  # fmt: skip
        segment = _Segment(self, self.segments, prompt.describe(), request)
        job = GenerationJob(
            self.owner.session, request, segment.on_report, lane="stream",
            pause_budget_s=PAUSE_SHARE * self.pace.hop_seconds,
        )  # fmt: skip
        self.job = job
        submit_or_fail(self.owner.engine, job)
        report = await segment.finished
        self.job = None
        if isinstance(report, Done):
            self._segment_done(segment, report)
        return report

    def _segment_done(self, segment: _Segment, report: Done) -> None:
        wall = time.monotonic() - segment.submitted
        self._last_wall = wall
        hop = segment.request.hop_seconds or 0.0
        factor = round(hop / wall, 3) if wall > 0 else None
        ahead = round(self._ahead(), 3)
        late, self._dry = self._dry, False
        self._slow = self._slow + 1 if factor is not None and factor < 1.0 else 0
        self._fast = self._fast + 1 if factor is not None and factor >= RECOVER_FACTOR else 0
        owner, session = self.owner, self.owner.session
        owner.outbox.put(generation_event(
            session, "segment", self.number, segment=self.segments, start=segment.start,
            samples=segment.samples, prompt=segment.prompt, seed=segment.request.seed,
            steps=segment.request.steps, hop_seconds=hop,
            realtime_factor=factor, ahead_s=ahead, late=late,
            timings={k: round(v, 4) for k, v in report.timings.items()
                     if isinstance(v, float)},
        ))  # fmt: skip
        self.segments += 1
        # Behind: the client's buffer ran dry, or two segments running took longer than the
        # audio they add (one may be a hiccup: another session's clip, a burst of analysis).
        if late or self._slow >= SLOW_SEGMENTS:
            self._slow = 0
            change = self.pace.adapt()
            owner.outbox.put(generation_event(
                session, "behind", self.number, segment=self.segments - 1,
                realtime_factor=factor, late=late, change=change, steps=self.pace.steps,
                hop_seconds=self.pace.hop_seconds,
            ))  # fmt: skip
        elif self._fast >= FAST_SEGMENTS and (change := self.pace.recover()) is not None:
            self._fast = 0
            owner.outbox.put(generation_event(
                session, "recovered", self.number, segment=self.segments - 1,
                realtime_factor=factor, change=change, steps=self.pace.steps,
                hop_seconds=self.pace.hop_seconds,
            ))  # fmt: skip

    def _close(self, ending: Terminal) -> None:
        owner, session, number = self.owner, self.owner.session, self.number
        if self.sender.chunks:
            # The held-back tail, faded out; none when a segment stopped midway had taken it
            # (then the last chunk is empty, or only what the resampler still held).
            tail = self.continuation.fade_out() if self.continuation is not None else _NOTHING
            self.sender.send(tail, last=True)
        counts = {"samples": self.sender.sent, "chunks": self.sender.chunks,
                  "segments": self.segments}  # fmt: skip
        match ending:
            case Done():
                event = generation_event(session, "done", number, sample_rate=owner.out_rate,
                                         **counts)  # fmt: skip
            case Cancelled(reason):
                event = generation_event(session, "cancelled", number, reason=reason, **counts)
            case Failed(code, message):
                event = generation_event(session, "failed", number, code=code, message=message)
        owner.outbox.put(event)
        record = {**self.about(), "outcome": ending.outcome, **counts}
        owner.recorder.generation(number, record, None)  # an endless stream's audio is not kept
        owner.stream_ended(self)

    def about(self) -> dict[str, Any]:
        options = self.options
        return {
            "trigger": self.trigger.describe(ANALYSIS_SAMPLE_RATE),
            "seed": self.seed,
            "mode": "continuous",
            "seconds": options.seconds,
            "hop_seconds": options.hop,
            "crossfade_seconds": options.crossfade_seconds,
            "steps": options.steps,
            "sample_rate": self.owner.out_rate,
            "encoding": self.owner.options.encoding.value,
        }


class _Segment:
    """One segment's reports: its audio to the stream's sender, its end to the stream."""

    def __init__(
        self, stream: ContinuousStream, index: int, prompt: dict[str, Any],
        request: GenerationRequest,
    ) -> None:  # fmt: skip
        self.stream, self.index, self.prompt, self.request = stream, index, prompt, request
        self.submitted = time.monotonic()
        self.start = stream.sender.sent  # where its audio begins in the stream (output rate)
        self.samples = 0
        self.finished: asyncio.Future[Terminal] = asyncio.get_running_loop().create_future()

    def on_report(self, report: Report) -> None:
        stream = self.stream
        owner, session, number = stream.owner, stream.owner.session, stream.number
        first = self.index == 0
        match report:
            case Queued(position) if first:
                event = generation_event(session, "queued", number, position=position)
                owner.outbox.put({**event, **stream.about(), "prompt": self.prompt})
            case Started() if first:
                owner.outbox.put(generation_event(
                    session, "started", number, **stream.about(), prompt=self.prompt
                ))  # fmt: skip
            case Retrying(attempt, code, message):
                owner.outbox.put(generation_event(
                    session, "retrying", number, segment=self.index, attempt=attempt, code=code,
                    message=message,
                ))  # fmt: skip
            case Audio(block):
                if block.index == 0:
                    stream.audio_arrives()
                before = stream.sender.sent
                stream.sender.send(block.audio, last=False)
                self.samples += stream.sender.sent - before
                # The first block took in the tail held before (crossfaded); the last holds
                # back the next.
                stream.continuation = block.continuation
            case Done() | Cancelled() | Failed():
                if not self.finished.done():
                    self.finished.set_result(report)
