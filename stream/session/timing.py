"""Per-stage timings of one analysis event, for sessions that ask (`config.timing: true`).

A chunk's way through the server, each stage in milliseconds, in order (they add up to
`server_ms`, from the arrival of the frame that completed the chunk to the event being handed to
the transport's socket):

- `decode_ms`: that frame decoded, down-mixed, resampled and chunked (receive -> chunk ready);
- `backlog_ms`: waiting in the session's own backlog while its previous chunk was analysed;
- `queue_ms`: waiting in the model engine's queue (other sessions' batches running);
- `batch_wait_ms`: waiting for the batch it joined to fill (`analysis_max_wait_ms`);
- `inference_ms`: the model run on that batch (`batch` windows), back on the event loop;
- `post_ms`: merging the engines' fields, transcript stitching, pipeline steps, outbox;
- `send_ms`: waiting in the session's outbox for the transport to take it.

Engines run side by side: the queue, batch and inference stages are those of the engine that
finished last (the one the event waited for); `engines` has every engine's own.

With `--inference ray`, an engine's `inference_ms` is a call to a Ray Serve replica, and its
`remote` object splits it: `transfer_ms` (serialising, the pipe to the bridge process, Ray's
RPCs, both ways), `replica_queue_ms` (waiting on the replica for its batch), and
`replica_inference_ms` (the model run), with the replica's batch: `replica_batch` windows from
`replica_calls` calls of `replica_frontends` front-ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stream.engines.analysis import Stamps

STAGES = (
    "decode_ms", "backlog_ms", "queue_ms", "batch_wait_ms", "inference_ms", "post_ms", "send_ms"
)  # fmt: skip


def _ms(seconds: float) -> float:
    return round(max(0.0, seconds) * 1000, 3)


@dataclass
class ChunkTiming:
    """The stamps of one chunk (monotonic seconds), filled in as it goes."""

    received: float  # the frame that completed the chunk arrived
    ready: float  # the chunk was cut
    engines: dict[str, Stamps] = field(default_factory=dict)

    def stamps_for(self, engine: str) -> Stamps:
        return self.engines.setdefault(engine, Stamps())

    def event_fields(self, queued_at_outbox: float) -> dict[str, Any]:
        """The `timing` object, but for `send_ms` and `server_ms`: the outbox adds those when
        the transport takes the event (`Outbox.get`)."""
        timing: dict[str, Any] = {"decode_ms": _ms(self.ready - self.received)}
        done = [s for s in self.engines.values() if s.finished]
        if done:
            last = max(done, key=lambda s: s.finished)
            timing.update(
                backlog_ms=_ms(last.queued - self.ready),
                queue_ms=_ms(last.picked - last.queued),
                batch_wait_ms=_ms(last.started - last.picked),
                inference_ms=_ms(last.finished - last.started),
                post_ms=_ms(queued_at_outbox - last.finished),
                batch=last.batch,
            )
            if last.remote is not None:
                timing["remote"] = last.remote.fields(last.finished - last.started)
        else:  # no engine answered (all failed): the whole wait is post-dispatch
            timing.update(backlog_ms=0.0, queue_ms=0.0, batch_wait_ms=0.0, inference_ms=0.0,
                          batch=0, post_ms=_ms(queued_at_outbox - self.ready))  # fmt: skip
        timing["engines"] = {
            name: _engine_fields(s) for name, s in self.engines.items() if s.finished
        }
        return timing


def _engine_fields(s: Stamps) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "queue_ms": _ms(s.picked - s.queued),
        "batch_wait_ms": _ms(s.started - s.picked),
        "inference_ms": _ms(s.finished - s.started),
        "batch": s.batch,
    }
    if s.remote is not None:  # the inference stage, split: transfer, replica queue, replica run
        fields["remote"] = s.remote.fields(s.finished - s.started)
    return fields
