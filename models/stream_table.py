"""Per-stream state kept by a model runner between a stream's windows.

Runners serve many streams (a session's id travels with its windows as `stream`) from several
worker threads. What they keep per stream (conv features, normalisation statistics, voice
activity state) lives in a `StreamTable`: at most `max_streams` entries, least recently used
first out, so that streams that ended without a `release` cannot grow it without bound. Each
call holds the table's lock only for the dictionary itself: a stream's windows come one at a
time (its session awaits each), so its entry is never used by two threads at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class StreamTable(Generic[T]):
    def __init__(self, max_streams: int = 256) -> None:
        self.max_streams = max_streams
        self._entries: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, stream: object) -> bool:
        return stream in self._entries

    def get(self, stream: str) -> T | None:
        """The stream's entry (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(stream)
            if entry is not None:
                self._entries.move_to_end(stream)
            return entry

    def put(self, stream: str, entry: T) -> None:
        """Keep `entry` for the stream, replacing what it had; the least recently used streams
        go while there are more than `max_streams`."""
        with self._lock:
            self._entries[stream] = entry
            self._touch(stream)

    def setdefault(self, stream: str, new: Callable[[], T]) -> T:
        """The stream's entry, made by `new()` and kept when it has none."""
        with self._lock:
            entry = self._entries.get(stream)
            if entry is None:
                entry = self._entries[stream] = new()
            self._touch(stream)
            return entry

    def forget(self, stream: str) -> None:
        with self._lock:
            self._entries.pop(stream, None)

    def _touch(self, stream: str) -> None:
        """Most recently used now; the least recently used go past `max_streams` (lock held)."""
        self._entries.move_to_end(stream)
        while len(self._entries) > self.max_streams:
            self._entries.popitem(last=False)
