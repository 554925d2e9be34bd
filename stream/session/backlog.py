"""A session's chunks waiting for analysis, and its policy when analysis falls behind.

More than `limit` chunks waiting means analysis is behind real time:
- `skip` drops the oldest waiting chunk, so latency stays bounded. Its audio stays on the
  timeline (it was heard); the next chunk analysed reports how many were skipped before it.
- `wait` is back-pressure: the transport awaits `room()` after each frame, so it reads no more
  input until analysis has caught up (the client's socket buffers fill and it slows down).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from stream.core.audio.chunker import Window


@dataclass
class Pending:
    window: Window
    ready_at: float  # monotonic time the chunk was cut (its last sample decoded)
    received_at: float  # and when the frame that held that sample arrived
    live: bool = True  # its session sends at about real time (the engines serve it first)
    # Not a chunk: the client's commit (/v1/realtime), its utterance ending at `window.start`
    # after the chunks before it (the window holds no audio).
    commit: bool = False


class Backlog:
    def __init__(
        self, limit: int, when_behind: str, on_skip: Callable[[], None] = lambda: None
    ) -> None:
        self.limit, self.when_behind, self.on_skip = limit, when_behind, on_skip
        self._waiting: deque[Pending] = deque()
        self._changed = asyncio.Event()
        self.skipped = 0  # in all
        self._skipped_since = 0  # since the last chunk taken

    def __len__(self) -> int:
        return len(self._waiting)

    def push(self, chunk: Pending) -> None:
        self._waiting.append(chunk)
        if self.when_behind == "skip":
            while len(self._waiting) > self.limit:
                self._waiting.popleft()
                self._skipped_since += 1
                self.skipped += 1
                self.on_skip()
        self._changed.set()

    async def room(self, ended: Callable[[], bool]) -> None:
        """With `wait`: returns once no more than `limit` chunks wait (or the session ended)."""
        while self.when_behind == "wait" and len(self._waiting) > self.limit and not ended():
            self._changed.clear()
            await self._changed.wait()

    async def take(self, input_closed: Callable[[], bool]) -> tuple[Pending, int] | None:
        """The oldest waiting chunk and how many were skipped just before it; None once the
        input is closed and nothing waits."""
        while not self._waiting:
            if input_closed():
                return None
            self._changed.clear()
            await self._changed.wait()
        chunk = self._waiting.popleft()
        self._changed.set()  # wakes a producer waiting for room
        skipped, self._skipped_since = self._skipped_since, 0
        return chunk, skipped

    def wake(self) -> None:
        """Something the waiters watch changed (the input closed, the session ended)."""
        self._changed.set()
