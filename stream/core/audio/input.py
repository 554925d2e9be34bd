"""The core's input stage: client audio in any supported format -> analysis windows.

decode (validate) -> down-mix -> resample to the analysis rate -> chunk. This is the one place
where format conversion happens; transports hand over wire bytes (`feed_pcm`) or already-decoded
frames (`feed_frames`) and nothing else.
"""

from __future__ import annotations

import numpy as np

from stream.core.audio.chunker import Chunker, Window
from stream.core.audio.pcm import PcmFormat, decode, downmix
from stream.core.audio.resample import LowDelayResampler


class AudioInput:
    def __init__(self, fmt: PcmFormat, analysis_rate: int, chunker: Chunker) -> None:
        self.fmt = fmt
        self.analysis_rate = analysis_rate
        self.chunker = chunker
        # Half a short FIR (2.5 ms from 22.05 kHz up) rather than soxr's blocks (21-37 ms at
        # HQ): a chunk completes with the frame after its last sample, never two (issue 21;
        # delay and quality measured in stream/core/audio/resample.py).
        self._resampler = LowDelayResampler(fmt.sample_rate, analysis_rate)
        # Per channel, at the client's rate; a resumed stream counts from where it goes on.
        self.samples_received = self.to_client_rate(chunker.origin)

    def feed_pcm(self, data: bytes) -> list[Window]:
        """Decode one binary frame; raises PcmError (nothing is consumed) if it is invalid."""
        return self.feed_frames(decode(data, self.fmt))

    def feed_frames(self, frames: np.ndarray) -> list[Window]:
        """Take float32 (frames, channels) at the client's rate."""
        if frames.ndim != 2 or frames.shape[1] != self.fmt.channels:
            raise ValueError(f"expected (n, {self.fmt.channels}) frames, got {frames.shape}")
        self.samples_received += len(frames)
        return self.chunker.push(self._resampler.process(downmix(frames)))

    def cut_now(self, grid: int) -> list[Window]:
        """What has arrived, cut into chunks now (on the `grid`), the last one short. (The
        resampler's look-ahead, 2.5-5 ms, is still inside it: it joins the next chunk.)"""
        return self.chunker.cut_now(grid)

    def finish(self) -> list[Window]:
        """End of stream: flush the resampler and cut the last windows."""
        windows = self.chunker.push(self._resampler.flush())
        return windows + self.chunker.finish()

    def to_client_rate(self, position: int) -> int:
        """An analysis-rate timeline position in the client's samples (exact on the 20 ms
        grid for rates that are multiples of 50 Hz)."""
        return position * self.fmt.sample_rate // self.analysis_rate

    @property
    def seconds_received(self) -> float:
        return self.samples_received / self.fmt.sample_rate
