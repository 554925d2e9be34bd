"""When to generate: trigger steps, each a small state machine on the session's sample clock.

A pipeline (stream/pipeline.py) declares its triggers in order; the order is their priority when
several fire on the same chunk. The session feeds `TriggerPolicy.observe()` each analysed chunk's
timeline entry, in timeline order, with the latest findings of the pattern detectors; the policy
answers with at most one `Trigger`. Built in:

- `interval`: every `seconds` of session audio (missed marks are not made up);
- `novelty`: the `novelty` detector's finding rises to `on` or above; it re-arms only after
  falling to `off` or below (hysteresis) and fires no sooner than `cooldown_seconds` after its
  last trigger;
- `after_speech`: voice activity ends after at least `min_speech_seconds` of speech (an
  utterance was just heard), no sooner than `cooldown_seconds` after its last trigger;
- manual: the client asks (`TriggerPolicy.manual()`), always honoured.

A new trigger is one class: subclass `TriggerStep`, give it a `name`, an `Options` dataclass (its
config entries, validated from TOML or JSON) and `observe`, and decorate it with `@register`.
No models and no clocks other than sample positions: tested with entries alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from annotated_types import Ge, Le

from stream.core.steps.context import TimelineEntry
from stream.core.steps.registry import NoOptions, Registry

MANUAL = "manual"


@dataclass(frozen=True)
class Trigger:
    reason: str  # the step's name, or "manual"
    at: int  # timeline sample at which it fired (the end of the chunk that caused it)
    also: tuple[str, ...] = ()  # other steps that fired with it
    detail: dict[str, Any] = field(default_factory=dict)

    def describe(self, sample_rate: int) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "at": round(self.at / sample_rate, 3),
            "also": list(self.also),
            **self.detail,
        }


class TriggerStep:
    """One trigger policy. `observe` returns the details of a firing (a dict, maybe empty) or
    None; `needs` names the detectors whose findings it reads from `found`."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any, sample_rate: int, start: int = 0) -> None:
        self.options = options
        self.rate = sample_rate
        self.start = start  # where the policy begins on the timeline
        self.last_fired: int | None = None

    def observe(self, entry: TimelineEntry, found: Mapping[str, Any]) -> dict[str, Any] | None:
        raise NotImplementedError

    def samples(self, seconds: float) -> int:
        return round(seconds * self.rate)

    def cooled(self, now: int, cooldown_seconds: float) -> bool:
        return self.last_fired is None or now - self.last_fired >= self.samples(cooldown_seconds)


TRIGGERS: Registry[TriggerStep] = Registry("trigger", reserved=(MANUAL,))
register = TRIGGERS.register


@register
class IntervalTrigger(TriggerStep):
    name = "interval"

    @dataclass(frozen=True)
    class Options:
        seconds: Annotated[float, Ge(1.0), Le(3600.0)] = 10.0

    def __init__(self, options: Options, sample_rate: int, start: int = 0) -> None:
        super().__init__(options, sample_rate, start)
        self._next = start + self.samples(options.seconds)

    def observe(self, entry: TimelineEntry, found: Mapping[str, Any]) -> dict[str, Any] | None:
        if entry.end < self._next:
            return None
        step = self.samples(self.options.seconds)  # the next mark after this chunk, on the grid
        self._next += step * ((entry.end - self._next) // step + 1)
        return {}


def check_hysteresis(on: float, off: float, names: tuple[str, str] = ("on", "off")) -> None:
    """The novelty trigger's rule for its thresholds; `names` are theirs in the error (the
    protocol's flat form calls them novelty_on and novelty_off)."""
    if off > on:
        raise ValueError(f"{names[1]} must not exceed {names[0]} (hysteresis)")


@register
class NoveltyTrigger(TriggerStep):
    name = "novelty"
    needs = ("novelty",)

    @dataclass(frozen=True)
    class Options:
        on: Annotated[float, Ge(0.0), Le(1.0)] = 0.35
        off: Annotated[float, Ge(0.0), Le(1.0)] = 0.2
        cooldown_seconds: Annotated[float, Ge(0.0), Le(3600.0)] = 5.0

        def __post_init__(self) -> None:
            check_hysteresis(self.on, self.off)

    def __init__(self, options: Options, sample_rate: int, start: int = 0) -> None:
        super().__init__(options, sample_rate, start)
        self._armed = True

    def observe(self, entry: TimelineEntry, found: Mapping[str, Any]) -> dict[str, Any] | None:
        novelty = found.get("novelty")
        if novelty is None:
            return None
        if not self._armed:
            if novelty <= self.options.off:
                self._armed = True
            return None
        if novelty >= self.options.on and self.cooled(entry.end, self.options.cooldown_seconds):
            self._armed = False
            return {"novelty": round(novelty, 3)}
        return None


@register
class AfterSpeechTrigger(TriggerStep):
    name = "after_speech"

    @dataclass(frozen=True)
    class Options:
        min_speech_seconds: Annotated[float, Ge(0.0), Le(60.0)] = 1.0
        cooldown_seconds: Annotated[float, Ge(0.0), Le(3600.0)] = 5.0

    def __init__(self, options: Options, sample_rate: int, start: int = 0) -> None:
        super().__init__(options, sample_rate, start)
        self._speech_start: int | None = None  # start of the current run of speech chunks
        self._speech_end = 0

    def observe(self, entry: TimelineEntry, found: Mapping[str, Any]) -> dict[str, Any] | None:
        if entry.speech:
            if self._speech_start is None:
                self._speech_start = entry.start
            self._speech_end = entry.end
            return None
        if entry.speech is None or self._speech_start is None:
            return None
        heard = self._speech_end - self._speech_start
        self._speech_start = None
        if heard < self.samples(self.options.min_speech_seconds):
            return None
        if not self.cooled(entry.end, self.options.cooldown_seconds):
            return None
        return {"speech_seconds": round(heard / self.rate, 3)}


class TriggerPolicy:
    """A pipeline's trigger steps, asked in order on every chunk."""

    def __init__(self, steps: Sequence[TriggerStep] = ()) -> None:
        self.steps = list(steps)

    def observe(
        self, entry: TimelineEntry, found: Mapping[str, Any] | None = None
    ) -> Trigger | None:
        """One analysed chunk, in timeline order; the trigger it causes, if any."""
        fired = []
        for step in self.steps:
            detail = step.observe(entry, found or {})
            if detail is not None:
                step.last_fired = entry.end
                fired.append((step.name, detail))
        if not fired:
            return None
        (reason, detail), others = fired[0], tuple(name for name, _ in fired[1:])
        return Trigger(reason, entry.end, others, detail)

    def manual(self, at: int) -> Trigger:
        return Trigger(MANUAL, at)
