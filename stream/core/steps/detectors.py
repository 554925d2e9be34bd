"""Pattern detectors as pipeline steps: each reads the rolling context window and adds one
finding (JSON-ready) that later steps read: triggers (the `novelty` trigger needs the `novelty`
detector) and the session's `patterns` events.

They wrap the measurements of patterns.py. A new detector is one class: subclass `Detector`,
give it a `name` (and an `Options` dataclass if it takes settings), write `detect`, and
decorate it with `@register`. numpy only; the session runs them off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from annotated_types import Ge, Le

from stream.core.steps import patterns
from stream.core.steps.context import ContextWindow
from stream.core.steps.registry import NoOptions, Registry


class Detector:
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    def detect(self, window: ContextWindow) -> Any:
        raise NotImplementedError


DETECTORS: Registry[Detector] = Registry("detector")
register = DETECTORS.register


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


@register
class Loudness(Detector):
    name = "loudness"

    def detect(self, window: ContextWindow) -> dict[str, Any]:
        level, dynamics = patterns.loudness(window.audio)
        return {"dbfs": _round(level), "dynamics_db": _round(dynamics)}


@register
class Rhythm(Detector):
    name = "rhythm"

    def detect(self, window: ContextWindow) -> dict[str, Any]:
        rate, bpm = patterns.onsets(window.audio, window.sample_rate)
        return {"onset_rate_hz": _round(rate), "tempo_bpm": _round(bpm)}


@register
class Pitch(Detector):
    name = "pitch"

    def detect(self, window: ContextWindow) -> dict[str, Any]:
        low, high = patterns.pitch_range(window.audio, window.sample_rate)
        return {"low_hz": _round(low), "high_hz": _round(high)}


@register
class Balance(Detector):
    name = "balance"

    def detect(self, window: ContextWindow) -> dict[str, Any]:
        speech, sound, silence = patterns.balance(window)
        return {"speech": _round(speech), "sound": _round(sound), "silence": _round(silence)}


@register
class Novelty(Detector):
    name = "novelty"

    def detect(self, window: ContextWindow) -> float | None:
        return _round(patterns.novelty(window))


@register
class Repetition(Detector):
    name = "repetition"

    def detect(self, window: ContextWindow) -> dict[str, Any]:
        strength, period = patterns.repetition(window.audio, window.sample_rate)
        return {"strength": _round(strength), "period_s": _round(period)}


@register
class Keywords(Detector):
    name = "keywords"

    @dataclass(frozen=True)
    class Options:
        top: Annotated[int, Ge(1), Le(20)] = 3

    def detect(self, window: ContextWindow) -> list[str]:
        return list(patterns.keywords(window, self.options.top))


def detect_all(detectors: Sequence[Detector], window: ContextWindow) -> dict[str, Any]:
    """Every detector's finding on `window`, by name."""
    return {detector.name: detector.detect(window) for detector in detectors}
