"""Pattern detectors as pipeline steps: each reads the rolling context window and adds one
finding (JSON-ready) that later steps read: triggers (the `novelty` trigger needs the `novelty`
detector) and the session's `patterns` events.

The built-in ones are named views of the window's `Measurements` (patterns.py): each reports, as
JSON, measurements computed once per window, which the chunk's other detectors and a prompt over
the same window share. A new detector is one class: subclass `Detector`, give it a `name` (and an
`Options` dataclass if it takes settings), write `detect`, and decorate it with `@register`.
numpy only; the session runs them off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from annotated_types import Ge, Le

from stream.core.steps.context import ContextWindow
from stream.core.steps.patterns import Measurements
from stream.core.steps.registry import NoOptions, Registry


class Detector:
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    def detect(self, window: ContextWindow) -> Any:
        """The finding on `window` (what a plugin's detector writes)."""
        raise NotImplementedError

    def read(self, measured: Measurements) -> Any:
        """The finding on `measured.window`, given the measurements shared by the window's other
        readers; by default, `detect` on the window."""
        return self.detect(measured.window)


class MeasuredDetector(Detector):
    """A detector that reports measurements of patterns.py: it writes `read`."""

    def detect(self, window: ContextWindow) -> Any:
        return self.read(Measurements(window))

    def read(self, measured: Measurements) -> Any:
        raise NotImplementedError


DETECTORS: Registry[Detector] = Registry("detector")
register = DETECTORS.register


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


@register
class Loudness(MeasuredDetector):
    name = "loudness"

    def read(self, measured: Measurements) -> dict[str, Any]:
        level, dynamics = measured.loudness()
        return {"dbfs": _round(level), "dynamics_db": _round(dynamics)}


@register
class Rhythm(MeasuredDetector):
    name = "rhythm"

    def read(self, measured: Measurements) -> dict[str, Any]:
        rate, bpm = measured.onsets()
        return {"onset_rate_hz": _round(rate), "tempo_bpm": _round(bpm)}


@register
class Pitch(MeasuredDetector):
    name = "pitch"

    def read(self, measured: Measurements) -> dict[str, Any]:
        low, high = measured.pitch_range()
        return {"low_hz": _round(low), "high_hz": _round(high)}


@register
class Balance(MeasuredDetector):
    name = "balance"

    def read(self, measured: Measurements) -> dict[str, Any]:
        speech, sound, silence = measured.balance()
        return {"speech": _round(speech), "sound": _round(sound), "silence": _round(silence)}


@register
class Novelty(MeasuredDetector):
    name = "novelty"

    def read(self, measured: Measurements) -> float | None:
        return _round(measured.novelty())


@register
class Repetition(MeasuredDetector):
    name = "repetition"

    def read(self, measured: Measurements) -> dict[str, Any]:
        strength, period = measured.repetition()
        return {"strength": _round(strength), "period_s": _round(period)}


@register
class Keywords(MeasuredDetector):
    name = "keywords"

    @dataclass(frozen=True)
    class Options:
        top: Annotated[int, Ge(1), Le(20)] = 3

    def read(self, measured: Measurements) -> list[str]:
        return list(measured.keywords(self.options.top))


def detect_all(detectors: Sequence[Detector], measured: Measurements) -> dict[str, Any]:
    """Every detector's finding on `measured.window`, by name."""
    return {detector.name: detector.read(measured) for detector in detectors}
