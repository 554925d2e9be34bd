"""A session's bounded queue of outbound events (JSON) and frames (binary: generated audio).

The policy for a client that does not read its events: once `maxsize` events wait unsent, the
session is failed with `slow_consumer` (the queued events are dropped, the error is sent, and the
connection closes with 1008). Nothing is dropped silently, and a slow reader costs the server a
bounded amount of memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

from stream.metrics import Metrics
from stream.protocol import CloseCode, ProtocolError
from stream.store import Store


@dataclass
class Outgoing:
    event: dict[str, Any] | None  # a JSON event, or None for a binary frame
    # monotonic time the event's audio was complete; the sender turns it into latency_ms
    ready_at: float | None = None
    data: bytes | None = None  # the binary frame


class Outbox:
    def __init__(
        self,
        session: str,
        maxsize: int,
        metrics: Metrics | None = None,
        store: Store | None = None,
    ) -> None:
        self.session = session
        self.metrics = metrics
        self.store = store
        self.maxsize = maxsize
        self._items: deque[Outgoing] = deque()
        self._wakeup = asyncio.Event()
        self._closed_event = asyncio.Event()
        self.closed = False
        self.close_code = CloseCode.NORMAL

    def put(self, event: dict[str, Any], ready_at: float | None = None) -> None:
        self._append(Outgoing(event, ready_at))

    def put_binary(self, data: bytes) -> None:
        self._append(Outgoing(None, data=data))

    def _append(self, item: Outgoing) -> None:
        if self.closed:
            return
        self._count(item)
        if len(self._items) >= self.maxsize:
            self.fail(
                ProtocolError(
                    "slow_consumer",
                    f"{self.maxsize} events waited unread; read events as they arrive",
                    CloseCode.POLICY_VIOLATION,
                ),
                drop_pending=True,
            )
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
        item = Outgoing(error.to_event(self.session))
        self._count(item)
        self._items.append(item)
        self.close(error.close_code or CloseCode.INTERNAL_ERROR)

    def _count(self, item: Outgoing) -> None:
        """Every event passes here once: metrics count it, the store keeps what is context."""
        event = item.event
        kind = event["type"] if event is not None else "generation.audio"
        if self.metrics is not None:
            self.metrics.events.labels(kind).inc()
            if kind == "error":
                self.metrics.error(event)
        if self.store is None or event is None:
            return
        if kind == "analysis":
            fields = {k: v for k, v in event.items() if k not in ("type", "session", "seq")}
            self.store.record_entry(
                self.session, event["seq"], event["start"], event["end"], fields
            )
        elif kind == "error":
            self.store.record_error(self.session, event)
        elif kind == "end":
            self.store.record_end(self.session, event)

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def __len__(self) -> int:
        return len(self._items)

    async def get(self) -> Outgoing | None:
        """The next event, or None once closed and drained."""
        while not self._items:
            if self.closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._items.popleft()
