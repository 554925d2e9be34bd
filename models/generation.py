"""What every generator takes and gives: the interface between generation models and the engine.

Plain data and numpy only, so the server process can speak it without importing torch; the
generator itself (models/audioldm.py) runs in the generation worker process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000  # of the audio generators return
MEL_HOP = 160  # samples per mel frame (AudioLDM's features): 100 frames per second


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
    # A segment of a continuous stream (SegmentPlan): `seconds` of latent, of which the first
    # `seconds - hop_seconds` continue `continuation` (None: the stream's first segment).
    hop_seconds: float | None = None
    crossfade_seconds: float = 0.1
    continuation: Continuation | None = field(default=None, repr=False)
    # Opt-in approximations (models/audioldm_unet.py): guidance on this share of the steps, the
    # first ones (1: every step); the whole UNet every n-th step, its deep feature reused between.
    guidance_until: float = 1.0
    deep_cache_interval: int = 1
    # A clip's first audio before the whole VAE decode (models/audioldm.py VAE_FIRST_ROWS).
    progressive_vae: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError("strength must be within [0, 1]")
        if self.steps < 1 or self.seconds <= 0:
            raise ValueError("steps must be >= 1 and seconds > 0")
        if not 0.0 <= self.guidance_until <= 1.0 or self.deep_cache_interval < 1:
            raise ValueError("guidance_until must be within [0, 1], deep_cache_interval >= 1")
        if self.hop_seconds is not None:
            if not 0 < self.hop_seconds < self.seconds:
                raise ValueError("hop_seconds must be > 0 and shorter than seconds")
            if self.source is not None:
                raise ValueError("a segment of a continuous stream takes no source audio")
        elif self.continuation is not None:
            raise ValueError("a continuation needs hop_seconds")


@dataclass(frozen=True)
class Continuation:
    """What the next segment of a continuous stream goes on from (plain arrays: it travels
    between the session and the worker, or a Ray replica, with each segment)."""

    latents: np.ndarray  # (channels, rows, bins): the latent rows the next segment overlaps
    tail: np.ndarray  # 16 kHz audio held back to crossfade into the next segment

    def fade_out(self) -> np.ndarray:
        """The held-back tail faded to silence: how a stream ends without a click."""
        return (self.tail * (1.0 - _ramp(len(self.tail)))).astype(np.float32)


@dataclass(frozen=True)
class SegmentPlan:
    """Where a continuous stream's segment sits, in mel frames from the segment's start.

    A segment is `frames` long; the next one starts `hop` frames later, so the last
    `frames - hop` (the overlap) are shared: the next segment's latent is inpainted with them.
    The two are joined in the middle of the overlap (`seam` frames into the next segment: where
    each has the most context), crossfaded over `fade` frames around it. A segment emits
    [`emit_from`, `emit_to`): from the join with the segment before (`seam_in`, its first
    `fade_in` frames crossfaded with the tail that one held back) to the join with the next,
    and holds back [`emit_to`, `vocode_to`) as the next tail. While the hop stays the same, every
    segment but the first thus emits exactly `hop` frames; the first emits
    `hop + seam - fade / 2`; a stream that ends emits its tail faded out (`fade` frames). (A
    stream that lengthens its hop joins the next segment where the overlap it had says: the
    continuation's rows.)
    """

    frames: int
    hop: int
    seam: int  # the join with the next segment
    fade: int
    seam_in: int = 0  # the join with the segment before (none: the stream's first)
    fade_in: int = 0

    @classmethod
    def of(cls, request: GenerationRequest, row: int) -> SegmentPlan:
        """`row`: mel frames per latent row (hop and length are whole rows)."""
        assert request.hop_seconds is not None
        rows = max(2, round(request.seconds * SAMPLE_RATE / MEL_HOP / row))
        hop = min(rows - 1, max(1, round(request.hop_seconds * SAMPLE_RATE / MEL_HOP / row)))
        overlap = (rows - hop) * row
        seam = overlap // 2
        fade = 2 * min(round(request.crossfade_seconds * SAMPLE_RATE / MEL_HOP / 2), seam,
                       overlap - seam)  # fmt: skip
        plan = cls(rows * row, hop * row, seam, fade)
        if (before := request.continuation) is not None:
            seam_in = before.latents.shape[1] * row // 2  # its overlap's middle
            plan = replace(plan, seam_in=seam_in, fade_in=len(before.tail) // MEL_HOP)
        return plan

    @property
    def emit_from(self) -> int:
        return self.seam_in - self.fade_in // 2

    @property
    def emit_to(self) -> int:
        return self.hop + self.seam - self.fade // 2

    @property
    def vocode_to(self) -> int:
        return self.emit_to + self.fade


def crossfade(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
    """`tail` (the segment before) into `head` (the same stretch of the next), equal-gain: the
    two are nearly the same signal there, so their weights sum to one."""
    fade_in = _ramp(len(head))
    return (tail * (1.0 - fade_in) + head * fade_in).astype(np.float32)


def _ramp(n: int) -> np.ndarray:
    """Raised cosine from 0 to 1 over n samples (excluding both ends)."""
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / max(n, 1))).astype(np.float32)


@dataclass
class AudioBlock:
    """A stretch of the generated clip: samples [start, start + len(audio)) at SAMPLE_RATE."""

    index: int
    start: int
    audio: np.ndarray
    last: bool
    timings: dict[str, Any] | None = None  # on the last block: seconds per stage
    continuation: Continuation | None = None  # a stream's segment, on its last block


@dataclass
class Callbacks:
    """What a generator calls as it goes. `cancelled` runs at every step and block boundary: the
    caller may also pause the generator there (the generation worker yields to analysis)."""

    on_step: Callable[[int, int], None] = lambda step, total: None  # after step (1-based) of N
    cancelled: Callable[[], bool] = lambda: False  # True: it raises GenerationCancelled there
