"""A session's rolling context: its recent audio and the analysis timeline over it, bounded.

The session appends every chunk's audio as it is cut (skipped chunks too: their audio is still
part of what was heard) and every analysed chunk's results as a `TimelineEntry`. `window()` takes
a snapshot of the last N seconds for pattern detection and generation, so the model work that
follows never reads state the session is still changing. Time is the session's sample clock at
the analysis rate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream.core.audio.ring import RingBuffer


@dataclass(frozen=True)
class TimelineEntry:
    """What the analysers said about one chunk [start, end). The session fills it in from the
    chunk's event fields (stream/session/steps.py: the core does not read the analysers' JSON)."""

    start: int
    end: int
    rms_dbfs: float | None = None
    pitch_hz: float | None = None
    speech: bool | None = None  # None when no voice activity detector ran
    speech_ratio: float | None = None
    text: str = ""  # transcript finalised in this chunk
    label: str | None = None  # a classification checkpoint's top label for the chunk
    embedding: np.ndarray | None = field(default=None, repr=False)
    # Every analyser's fields for the chunk, as in its event: what custom steps read.
    fields: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class ContextWindow:
    """A snapshot: audio [start, end) and the entries of the chunks that lie in it."""

    start: int
    end: int
    sample_rate: int
    audio: np.ndarray = field(repr=False)
    entries: tuple[TimelineEntry, ...] = field(repr=False)

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / self.sample_rate

    def describe(self) -> dict[str, float]:
        """Where the window lies on the session timeline, in seconds (for events and records)."""
        return {
            "start": round(self.start / self.sample_rate, 3),
            "end": round(self.end / self.sample_rate, 3),
        }


class RollingContext:
    def __init__(self, seconds: float, sample_rate: int, origin: int = 0) -> None:
        """`origin`: the timeline position of the first audio pushed (a session that goes on
        from storage starts its context where it goes on, or where a kept context began)."""
        if seconds <= 0:
            raise ValueError("the context must hold some audio")
        self.sample_rate = sample_rate
        self.capacity = round(seconds * sample_rate)
        self._audio = RingBuffer(self.capacity, origin)
        self._entries: deque[TimelineEntry] = deque()

    @property
    def analysed_to(self) -> int | None:
        """Timeline sample one past the newest chunk with an entry (None: none yet)."""
        return self._entries[-1].end if self._entries else None

    @property
    def end(self) -> int:
        """Timeline sample one past the newest audio held."""
        return self._audio.end

    def push_audio(self, start: int, samples: np.ndarray) -> None:
        """The chunk's audio at timeline position `start` (chunks arrive in order, tiling)."""
        if start != self._audio.end:
            raise ValueError(f"audio at {start} does not follow the context's end {self.end}")
        self._audio.write(samples)

    def push_entry(self, entry: TimelineEntry) -> None:
        self._entries.append(entry)
        oldest = self._audio.start
        while self._entries and self._entries[0].end <= oldest:
            self._entries.popleft()

    def window(self, seconds: float | None = None, end: int | None = None) -> ContextWindow:
        """The `seconds` of audio before `end` (default: the newest; all held when None), and
        the entries of the chunks in it. Audio may run ahead of analysis: a trigger asks for
        the window that ends where it fired."""
        end = self.end if end is None else min(end, self.end)
        span = self.capacity if seconds is None else round(seconds * self.sample_rate)
        start = min(max(self._audio.start, end - span), end)
        entries = tuple(e for e in self._entries if e.end > start and e.start < end)
        return ContextWindow(start, end, self.sample_rate, self._audio.read(start, end), entries)
