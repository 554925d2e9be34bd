"""The one small interface every analysis model runner implements.

Runners are plain synchronous code: the analysis engine (stream/engines/analysis.py) calls
`analyse` from its own executor thread, never from the event loop. A runner receives a batch of
windows, possibly from several sessions at once, and returns one result per window, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class AnalysisWindow(Protocol):
    """What a runner sees of one chunk: the audio around it and where the chunk lies in it."""

    @property
    def audio(self) -> np.ndarray:
        """float32 mono samples at the analysis rate: left context + chunk + look-ahead."""

    @property
    def chunk_start(self) -> int:
        """Index into `audio` where the chunk itself begins (= the left context's length)."""

    @property
    def chunk_end(self) -> int:
        """Index into `audio` where the chunk ends (the look-ahead follows)."""

    @property
    def audio_start(self) -> int:
        """Position of audio[0] on the session's timeline, in samples since the start."""

    @property
    def stream(self) -> str:
        """Which stream (session) the window belongs to; "" when anonymous. Runners that keep
        per-stream state key it by this and drop it in `release`."""


class AnalysisResult(Protocol):
    def to_event(self) -> dict[str, Any]:
        """JSON-ready fields merged into the `analysis` event of the chunk."""


class Analyser(Protocol):
    name: str
    sample_rate: int

    def analyse(self, windows: Sequence[AnalysisWindow]) -> list[AnalysisResult]:
        """Analyse a batch of windows; one result per window, in the same order."""

    def release(self, stream: str) -> None:
        """The stream ended: forget anything kept for it (a no-op for stateless runners)."""
