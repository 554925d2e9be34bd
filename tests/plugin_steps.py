"""An example plugin: one analyser, one detector and one trigger, each one class.

docs/pipelines.md walks through it; tests/test_pipelines.py runs a server with
`--plugins tests.plugin_steps` and a pipeline file that uses all three.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from annotated_types import Ge, Le

from stream.plugins import (
    Analyser,
    AnalysisResult,
    AnalysisWindow,
    ContextWindow,
    Detector,
    TimelineEntry,
    TriggerStep,
    register_analyser,
    register_detector,
    register_trigger,
)


@dataclass(frozen=True)
class Fields(AnalysisResult):
    fields: dict[str, Any]

    def to_event(self) -> dict[str, Any]:
        return self.fields


@register_analyser
class Brightness(Analyser):
    """The share of each chunk's energy above 2 kHz: hiss and cymbals are bright, hum is not."""

    name = "brightness"
    sample_rate = 16_000

    def analyse(self, windows: Sequence[AnalysisWindow]) -> list[Fields]:
        results = []
        for window in windows:
            chunk = window.audio[window.chunk_start : window.chunk_end]
            power = np.abs(np.fft.rfft(chunk)) ** 2
            high = power[np.fft.rfftfreq(len(chunk), 1 / self.sample_rate) >= 2000].sum()
            share = float(high / power.sum()) if power.sum() > 0 else 0.0
            results.append(Fields({"brightness": {"high_share": round(share, 4)}}))
        return results

    def release(self, stream: str) -> None:
        pass  # keeps nothing per stream


@register_detector
class Peak(Detector):
    """The loudest sample in the context window."""

    name = "peak"

    def detect(self, window: ContextWindow) -> float:
        return round(float(np.abs(window.audio).max(initial=0.0)), 4)


@register_trigger
class Bright(TriggerStep):
    """Fires on a chunk brighter than `threshold`, at most once per `cooldown_seconds`."""

    name = "bright"

    @dataclass(frozen=True)
    class Options:
        threshold: Annotated[float, Ge(0.0), Le(1.0)] = 0.5
        cooldown_seconds: Annotated[float, Ge(0.0)] = 5.0

    def observe(self, entry: TimelineEntry, found: Mapping[str, Any]) -> dict[str, Any] | None:
        share = entry.fields.get("brightness", {}).get("high_share", 0.0)
        if share < self.options.threshold:
            return None
        if not self.cooled(entry.end, self.options.cooldown_seconds):
            return None
        return {"high_share": share}
