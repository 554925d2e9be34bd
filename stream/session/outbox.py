"""A session's bounded queue of outbound items: events (JSON-ready dicts) and generated audio
(typed: samples and where they belong). Each transport encodes them for its own wire: the
WebSocket as text and binary frames, WebRTC as data-channel messages and its audio track.

Once `maxsize` items wait unsent, the outbox takes no more and calls `on_overflow`: the session's
policy for a client that does not read (stream/session/session.py fails it with `slow_consumer`:
the queued events are dropped, the error is sent, and the connection closes with 1008). Nothing
is dropped silently, and a slow reader costs the server a bounded amount of memory.

Every item gets a number `n` (1, 2, ... per session; JSON events carry it). What the sender took
is kept in a bounded replay log, because a connection that breaks may lose what was in flight: a
client that resumes the session says the last `n` it received and `rewind` queues the rest again.

The outbox keeps nothing and counts nothing itself: it shows every item it queues to `on_queued`
once (the session's Recorder, stream/session/recorder.py, which decides what is kept).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stream.protocol import AUDIO_HEADER, AudioHeader, CloseCode, ProtocolError

if TYPE_CHECKING:
    from stream.session.tracing import ChunkTrace

REPLAY_ITEMS = 1024  # items kept after sending, for a client that resumes
REPLAY_BYTES = 4_000_000  # and at most this many bytes of them (generated audio is the bulk)


@dataclass(frozen=True)
class AudioOut:
    """A chunk of a generated clip: float32 mono samples at `header.sample_rate`, and where they
    belong (generation, chunk index, first sample, the encoding the client asked for, last)."""

    header: AudioHeader
    samples: np.ndarray

    @property
    def size(self) -> int:
        """Bytes on the WebSocket wire."""
        return AUDIO_HEADER.size + len(self.samples) * self.header.encoding.bytes_per_sample


@dataclass
class Outgoing:
    event: dict[str, Any] | None  # a JSON-ready event, or None for generated audio
    # monotonic time the event's audio was complete; the sender turns it into latency_ms
    ready_at: float | None = None
    audio: AudioOut | None = None
    n: int = 0  # the item's number in the session
    # For events with a `timing` object (stream/session/timing.py): when the chunk's last frame
    # arrived and when the event was queued here; `get` adds the send wait and the server's total.
    received_at: float | None = None
    queued_at: float = 0.0
    trace: ChunkTrace | None = None  # with tracing: the chunk's spans, made as it is taken

    @property
    def size(self) -> int:
        return self.audio.size if self.audio is not None else 1000  # an event: about 1 KB

    def event_to_send(self) -> dict[str, Any]:
        """The event as it leaves, with `latency_ms` (since its audio was complete) where it
        has one; every transport sends this."""
        assert self.event is not None
        if self.ready_at is not None:
            self.event["latency_ms"] = round((time.monotonic() - self.ready_at) * 1000, 3)
        return self.event


class Outbox:
    def __init__(
        self,
        session: str,
        maxsize: int,
        on_queued: Callable[[dict[str, Any] | None], None],
        on_overflow: Callable[[], None],
        first_n: int = 0,
    ) -> None:
        """`first_n`: items are numbered after it (a session restored from storage goes on
        from the client's last event). `on_queued` sees each item's event (None for generated
        audio) once, numbered, as it is queued."""
        self.session = session
        self.on_queued, self.on_overflow = on_queued, on_overflow
        self.maxsize = maxsize
        self._items: deque[Outgoing] = deque()
        self._wakeup = asyncio.Event()
        self._closed_event = asyncio.Event()
        self.closed = False
        self.close_code = CloseCode.NORMAL
        self.last_n = first_n
        self._sent: deque[Outgoing] = deque()  # the replay log, oldest first
        self._sent_bytes = 0
        self._forgotten = first_n  # the highest `n` that has left the replay log

    def put(
        self,
        event: dict[str, Any],
        ready_at: float | None = None,
        received_at: float | None = None,
        queued_at: float | None = None,
        trace: ChunkTrace | None = None,
    ) -> None:
        """`queued_at` (default now): the instant the event's `timing` says it was queued, so
        that its stages and the send wait meet exactly. `trace`: its chunk's spans, to make."""
        queued_at = time.monotonic() if queued_at is None else queued_at
        self._append(
            Outgoing(event, ready_at, received_at=received_at, queued_at=queued_at, trace=trace)
        )

    def replay(self, events: list[dict[str, Any]]) -> None:
        """Events kept in the store from before (numbered, already recorded): sent first."""
        for event in events:
            self._items.append(Outgoing(event, n=event["n"]))
            self._forgotten = min(self._forgotten, event["n"] - 1)
        if events:
            self._wakeup.set()

    def put_audio(self, audio: AudioOut) -> None:
        self._append(Outgoing(None, audio=audio))

    def _number(self, item: Outgoing) -> Outgoing:
        self.last_n += 1
        item.n = self.last_n
        if item.event is not None:
            item.event["n"] = item.n
        return item

    def _append(self, item: Outgoing) -> None:
        if self.closed:
            return
        self.on_queued(self._number(item).event)
        if len(self._items) >= self.maxsize:
            self.on_overflow()
            return
        self._items.append(item)
        self._wakeup.set()

    def close(self, code: CloseCode = CloseCode.NORMAL) -> None:
        """No more events: the sender drains what is queued, then closes with `code`."""
        if not self.closed:
            self.closed = True
            self.close_code = code
            self._wakeup.set()
            self._closed_event.set()

    def fail(self, error: ProtocolError, drop_pending: bool = False) -> None:
        """Send `error` after (or, with drop_pending, instead of) what is queued, then close."""
        if self.closed:
            return
        if drop_pending:
            self._items.clear()
        item = self._number(Outgoing(error.to_event(self.session)))
        self.on_queued(item.event)
        self._items.append(item)
        self.close(error.close_code or CloseCode.INTERNAL_ERROR)

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def __len__(self) -> int:
        return len(self._items)

    async def get(self) -> Outgoing | None:
        """The next event, or None once closed and drained. What it returns is logged for
        replay: the sender may not get it through."""
        while not self._items:
            if self.closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        item = self._items.popleft()
        if item.received_at is not None and item.event is not None and "timing" in item.event:
            now = time.monotonic()
            item.event["timing"]["send_ms"] = round(max(0.0, now - item.queued_at) * 1000, 3)
            item.event["timing"]["server_ms"] = round(max(0.0, now - item.received_at) * 1000, 3)
        if item.trace is not None:  # the send stage ends here (stream/session/tracing.py)
            item.trace.sent(time.monotonic())
            item.trace = None
        self._sent.append(item)
        self._sent_bytes += item.size
        while len(self._sent) > REPLAY_ITEMS or self._sent_bytes > REPLAY_BYTES:
            gone = self._sent.popleft()
            self._sent_bytes -= gone.size
            self._forgotten = gone.n
        return item

    @property
    def drained(self) -> bool:
        """Closed, and everything queued has been taken by a sender."""
        return self.closed and not self._items

    def rewind(self, last_received: int) -> int:
        """A client resumes having received items up to `last_received`: queue the later ones
        again, ahead of anything new. Returns how many are gone from the log (0 if none)."""
        again = [item for item in self._sent if item.n > last_received]
        self._sent.clear()
        self._sent_bytes = 0
        self._items.extendleft(reversed(again))
        if again:
            self._wakeup.set()
        return max(0, self._forgotten - max(last_received, 0))
