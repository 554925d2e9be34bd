"""Conv features of each stream, kept so that overlapping windows compute each frame once.

A window starting at timeline sample `s` (on the 320-sample grid) holds the frames
`s / 320 + j`; the next window of the same stream starts one chunk later and shares its
left-context frames with this one. For "layer"-norm checkpoints a frame's conv features depend on
its own 400 samples only, so the cached copy is exactly what the encoder would compute again.
Only the latest window's frames are kept per stream (the next window never reaches further
back), and at most `max_streams` streams, least recently used first out.
"""

from __future__ import annotations

import numpy as np

from models.stream_table import StreamTable


class FeatureCache:
    def __init__(self, max_streams: int = 256) -> None:
        # Per stream: the first frame kept and the features (frames, dim) from there on.
        self._streams: StreamTable[tuple[int, np.ndarray]] = StreamTable(max_streams)

    def __len__(self) -> int:
        return len(self._streams)

    def lookup(self, stream: str, first_frame: int, frames: int) -> np.ndarray | None:
        """Cached features of frames [first_frame, first_frame + k), the longest such prefix of
        the `frames` wanted, as an array (k, dim); None when the cache has no prefix."""
        entry = self._streams.get(stream)
        if entry is None:
            return None
        cached_first, features = entry
        offset = first_frame - cached_first
        if offset < 0 or offset >= len(features):
            return None
        return features[offset : offset + frames]

    def store(self, stream: str, first_frame: int, features: np.ndarray) -> None:
        """Features (frames, dim) of frames from `first_frame` on; replaces what was kept."""
        self._streams.put(stream, (first_frame, features))

    def forget(self, stream: str) -> None:
        self._streams.forget(stream)
