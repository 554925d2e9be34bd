"""What a session keeps, decided here and nowhere else: its records in the store, its counts in
the metrics.

Kept, whatever the client asked to receive:
- the session's info when it opens (format, options, models, pipeline);
- a timeline entry per analysed chunk with *everything the analysers produced* (embeddings
  included when the model gives them; `send.analysis` and `embeddings` only filter what is
  sent), its transcript, its `skipped` count and the number `n` of the event that reported it;
  timings are measurements of this run, not context, and are not kept;
- the detectors' findings after each chunk (sent or not);
- every generation's record (prompt, options, outcome, timings) and its clip as FLAC, written
  off the loop, the record naming the clip once it is kept;
- every event as sent, numbered (acks aside, and analysis events go in with their timeline
  entries), so a client that resumes on any front-end gets what it missed after `last_event`;
  error events and the `end` also in their own places.
The store only enqueues (never blocks); `ticket` and `committed` let the acks wait until what was
recorded before a mark is durably written, and `written` until every clip is on disk.
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from models.generation import SAMPLE_RATE as GENERATED_RATE
from stream.metrics import Metrics
from stream.store import Store

if TYPE_CHECKING:
    from stream.session.steps import KeptContext

log = logging.getLogger(__name__)

WIRE_KEYS = ("type", "session", "seq", "timing")  # the event's envelope, not its content


class Recorder:
    def __init__(self, session: str, store: Store | None, metrics: Metrics | None) -> None:
        self.session, self.store, self.metrics = session, store, metrics
        self._writes: set[asyncio.Task[None]] = set()  # clips being written

    @property
    def ticket(self) -> int:
        """How many records the store has been given so far."""
        return self.store.enqueued if self.store is not None else 0

    @property
    def committed(self) -> int:
        """How many of them are durably written."""
        return self.store.committed if self.store is not None else 0

    def opened(self, info: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.record_session(self.session, info)

    def analysed(self, event: dict[str, Any], fields: dict[str, Any]) -> None:
        """Chunk `event["seq"]` was analysed into `fields` (all of them, before any filter for
        the client) and reported as `event` (numbered: queued already)."""
        if self.store is not None:
            entry = {k: v for k, v in event.items() if k not in WIRE_KEYS}
            entry.update(fields)
            seq, start, end = event["seq"], event["start"], event["end"]
            self.store.record_analysis(self.session, seq, start, end, entry, event)

    def patterns(self, seq: int, findings: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.record_patterns(self.session, seq, findings)

    def generation(self, number: int, record: dict[str, Any], audio: np.ndarray | None) -> None:
        """Generation `number` ended as `record` says; `audio`: its clip, if it was made."""
        store, session = self.store, self.session
        if store is None:
            return
        if audio is None:
            store.record_generation(session, number, record, None)
            return

        def write() -> str:
            import soundfile as sf

            flac = io.BytesIO()
            sf.write(flac, audio, GENERATED_RATE, format="FLAC", subtype="PCM_16")
            return store.keep_clip(session, number, flac.getvalue())

        async def keep() -> None:
            try:
                name = await asyncio.get_running_loop().run_in_executor(None, write)
            except Exception:  # a full disk, the database gone: the record says it is lost
                log.exception("session %s: clip %d could not be written", session, number)
                store.record_generation(session, number, record, None)
                return
            store.record_generation(session, number, record, name)  # on the loop, in order

        task = asyncio.create_task(keep(), name=f"keep-clip-{session}-{number}")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def written(self) -> None:
        """Every generation's record is with the store (its clip written)."""
        await asyncio.gather(*self._writes, return_exceptions=True)

    def context(self, kept: KeptContext) -> None:
        """The session's rolling context as it moves (its audio; the timeline has the rest)."""
        if self.store is not None:
            self.store.record_context(self.session, kept.start, kept.pcm())

    def sent(self, event: dict[str, Any] | None) -> None:
        """Every item the outbox queues, once (None: a binary frame of generated audio): the
        metrics count it by type, and errors and the `end` are kept as sent."""
        kind = event["type"] if event is not None else "generation.audio"
        if self.metrics is not None:
            self.metrics.events.labels(kind).inc()
            if kind == "error":
                self.metrics.error(event)
        if self.store is None or event is None:
            return
        self.store.record_event(self.session, event)
        if kind == "error":
            self.store.record_error(self.session, event)
        elif kind == "end":
            self.store.record_end(self.session, event)
