"""Turn detection: where speech starts and stops, from voice-activity probabilities on the 20 ms
frame grid (the CTC frames' grid, so a turn's end cuts the transcript at a frame).

The rules are Silero's own timestamp rules, streamed: speech starts once `min_speech_ms` of
frames in a row are at or above `threshold`; it stops once `min_silence_ms` have gone by since a
frame fell below `threshold - 0.15` (frames in between neither start nor break the silence, so a
probability that hovers at the threshold does not chop a turn). Speech started and stopped are
reported at the frames where the speech run and the silence run began: the detector speaks late
(by the run it waits for) but places the boundary where it was.

Peers moved their end-of-speech defaults to 600-800 ms of silence: shorter ends a turn at every
pause for breath; longer makes a transcript final, and anything triggered by it, wait.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

FRAME_MS = 20
HYSTERESIS = 0.15  # silence is below threshold - HYSTERESIS (Silero's neg_threshold)


@dataclass(frozen=True)
class TurnSettings:
    threshold: float = 0.5
    min_speech_ms: int = 250  # speech must last this long to start a turn
    min_silence_ms: int = 600  # silence that ends a turn
    prefix_padding_ms: int = 300  # audio before the start that a turn's audio includes

    @property
    def silence_below(self) -> float:
        return max(0.0, self.threshold - HYSTERESIS)


@dataclass(frozen=True)
class Turn:
    kind: Literal["started", "stopped"]
    frame: int  # where the speech (started) or the silence (stopped) began
    detected: int  # the frame at whose end it was known (started/stopped + the run waited for)

    @property
    def seconds(self) -> float:
        return self.frame * FRAME_MS / 1000

    def to_event(self) -> dict[str, object]:
        return {
            "speech": self.kind,
            "at": round(self.seconds, 3),
            "detected": round(self.detected * FRAME_MS / 1000, 3),
        }


class TurnDetector:
    """`settings` None: turn detection is off (no turns; `cut` still ends one under way)."""

    def __init__(self, settings: TurnSettings | None = TurnSettings()) -> None:
        self.settings = settings
        self.in_speech = False
        self._next = 0  # the frame expected next
        self._run_start: int | None = None  # speech run (in silence) or silence run (in speech)

    def reconfigure(self, settings: TurnSettings | None) -> None:
        """New settings from the next frame on; a turn under way goes on (None: off; a turn
        under way is forgotten)."""
        self.settings = settings
        if settings is None:
            self.in_speech, self._run_start = False, None

    def push(self, first_frame: int, probabilities: Sequence[float]) -> list[Turn]:
        """One chunk's frames: the probability of speech of each, from `first_frame`. Frames
        missing before it (skipped audio) count as silence."""
        turns: list[Turn] = []
        if self.settings is None:
            self._next = max(self._next, first_frame + len(probabilities))
            return turns
        if first_frame > self._next:
            self._silent_gap(self._next, first_frame, turns)
        for offset, probability in enumerate(probabilities):
            frame = first_frame + offset
            if frame < self._next:
                continue  # already seen
            self._frame(frame, float(probability), turns)
        self._next = max(self._next, first_frame + len(probabilities))
        return turns

    def cut(self, frame: int) -> Turn | None:
        """End the turn under way at `frame` (the end of stream, a client's commit): the stop
        is where a silence already under way began, else `frame`."""
        self._next = max(self._next, frame)
        if not self.in_speech:
            self._run_start = None
            return None
        start = self._run_start if self._run_start is not None else frame
        self.in_speech, self._run_start = False, None
        return Turn("stopped", start, frame)

    def _frames(self, ms: int) -> int:
        return max(1, -(-ms // FRAME_MS))

    def _silent_gap(self, start: int, end: int, turns: list[Turn]) -> None:
        assert self.settings is not None
        if self.in_speech:
            if self._run_start is None:
                self._run_start = start
            if end - self._run_start >= self._frames(self.settings.min_silence_ms):
                turns.append(Turn("stopped", self._run_start, end))
                self.in_speech, self._run_start = False, None
        else:
            self._run_start = None
        self._next = end

    def _frame(self, frame: int, probability: float, turns: list[Turn]) -> None:
        s = self.settings
        assert s is not None
        if not self.in_speech:
            if probability >= s.threshold:
                if self._run_start is None:
                    self._run_start = frame
                if frame + 1 - self._run_start >= self._frames(s.min_speech_ms):
                    turns.append(Turn("started", self._run_start, frame + 1))
                    self.in_speech, self._run_start = True, None
            else:
                self._run_start = None
            return
        if probability >= s.threshold:
            self._run_start = None  # speech again: the silence so far was a pause
        elif probability < s.silence_below and self._run_start is None:
            self._run_start = frame
        if self._run_start is not None and frame + 1 - self._run_start >= self._frames(
            s.min_silence_ms
        ):
            turns.append(Turn("stopped", self._run_start, frame + 1))
            self.in_speech, self._run_start = False, None
