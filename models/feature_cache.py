"""Conv features of each stream, kept so that overlapping windows compute each frame once.

A window starting at timeline sample `s` (on the 320-sample grid) holds the frames
`s / 320 + j`; the next window of the same stream starts one chunk later and shares its
left-context frames with this one. For "layer"-norm checkpoints a frame's conv features depend on
its own 400 samples only, so the cached copy is exactly what the encoder would compute again.
Only the latest window's frames are kept per stream (the next window never reaches further
back), and at most `max_streams` streams, least recently used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class FeatureCache:
    def __init__(self, max_streams: int = 256) -> None:
        self.max_streams = max_streams
        self._streams: OrderedDict[str, tuple[int, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()  # engines may run several worker threads

    def __len__(self) -> int:
        return len(self._streams)

    def lookup(self, stream: str, first_frame: int, frames: int) -> np.ndarray | None:
        """Cached features of frames [first_frame, first_frame + k), the longest such prefix of
        the `frames` wanted, as an array (k, dim); None when the cache has no prefix."""
        with self._lock:
            entry = self._streams.get(stream)
            if entry is None:
                return None
            self._streams.move_to_end(stream)
        cached_first, features = entry
        offset = first_frame - cached_first
        if offset < 0 or offset >= len(features):
            return None
        return features[offset : offset + frames]

    def store(self, stream: str, first_frame: int, features: np.ndarray) -> None:
        """Features (frames, dim) of frames from `first_frame` on; replaces what was kept."""
        with self._lock:
            self._streams[stream] = (first_frame, features)
            self._streams.move_to_end(stream)
            while len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)

    def forget(self, stream: str) -> None:
        with self._lock:
            self._streams.pop(stream, None)
