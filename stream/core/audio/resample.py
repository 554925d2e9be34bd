"""Streaming resampler to the analysis rate.

soxr keeps its filter state between calls, so the output does not depend on how the input was
split into frames (no clicks or drift at frame boundaries); `flush()` returns the filter's tail
at the end of the stream.
"""

from __future__ import annotations

import numpy as np
import soxr


class StreamResampler:
    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        # Equal rates: pass through untouched (down-mixing still happened upstream).
        self._soxr = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality)
        )
        self._flushed = False

    def process(self, mono: np.ndarray) -> np.ndarray:
        """Resample the next piece of a mono float32 stream."""
        if self._flushed:
            raise RuntimeError("resampler already flushed")
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        if self._soxr is None:
            return mono.copy()
        return self._soxr.resample_chunk(mono)

    def flush(self) -> np.ndarray:
        """End of stream: return whatever the filter still holds."""
        if self._flushed:
            return np.zeros(0, np.float32)
        self._flushed = True
        if self._soxr is None:
            return np.zeros(0, np.float32)
        return self._soxr.resample_chunk(np.zeros(0, np.float32), last=True)
