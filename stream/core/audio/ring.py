"""A bounded ring buffer on the session's sample timeline.

Positions are absolute sample indices since the session began (int, never wraps), so readers
ask for `[start, end)` of the timeline and the buffer says clearly when that audio is gone.
"""

from __future__ import annotations

import numpy as np


class Evicted(LookupError):
    """The requested range starts before the oldest sample still held."""


class RingBuffer:
    def __init__(self, capacity: int, origin: int = 0) -> None:
        """`origin`: the timeline position of the first sample written (a session resumed
        from storage goes on where it was)."""
        if capacity <= 0 or origin < 0:
            raise ValueError("capacity must be positive, origin non-negative")
        self.capacity = capacity
        self.origin = origin
        self._data = np.zeros(capacity, np.float32)
        self._end = origin  # absolute index one past the newest sample

    @property
    def end(self) -> int:
        """Samples written since the start of the timeline."""
        return self._end

    @property
    def start(self) -> int:
        """Absolute index of the oldest sample still held."""
        return max(self.origin, self._end - self.capacity)

    def write(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, dtype=np.float32)
        n = len(samples)
        if n >= self.capacity:
            # Only the newest `capacity` samples can survive anyway.
            self._data[:] = samples[n - self.capacity :]
            self._roll_to(self._end + n)
            return
        pos = self._end % self.capacity
        first = min(n, self.capacity - pos)
        self._data[pos : pos + first] = samples[:first]
        self._data[: n - first] = samples[first:]
        self._end += n

    def _roll_to(self, new_end: int) -> None:
        # After a full overwrite the data starts at index 0; rotate so that the
        # modular position of absolute index `new_end` is where the next write goes.
        self._data = np.roll(self._data, new_end % self.capacity)
        self._end = new_end

    def read(self, start: int, end: int) -> np.ndarray:
        """A copy of the timeline's samples [start, end)."""
        if start < self.start:
            raise Evicted(f"samples from {start} were evicted (oldest held: {self.start})")
        if end > self._end or start > end:
            raise ValueError(f"range [{start}, {end}) not within [{self.start}, {self._end})")
        a, b = start % self.capacity, end % self.capacity
        if end - start == 0:
            return np.zeros(0, np.float32)
        if a < b:
            return self._data[a:b].copy()
        return np.concatenate([self._data[a:], self._data[:b]])
