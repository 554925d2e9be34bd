"""What a session keeps, decided here and nowhere else: its records in the store, its counts in
the metrics.

Kept, whatever the client asked to receive:
- the session's info when it opens (format, options, models, pipeline);
- a timeline entry per analysed chunk with *everything the analysers produced* (embeddings
  included when the model gives them; `send.analysis` and `embeddings` only filter what is
  sent), its transcript, its `skipped` count and the number `n` of the event that reported it;
  timings are measurements of this run, not context, and are not kept;
- the detectors' findings after each chunk (sent or not);
- every error event and the `end` event, as sent.
Generations are kept by the session's generation part (stream/session/generation.py), with
their audio. The store only enqueues (never blocks); `ticket` and `committed` let the acks wait
until what was recorded before a mark is durably written.
"""

from __future__ import annotations

from typing import Any

from stream.metrics import Metrics
from stream.store import Store

WIRE_KEYS = ("type", "session", "seq", "timing")  # the event's envelope, not its content


class Recorder:
    def __init__(self, session: str, store: Store | None, metrics: Metrics | None) -> None:
        self.session, self.store, self.metrics = session, store, metrics

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
        the client) and reported as `event`."""
        if self.store is not None:
            entry = {k: v for k, v in event.items() if k not in WIRE_KEYS}
            entry.update(fields)
            seq = event["seq"]
            self.store.record_entry(self.session, seq, event["start"], event["end"], entry)

    def patterns(self, seq: int, findings: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.record_patterns(self.session, seq, findings)

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
        if kind == "error":
            self.store.record_error(self.session, event)
        elif kind == "end":
            self.store.record_end(self.session, event)
