"""What every store does the same way: writes enqueued from the event loop, committed in batches.

The server calls the `record_*` methods from the event loop; they only enqueue a `Write` (never
block, never touch the database). A writer thread drains the queue in batches, one transaction
each, so a crash leaves the last committed batch whole. `committed` counts the writes durably in:
acknowledgements wait for it. One `Write` is one unit: an analysed chunk's timeline entry and the
event that reported it go in together, so a store never holds one without the other.

A backend says how a batch is committed (`_commit`) and how it connects; a batch that fails for
a lost connection is kept and tried again on a new one (PostgreSQL restarting) while the queue,
bounded, takes new writes; past its bound writes are dropped and counted, never blocking.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
BATCH_MAX = 500  # writes per transaction
QUEUE_MAX = 100_000  # writes waiting; beyond, record_* drops and counts (never blocks)
RETRY_MAX_S = 5.0  # the longest wait between tries of a batch whose connection was lost
# Events that are not kept for replay: acks are superseded by the next one (and by `ready`),
# analysis events go in with their timeline entry.
NOT_REPLAYED = ("ack", "analysis")


class StoreUnavailable(Exception):
    """The database cannot be reached just now (PostgreSQL restarting, the network): what
    needs it right away (opening, resuming, reading) is refused, and writes wait."""


@dataclass(frozen=True)
class Write:
    """One record for the writer thread: `kind` names the statement(s), `args` their values
    (JSON already encoded), `session` whose it is (a shared store checks ownership by it)."""

    kind: str
    session: str
    args: tuple[Any, ...]

    @property
    def values(self) -> dict[str, Any]:
        """For the statements: `session`, and the args as `a0`, `a1`, ..."""
        return {"session": self.session, **{f"a{i}": v for i, v in enumerate(self.args)}}


class BatchWriter:
    """The enqueueing half of a store and its writer thread; subclasses commit batches."""

    batch_seconds: float
    # What the backend raises when its database cannot be reached: the batch is tried again.
    unreachable: tuple[type[Exception], ...] = ()

    def _start_writer(self) -> None:
        self._queue: queue.Queue[Write | None] = queue.Queue(QUEUE_MAX)
        self.enqueued = 0  # writes accepted by record_*
        self.committed = 0  # writes durably in (each batch is one transaction)
        self.dropped = 0  # not taken: the queue was full
        self.rejected = 0  # taken, but the database refused them (a bug: logged)
        self.failing = False  # the last try of a batch failed: the database is unreachable
        self._done = threading.Condition()
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    # --- writes: from the event loop, enqueue only ------------------------------------------

    def _put(self, kind: str, session: str, *args: Any) -> None:
        try:
            self._queue.put_nowait(Write(kind, session, args))
            self.enqueued += 1
        except queue.Full:
            self.dropped += 1

    def record_session(self, session: str, info: dict[str, Any]) -> None:
        self._put("session", session, time.time(), json.dumps(info))

    def record_entry(
        self, session: str, seq: int, start: float, end: float, fields: dict[str, Any]
    ) -> None:
        """A timeline entry with no event (tests, imports); the server uses record_analysis."""
        self._put("entry", session, seq, start, end, json.dumps(fields))

    def record_analysis(
        self, session: str, seq: int, start: float, end: float, fields: dict[str, Any],
        event: dict[str, Any],
    ) -> None:  # fmt: skip
        """Chunk `seq`'s timeline entry and the `analysis` event that reported it, together."""
        entry = (seq, start, end, json.dumps(fields))
        self._put("analysis", session, *entry, event["n"], json.dumps(event))

    def record_event(self, session: str, event: dict[str, Any]) -> None:
        """An event as sent (numbered `n`), for a client that resumes after `last_event`."""
        if event.get("type") not in NOT_REPLAYED and "n" in event:
            self._put("event", session, event["n"], json.dumps(event))

    def record_generation(
        self, session: str, number: int, record: dict[str, Any], audio: str | None
    ) -> None:
        """Generation `number` ended as `record` says; `audio`: its clip's name (keep_clip)."""
        self._put("generation", session, number, time.time(), json.dumps(record), audio)

    def record_patterns(self, session: str, seq: int, findings: dict[str, Any]) -> None:
        """The detectors' findings after chunk `seq`, kept with its timeline entry."""
        self._put("patterns", session, json.dumps(findings), seq)

    def record_error(self, session: str, event: dict[str, Any]) -> None:
        self._put("error", session, time.time(), event.get("code", ""), json.dumps(event))

    def record_end(self, session: str, summary: dict[str, Any]) -> None:
        self._put("end", session, time.time(), json.dumps(summary))

    def record_context(self, session: str, start: int, pcm: bytes) -> None:
        """The session's rolling context as it moves: 16-bit audio from sample `start`."""
        self._put("context", session, start, pcm)

    def release(self, session: str) -> None:
        """The session's records are all given: its lease goes (after them, in order)."""
        self._put("release", session)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything enqueued so far is committed (shutdown, hand-over, tests)."""
        target = self.enqueued
        deadline = time.monotonic() + timeout
        with self._done:
            while self.committed < target and self._writer.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._done.wait(remaining)
        return self.committed >= target

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(30)
        self._disconnect()

    # --- the writer thread ------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, stop = self._gather(item)
            self._commit_until_done(batch)
            with self._done:
                self.committed += len(batch)
                self._done.notify_all()
            if stop:
                return

    def _gather(self, first: Write) -> tuple[list[Write], bool]:
        """`first` and what follows within batch_seconds (at most BATCH_MAX); True: close."""
        batch = [first]
        deadline = time.monotonic() + self.batch_seconds
        while len(batch) < BATCH_MAX:
            try:
                more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if more is None:
                return batch, True
            batch.append(more)
        return batch, False

    def _commit_until_done(self, batch: list[Write]) -> None:
        """Commit `batch`; while the database is unreachable, try again with backoff (the
        writes wait, in order: acks wait with them). A batch the database refuses is a bug:
        its writes are tried one by one so that only the bad one is lost (and logged)."""
        wait = 0.1
        while True:
            try:
                self._commit(batch)
                if self.failing:
                    log.warning("the store is reachable again")
                self.failing = False
                return
            except self.unreachable as exc:
                if not self.failing:
                    log.warning("the store is unreachable (%s); writes wait", exc)
                self.failing = True
                self._disconnect()
                time.sleep(wait)
                wait = min(wait * 2, RETRY_MAX_S)
            except Exception:
                self._disconnect()
                if len(batch) == 1:
                    log.exception("the store refused a %s write", batch[0].kind)
                    self.rejected += 1
                    return
                for write in batch:
                    self._commit_until_done([write])
                return

    def _commit(self, batch: list[Write]) -> None:
        raise NotImplementedError

    def _disconnect(self) -> None:
        """Drop the writer's connection (it is made again for the next batch)."""
