"""A session's rolling context and the pipeline steps that read it.

Owned by a Session, which calls `push_audio` for every chunk cut (analysed or skipped: its audio
was heard too), `record` for every analysed chunk's fields, then `after`: the pipeline's
detectors add their findings (off the loop; kept, and sent as a `patterns` event if the pipeline
says so), and its triggers decide whether a generation starts. `reconfigure` swaps in a changed
pipeline (a `config` message); the context is kept and the triggers start afresh from the
current position.
"""

from __future__ import annotations

import asyncio
from typing import Any

from stream.core.audio.chunker import Window
from stream.core.steps.context import RollingContext, TimelineEntry
from stream.core.steps.detectors import detect_all
from stream.core.steps.triggers import Trigger, TriggerPolicy
from stream.pipeline import Pipeline
from stream.protocol import ANALYSIS_SAMPLE_RATE, patterns_event
from stream.session.outbox import Outbox
from stream.session.recorder import Recorder


class SessionSteps:
    def __init__(
        self, session: str, pipeline: Pipeline, outbox: Outbox, recorder: Recorder
    ) -> None:
        self.session, self.outbox, self.recorder = session, outbox, recorder
        self.pipeline = pipeline
        self.context = RollingContext(pipeline.spec.context_seconds, ANALYSIS_SAMPLE_RATE)
        self.detectors = pipeline.make_detectors()
        self.policy = TriggerPolicy(pipeline.make_triggers(ANALYSIS_SAMPLE_RATE))
        self.findings: dict[str, Any] = {}  # the detectors' latest

    def push_audio(self, window: Window) -> None:
        self.context.push_audio(window.start, window.chunk)

    def record(self, window: Window, fields: dict[str, Any]) -> TimelineEntry:
        """The chunk's analysis (all its fields, embeddings included) joins the timeline."""
        entry = TimelineEntry.from_fields(window.start, window.end, fields)
        self.context.push_entry(entry)
        return entry

    async def after(self, entry: TimelineEntry, seq: int) -> Trigger | None:
        """Detectors, then triggers, on the context as it stands after chunk `seq`."""
        if self.detectors:
            snapshot = self.context.window(self.pipeline.spec.context_seconds, end=entry.end)
            loop = asyncio.get_running_loop()
            self.findings = await loop.run_in_executor(None, detect_all, self.detectors, snapshot)
            window = snapshot.describe()
            if self.pipeline.spec.send.patterns:
                self.outbox.put(patterns_event(self.session, seq, window, self.findings))
            self.recorder.patterns(seq, {"window": window, **self.findings})  # sent or not
        return self.policy.observe(entry, self.findings)

    def reconfigure(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.policy = TriggerPolicy(
            pipeline.make_triggers(ANALYSIS_SAMPLE_RATE, start=self.context.end)
        )
