"""When to generate: trigger policies as one state machine on the session's sample clock.

The session feeds `observe()` each analysed chunk's timeline entry and the window's novelty, in
timeline order; the policy answers with at most one `Trigger`. Policies, combinable:

- `interval`: every `interval` samples of session audio (missed marks are not made up);
- `novelty`: novelty rises to `novelty_on` or above; it re-arms only after falling to
  `novelty_off` or below (hysteresis) and fires no sooner than `cooldown` after its last trigger;
- `after_speech`: voice activity ends after at least `min_speech` samples of speech (an
  utterance was just heard), no sooner than `cooldown` after its last trigger;
- `manual`: the client asks (`manual()`), always honoured.

No models and no clocks other than sample positions: tested with entries alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from stream.core.context import TimelineEntry


class Reason(StrEnum):
    INTERVAL = "interval"
    NOVELTY = "novelty"
    AFTER_SPEECH = "after_speech"
    MANUAL = "manual"


AUTOMATIC = (Reason.AFTER_SPEECH, Reason.NOVELTY, Reason.INTERVAL)  # priority when several fire


@dataclass(frozen=True)
class Trigger:
    reason: Reason
    at: int  # timeline sample at which it fired (the end of the chunk that caused it)
    also: tuple[Reason, ...] = ()  # other policies that fired on the same chunk
    detail: dict[str, Any] = field(default_factory=dict)

    def describe(self, sample_rate: int) -> dict[str, Any]:
        return {
            "reason": self.reason.value,
            "at": round(self.at / sample_rate, 3),
            "also": [r.value for r in self.also],
            **self.detail,
        }


@dataclass(frozen=True)
class TriggerSettings:
    policies: tuple[Reason, ...] = (Reason.INTERVAL,)
    interval: int = 10 * 16_000
    novelty_on: float = 0.35
    novelty_off: float = 0.2
    cooldown: int = 5 * 16_000
    min_speech: int = 16_000
    sample_rate: int = 16_000  # of the timeline, for the seconds in trigger details

    def __post_init__(self) -> None:
        if self.novelty_off > self.novelty_on:
            raise ValueError("novelty_off must not exceed novelty_on (hysteresis)")
        if self.interval <= 0 or self.cooldown < 0 or self.min_speech < 0:
            raise ValueError("interval must be positive, cooldown and min_speech non-negative")


class TriggerPolicy:
    def __init__(self, settings: TriggerSettings, start: int = 0) -> None:
        """`start`: the timeline position the policy begins at (a session reconfigured while
        live counts its interval from there)."""
        self.settings = settings
        self._next_interval = start + settings.interval
        self._novelty_armed = True
        self._last_fired: dict[Reason, int | None] = {r: None for r in Reason}
        self._speech_start: int | None = None  # start of the current run of speech chunks
        self._speech_end = 0

    def observe(self, entry: TimelineEntry, novelty: float | None = None) -> Trigger | None:
        """One analysed chunk, in timeline order; the trigger it causes, if any."""
        fired: list[tuple[Reason, dict[str, Any]]] = []
        enabled = self.settings.policies
        if Reason.INTERVAL in enabled and entry.end >= self._next_interval:
            fired.append((Reason.INTERVAL, {}))
            step = self.settings.interval  # the next mark after this chunk, on the grid
            self._next_interval += step * ((entry.end - self._next_interval) // step + 1)
        if Reason.NOVELTY in enabled and novelty is not None:
            if self._novelty(novelty, entry.end):
                fired.append((Reason.NOVELTY, {"novelty": round(novelty, 3)}))
        if Reason.AFTER_SPEECH in enabled:
            heard = self._after_speech(entry)
            if heard is not None:
                fired.append((Reason.AFTER_SPEECH, {"speech_seconds": heard}))
        if not fired:
            return None
        fired.sort(key=lambda item: AUTOMATIC.index(item[0]))
        for reason, _ in fired:
            self._last_fired[reason] = entry.end
        (reason, detail), others = fired[0], tuple(r for r, _ in fired[1:])
        return Trigger(reason, entry.end, others, detail)

    def manual(self, at: int) -> Trigger:
        self._last_fired[Reason.MANUAL] = at
        return Trigger(Reason.MANUAL, at)

    def _cooled(self, reason: Reason, now: int) -> bool:
        last = self._last_fired[reason]
        return last is None or now - last >= self.settings.cooldown

    def _novelty(self, novelty: float, now: int) -> bool:
        if not self._novelty_armed:
            if novelty <= self.settings.novelty_off:
                self._novelty_armed = True
            return False
        if novelty >= self.settings.novelty_on and self._cooled(Reason.NOVELTY, now):
            self._novelty_armed = False
            return True
        return False

    def _after_speech(self, entry: TimelineEntry) -> float | None:
        """Seconds of speech that just ended at this chunk, if long enough; else None."""
        if entry.speech:
            if self._speech_start is None:
                self._speech_start = entry.start
            self._speech_end = entry.end
            return None
        if entry.speech is None or self._speech_start is None:
            return None
        heard = self._speech_end - self._speech_start
        self._speech_start = None
        if heard < self.settings.min_speech or not self._cooled(Reason.AFTER_SPEECH, entry.end):
            return None
        return round(heard / self.settings.sample_rate, 3)
