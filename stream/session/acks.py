"""A session's acknowledgements: how much of its audio the client may forget.

The session marks each chunk it is done with (analysed, or failed and reported) with the input
position the server will never need again; a mark counts once the store has committed every
record enqueued before it, so a crash of the server loses nothing acknowledged. A loop sends
`{"type": "ack", "samples": N}` when N moves, and again at least once a second as a heartbeat,
while a connection holds the session; `final` acknowledges everything before `end`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from stream.protocol import ack_event
from stream.session.outbox import Outbox
from stream.session.recorder import Recorder

log = logging.getLogger(__name__)
TICK_S = 0.25  # how often the position is looked at
EVERY_S = 0.9  # an unchanged position is acknowledged again this often (a heartbeat)


class Acks:
    def __init__(self, session: str, outbox: Outbox, recorder: Recorder) -> None:
        self.session, self.outbox, self.recorder = session, outbox, recorder
        self.acked = 0
        # (store records enqueued, input samples): acknowledged once those records are in.
        self._marks: deque[tuple[int, int]] = deque()

    def mark(self, samples: int) -> None:
        """The input before `samples` is done with, once what was recorded so far is in."""
        self._marks.append((self.recorder.ticket, samples))

    async def run(self, attached: Callable[[], bool]) -> None:
        last_sent, sent_at = -1, 0.0
        while not self.outbox.closed:
            await asyncio.sleep(TICK_S)
            committed = self.recorder.committed
            while self._marks and self._marks[0][0] <= committed:
                self.acked = max(self.acked, self._marks.popleft()[1])
            now = time.monotonic()
            if not attached() or self.outbox.closed:
                continue  # nobody to tell; a resuming client learns from `ready`
            if self.acked != last_sent or now - sent_at >= EVERY_S:
                self.outbox.put(ack_event(self.session, self.acked))
                last_sent, sent_at = self.acked, now

    async def final(self, samples: int, timeout: float = 10.0) -> None:
        """Everything, `samples` in all, once the store has committed all it was given."""
        ticket = self.recorder.ticket
        deadline = time.monotonic() + timeout
        while self.recorder.committed < ticket:
            if time.monotonic() > deadline:
                log.warning("session %s: the store is %d records behind", self.session, ticket)
                break
            await asyncio.sleep(0.02)
        self.acked = samples
        self.outbox.put(ack_event(self.session, samples))
