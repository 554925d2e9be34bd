"""Descriptors -> a text prompt for the generator, through a named template.

A template is a lead phrase and the descriptor phrases it wants, in order; each phrase function
turns one aspect of the `Descriptors` into a few words, or nothing when the aspect says nothing
(no pitch, no pulse). The user's own prompt leads when given; `auto=False` uses it alone. Every
`Prompt` keeps the window and the descriptors that made it, so a generation can say why it sounds
as it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stream.core.steps.patterns import Descriptors

DEFAULT_NEGATIVE = "low quality, distorted, noisy"


def tempo(d: Descriptors) -> str:
    if d.tempo_bpm is not None:
        pace = "slow" if d.tempo_bpm < 90 else "fast" if d.tempo_bpm > 130 else "mid-tempo"
        return f"{pace} at {round(d.tempo_bpm)} bpm"
    if d.onset_rate_hz < 0.5:
        return "without a beat"
    return "sparse" if d.onset_rate_hz < 2 else "busy"


def register(d: Descriptors) -> str:
    if d.pitch_low_hz is None or d.pitch_high_hz is None:
        return ""
    middle = (d.pitch_low_hz * d.pitch_high_hz) ** 0.5
    return "low register" if middle < 180 else "high register" if middle > 500 else "mid register"


def energy(d: Descriptors) -> str:
    level = "quiet" if d.loudness_dbfs < -35 else "loud" if d.loudness_dbfs > -15 else "soft"
    return f"{level}, dynamic" if d.dynamics_db > 15 else level


def balance(d: Descriptors) -> str:
    if d.speech >= 0.5:
        return "beneath a speaking voice"
    if d.speech >= 0.15:
        return "matching the sparse speech"
    if d.silence >= 0.6:
        return "spacious, with long silences"
    return "answering the music" if d.sound >= 0.5 else ""


def shape(d: Descriptors) -> str:
    parts = []
    if d.repetition >= 0.3 and d.repetition_period_s:
        parts.append(f"repeating every {d.repetition_period_s:g} s")
    if d.novelty is not None and d.novelty >= 0.35:
        parts.append("with a sudden change")
    return ", ".join(parts)


def topic(d: Descriptors) -> str:
    return "evoking " + " and ".join(d.keywords[:2]) if d.keywords else ""


Phrase = Callable[[Descriptors], str]


@dataclass(frozen=True)
class Template:
    lead: str
    phrases: tuple[Phrase, ...]


TEMPLATES: dict[str, Template] = {
    "ambient": Template("calm ambient pad", (tempo, register, energy, balance, topic)),
    "rhythmic": Template("percussive groove", (tempo, energy, shape, balance)),
    "foley": Template("sound effects", (topic, energy, shape)),
    "echo": Template("a musical echo of what was heard", (register, tempo, shape, topic)),
}


@dataclass(frozen=True)
class Prompt:
    text: str
    negative: str
    template: str
    window: dict[str, float] = field(default_factory=dict)  # seconds on the session timeline
    descriptors: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "negative": self.negative,
            "template": self.template,
            "window": self.window,
            "descriptors": self.descriptors,
        }


def build_prompt(
    descriptors: Descriptors | None,
    window: dict[str, float],
    template: str = "ambient",
    user: str = "",
    negative: str = DEFAULT_NEGATIVE,
    auto: bool = True,
) -> Prompt:
    """The prompt for one generation; `descriptors` None (or `auto` False) uses `user` alone."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; one of {', '.join(TEMPLATES)}")
    parts = [user.strip()] if user.strip() else []
    if auto and descriptors is not None:
        chosen = TEMPLATES[template]
        parts.append(chosen.lead)
        parts.extend(p for p in (phrase(descriptors) for phrase in chosen.phrases) if p)
    text = ", ".join(parts) or TEMPLATES[template].lead
    described = descriptors.to_dict() if descriptors is not None else {}
    return Prompt(text, negative, template, window, described)
