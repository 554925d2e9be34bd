"""A session's rolling context and the pipeline steps that read it.

Owned by a Session, which calls `push_audio` for every chunk cut (analysed or skipped: its audio
was heard too), `record` for every analysed chunk's fields, then `after`: the pipeline's
detectors add their findings (off the loop; kept, and sent as a `patterns` event if the pipeline
says so), and its triggers decide whether a generation starts. `reconfigure` swaps in a changed
pipeline (a `config` message); the context is kept and the triggers start afresh from the
current position. The context keeps the measurements of its latest window, which the generation
that a trigger starts reuses for its prompt (stream/session/generation.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from models.base import decode_embedding
from stream.core.audio.chunker import Window
from stream.core.steps.context import RollingContext, TimelineEntry
from stream.core.steps.detectors import detect_all
from stream.core.steps.patterns import Measurements
from stream.core.steps.triggers import Trigger, TriggerPolicy
from stream.pipeline import Pipeline
from stream.protocol import ANALYSIS_SAMPLE_RATE, error_event, patterns_event
from stream.session.outbox import Outbox
from stream.session.recorder import Recorder

if TYPE_CHECKING:
    from stream.session.generation import SessionGeneration

log = logging.getLogger(__name__)


def timeline_entry(start: int, end: int, fields: dict[str, Any]) -> TimelineEntry:
    """The timeline entry of chunk [start, end) from its analysis event's merged fields (before
    embeddings are stripped for the client): dsp `features`/`vad`, `wav2vec2.embedding` and
    `labels`, `transcript.final`. The one place that reads the analysers' fields for the steps."""
    features = fields.get("features") or {}
    vad = fields.get("vad") or {}
    final = (fields.get("transcript") or {}).get("final") or {}
    wav2vec2 = fields.get("wav2vec2") or {}
    encoded = wav2vec2.get("embedding")
    labels = wav2vec2.get("labels") or []
    return TimelineEntry(
        start=start,
        end=end,
        rms_dbfs=features.get("rms_dbfs"),
        pitch_hz=features.get("pitch_hz"),
        speech=vad.get("speech"),
        speech_ratio=vad.get("speech_ratio"),
        text=final.get("text", ""),
        label=labels[0]["label"] if labels else None,
        embedding=decode_embedding(encoded) if encoded else None,
        fields=dict(fields),
    )


@dataclass(frozen=True)
class KeptContext:
    """A session's rolling context as the store keeps it when the session moves: its audio
    from sample `start` (analysis rate) and the timeline entries over it."""

    start: int
    audio: np.ndarray
    entries: tuple[TimelineEntry, ...] = ()

    def pcm(self) -> bytes:
        """The audio as 16-bit PCM, for the store (half the bytes of float32)."""
        return (np.clip(self.audio, -1, 1) * 32767).astype("<i2").tobytes()

    @staticmethod
    def from_pcm(start: int, pcm: bytes, entries: tuple[TimelineEntry, ...]) -> KeptContext:
        audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32767
        return KeptContext(start, audio, entries)


class SessionContext(RollingContext):
    """A session's rolling context, and the measurements of the last window asked for.

    Each window's measurements are computed once: the detectors measure the window that ends
    with the chunk just analysed, and a trigger on that chunk asks for the same window for its
    prompt, which then reads them all (patterns.Measurements). A window is the same when it has
    the same bounds: chunks join the timeline in order, so its audio and entries are the same too.
    The bounds can differ: a manual `generate` ends where the audio received ends, which may be
    ahead of the analysis, and audio received while the detectors ran can push the start of a
    full context further on; such a window is measured afresh, as before. The measurements hold
    a copy of the window's audio: the steps let them go when no trigger fired.
    """

    def __init__(self, seconds: float, sample_rate: int, origin: int = 0) -> None:
        super().__init__(seconds, sample_rate, origin)
        self._measured: Measurements | None = None

    def measured(self, seconds: float | None = None, end: int | None = None) -> Measurements:
        """The measurements of `window(seconds, end)`: the kept ones if it is the same window."""
        window = self.window(seconds, end)
        kept = self._measured
        if kept is None or (kept.window.start, kept.window.end) != (window.start, window.end):
            kept = self._measured = Measurements(window)
        return kept

    def forget_measured(self) -> None:
        self._measured = None


class SessionSteps:
    def __init__(
        self,
        session: str,
        pipeline: Pipeline,
        outbox: Outbox,
        recorder: Recorder,
        origin: int = 0,
        kept: KeptContext | None = None,
    ) -> None:
        """`origin`: where the session's audio begins (after a restore, where it goes on);
        `kept`: the context it had when it moved (its audio then, the entries over it), which
        then ends exactly at `origin`."""
        self.session, self.outbox, self.recorder = session, outbox, recorder
        self.pipeline = pipeline
        rate, seconds = ANALYSIS_SAMPLE_RATE, pipeline.spec.context_seconds
        if kept is not None and kept.start + len(kept.audio) == origin:
            self.context = SessionContext(seconds, rate, kept.start)
            self.context.push_audio(kept.start, kept.audio)
            for entry in kept.entries:
                self.context.push_entry(entry)
        else:
            self.context = SessionContext(seconds, rate, origin)
        self.detectors = pipeline.make_detectors()
        self.policy = TriggerPolicy(pipeline.make_triggers(rate, start=origin))
        self.findings: dict[str, Any] = {}  # the detectors' latest

    def push_audio(self, window: Window) -> None:
        self.context.push_audio(window.start, window.chunk)

    def record(self, window: Window, fields: dict[str, Any]) -> TimelineEntry:
        """The chunk's analysis (all its fields, embeddings included) joins the timeline."""
        entry = timeline_entry(window.start, window.end, fields)
        self.context.push_entry(entry)
        return entry

    async def after(self, entry: TimelineEntry, seq: int) -> Trigger | None:
        """Detectors, then triggers, on the context as it stands after chunk `seq`."""
        if self.detectors:
            measured = self.context.measured(self.pipeline.spec.context_seconds, end=entry.end)
            loop = asyncio.get_running_loop()
            self.findings = await loop.run_in_executor(None, detect_all, self.detectors, measured)
            window = measured.window.describe()
            if self.pipeline.spec.send.patterns:
                self.outbox.put(patterns_event(self.session, seq, window, self.findings))
            self.recorder.patterns(seq, {"window": window, **self.findings})  # sent or not
        trigger = self.policy.observe(entry, self.findings)
        if trigger is None:  # no prompt to share the measurements with
            self.context.forget_measured()
        return trigger

    async def react(
        self, entry: TimelineEntry, seq: int, generation: SessionGeneration | None
    ) -> None:
        """`after`, and the generation its trigger starts. A failing step is reported, never
        raised: the analysis goes on."""
        try:
            trigger = await self.after(entry, seq)
            if generation is not None:
                await generation.react(trigger, entry.end)
        except Exception:
            log.exception("session %s: a pipeline step failed", self.session)
            why = "a pipeline step failed"
            self.outbox.put(error_event(self.session, "internal_error", why, fatal=False))

    def kept(self) -> KeptContext | None:
        """The context's audio up to the end of the last analysed chunk (where a session that
        moves goes on), for the store; None before any chunk was analysed."""
        end = self.context.analysed_to
        if end is None:
            return None
        window = self.context.window(None, end)
        return KeptContext(window.start, window.audio, window.entries)

    def reconfigure(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.policy = TriggerPolicy(
            pipeline.make_triggers(ANALYSIS_SAMPLE_RATE, start=self.context.end)
        )
