"""Cut the analysis-rate stream into chunks with left context and optional look-ahead.

Chunk k covers timeline samples [k*chunk, (k+1)*chunk); the last chunk, cut at `finish()`,
covers whatever remains. A client may also end a chunk early (`cut_now`, at a turn it commits):
the chunks after it go on from there, one chunk long again. Together they tile the stream
exactly once, whatever the frame sizes.
Each window also carries up to `left_context` samples before its chunk and `lookahead` after it
(less at the edges of the stream), so models see context without any sample being reported twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream.core.audio.ring import RingBuffer


@dataclass(frozen=True)
class Window:
    index: int  # chunk number within the session, from 0
    start: int  # timeline sample where the chunk begins
    end: int  # timeline sample one past the chunk's end
    audio: np.ndarray = field(repr=False)  # [start - context, end + lookahead), clipped
    chunk_start: int  # index into `audio` where the chunk begins
    chunk_end: int  # index into `audio` where the chunk ends
    # Opaque name of the stream the window belongs to (the session id), so that a model may
    # keep per-stream state such as the conv features of overlapping windows; "" = anonymous.
    stream: str = ""

    @property
    def chunk(self) -> np.ndarray:
        return self.audio[self.chunk_start : self.chunk_end]

    @property
    def audio_start(self) -> int:
        """Timeline sample of audio[0]."""
        return self.start - self.chunk_start


class Chunker:
    def __init__(
        self,
        chunk: int,
        left_context: int = 0,
        lookahead: int = 0,
        ring: RingBuffer | None = None,
        stream: str = "",
        first_index: int = 0,
    ) -> None:
        """`first_index` > 0 resumes a stream: the first chunk cut is that one, and the audio
        pushed starts `left_context` samples before it (its context only)."""
        if chunk <= 0 or left_context < 0 or lookahead < 0:
            raise ValueError("chunk must be positive, context and look-ahead non-negative")
        self.chunk = chunk
        self.left_context = left_context
        self.lookahead = lookahead
        self.stream = stream
        needed = left_context + chunk + lookahead
        if ring is not None and ring.capacity < needed:
            raise ValueError(f"ring holds {ring.capacity} samples, windows need {needed}")
        self._next_index = first_index
        self._next_start = first_index * chunk
        origin = max(0, self.next_start - left_context)
        # Slack of one chunk: a push may complete several chunks before they are cut.
        self.ring = ring or RingBuffer(needed + chunk, origin)
        if self.ring.end != origin:
            raise ValueError(f"the ring ends at {self.ring.end}, the stream resumes at {origin}")
        self._finished = False

    @property
    def next_start(self) -> int:
        """Timeline sample where the next chunk begins (all before it are already emitted)."""
        return self._next_start

    def push(self, samples: np.ndarray) -> list[Window]:
        """Append analysis-rate samples; return the windows that became complete."""
        if self._finished:
            raise RuntimeError("chunker already finished")
        windows: list[Window] = []
        # Write no more than the ring can hold before cutting, so context is never evicted.
        pos = 0
        while pos < len(samples):
            room = self.ring.capacity - (self.ring.end - self._oldest_needed())
            take = max(1, min(len(samples) - pos, room))
            self.ring.write(samples[pos : pos + take])
            pos += take
            windows.extend(self._cut(final=False))
        return windows

    def finish(self) -> list[Window]:
        """End of stream: cut the remaining chunks with whatever look-ahead exists."""
        if self._finished:
            return []
        self._finished = True
        return self._cut(final=True)

    def cut_now(self, grid: int = 1) -> list[Window]:
        """Cut what has arrived, up to the last multiple of `grid` samples after the next
        chunk's start, without waiting for the look-ahead: the chunks go on from there."""
        if self._finished:
            return []
        windows = self._cut(final=False)
        limit = self.next_start + (self.ring.end - self.next_start) // grid * grid
        while self.next_start < limit:
            windows.append(self._window(min(self.next_start + self.chunk, limit)))
        return windows

    @property
    def origin(self) -> int:
        """Timeline sample of the first audio pushed (0, or where a resumed stream goes on)."""
        return self.ring.origin

    def _oldest_needed(self) -> int:
        return max(self.origin, self.next_start - self.left_context)

    def _cut(self, final: bool) -> list[Window]:
        out = []
        while True:
            start = self.next_start
            end = min(start + self.chunk, self.ring.end)
            complete = start + self.chunk + self.lookahead <= self.ring.end
            if not complete and not (final and end > start):
                return out
            out.append(self._window(end))

    def _window(self, end: int) -> Window:
        """The next chunk, ending at `end`, with what context and look-ahead there is."""
        start, total = self.next_start, self.ring.end
        audio_from = max(self.origin, start - self.left_context)
        audio_to = min(end + self.lookahead, total)
        window = Window(
            index=self._next_index,
            start=start,
            end=end,
            audio=self.ring.read(audio_from, audio_to),
            chunk_start=start - audio_from,
            chunk_end=end - audio_from,
            stream=self.stream,
        )
        self._next_index += 1
        self._next_start = end
        return window
