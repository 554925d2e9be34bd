"""What a plugin imports: the three kinds of pipeline step it can add, and how to register them.

A plugin is a module named by `--plugins` (imported at start-up). Each class it registers is
one step that pipelines may name (docs/pipelines.md):

- an analyser (`@register_analyser`): a class with a no-argument constructor implementing
  `models.base.Analyser` (a batch of windows in, one result per window out); subclassing
  `Analyser`, and `AnalysisResult` for its results, gives the defaults for what it does not
  offer (`info`: a trained model named after the analyser; no CTC frames). The server runs one
  engine for each registered analyser, and pipelines name it in `analyse`;
- a detector (`@register_detector`, a `Detector` subclass): reads the rolling context window,
  adds one finding; pipelines name it in `[[detect]]`;
- a trigger (`@register_trigger`, a `TriggerStep` subclass): reads each new timeline entry
  (`entry.fields` holds every analyser's fields) and the detectors' findings; pipelines name it
  in `[[trigger]]`.
"""

from __future__ import annotations

from models.base import (
    Analyser,
    AnalyserInfo,
    AnalysisResult,
    AnalysisWindow,
    CtcFrames,
    CtcTokens,
    FrameCounts,
)
from stream.core.steps.context import ContextWindow, TimelineEntry
from stream.core.steps.detectors import DETECTORS, Detector
from stream.core.steps.registry import Registry
from stream.core.steps.triggers import TRIGGERS, TriggerStep

ANALYSERS: Registry[Analyser] = Registry("analyser", reserved=("dsp", "wav2vec2"))


def register_analyser(cls: type[Analyser]) -> type[Analyser]:
    """Class decorator: make the analyser available to pipelines under `cls.name`. It must
    subclass `Analyser`: the server reads what it declares (`info`) instead of guessing."""
    if Analyser not in cls.__mro__:
        raise TypeError(
            f"analyser {cls.__name__} must subclass stream.plugins.Analyser (which gives the "
            "defaults for what it does not declare), and its results AnalysisResult"
        )
    return ANALYSERS.register(cls)


register_detector = DETECTORS.register
register_trigger = TRIGGERS.register

__all__ = [
    "ANALYSERS", "Analyser", "AnalyserInfo", "AnalysisResult", "AnalysisWindow", "ContextWindow",
    "CtcFrames", "CtcTokens", "Detector", "FrameCounts", "TimelineEntry", "TriggerStep",
    "register_analyser", "register_detector", "register_trigger",
]  # fmt: skip
