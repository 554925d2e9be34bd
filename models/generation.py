"""What every generator takes and gives: the interface between generation models and the engine.

Plain data and numpy only, so the server process can speak it without importing torch; the
generator itself (models/audioldm.py) runs in the generation worker process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000  # of the audio generators return


class GenerationCancelled(Exception):
    """Raised by `AudioLDM.generate` at the first step boundary after `cancelled()` is true."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    seconds: float = 5.0
    seed: int = 0
    steps: int = 10
    guidance: float = 2.5
    negative_prompt: str = ""
    scheduler: str = "dpm++"  # or "ddim"
    source: np.ndarray | None = field(default=None, repr=False)  # 16 kHz mono for a variation
    strength: float = 0.6  # variation only: 0 = the source's own latent, 1 = pure noise

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError("strength must be within [0, 1]")
        if self.steps < 1 or self.seconds <= 0:
            raise ValueError("steps must be >= 1 and seconds > 0")


@dataclass
class AudioBlock:
    """A stretch of the generated clip: samples [start, start + len(audio)) at SAMPLE_RATE."""

    index: int
    start: int
    audio: np.ndarray
    last: bool
    timings: dict[str, Any] | None = None  # on the last block: seconds per stage


@dataclass
class Callbacks:
    """What a generator calls as it goes. `cancelled` runs at every step and block boundary: the
    caller may also pause the generator there (the generation worker yields to analysis)."""

    on_step: Callable[[int, int], None] = lambda step, total: None  # after step (1-based) of N
    cancelled: Callable[[], bool] = lambda: False  # True: it raises GenerationCancelled there
