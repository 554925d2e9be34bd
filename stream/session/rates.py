"""How fast a session may send (messages per second and seconds of audio per second), and
whether it sends at about real time.

The server's cost of a message is mostly per message, not per byte (a 1-sample frame costs
about what a 100 ms one does), so a client sending tiny frames as fast as it can would starve
every other session of the event loop; one sending audio far faster than real time costs
decoding and resampling. Each limit is a token bucket: sustained rates up to the limit, with
bursts (a resumed client sends again what was not acknowledged, a file may be uploaded fast).
Past either, the session fails with `rate_limited` (1008).

`Pace` tells live sessions from bulk ones (those sending faster than real time), whose chunks
the analysis engines serve after live sessions' (stream/engines/analysis.py, Lanes).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from stream.protocol import CloseCode, ProtocolError

MESSAGE_BURST_SECONDS = 1.0  # a burst of 1 s worth of messages at the limit
MIN_FRAME_SECONDS = 0.01  # audio frames this long or longer cost no message
AUDIO_BURST_SECONDS = 60.0  # and up to a minute of audio at once, whatever the limit
# A session whose audio runs this far ahead of the wall clock sends faster than real time: its
# chunks are bulk work. The slack lets a client send a second or two at once (a resume sends
# again what was not acknowledged) and stay live.
AHEAD_SLACK_SECONDS = 3.0


class TokenBucket:
    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = burst
        self._at = clock()

    def take(self, amount: float) -> bool:
        """Spend `amount` if the bucket holds it; False (and nothing spent) if not."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if amount > self._tokens:
            return False
        self._tokens -= amount
        return True


class SendRates:
    """One session's two limits. Messages: `messages_per_second` text messages or tiny audio
    frames; an audio frame costs less the more audio it carries, and nothing from
    MIN_FRAME_SECONDS up, so any ordinary frame size is free and only what makes the cost per
    message dominate is counted. Audio: `audio_speed` seconds of audio per second of wall
    time; None for `wait` sessions, whose reading stops while analysis is behind, so they can
    never send faster than the server analyses."""

    def __init__(
        self,
        messages_per_second: float,
        audio_speed: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        burst = max(1.0, messages_per_second * MESSAGE_BURST_SECONDS)
        self._messages = TokenBucket(messages_per_second, burst, clock)
        self._audio = None
        if audio_speed is not None:
            audio_burst = max(AUDIO_BURST_SECONDS, audio_speed * MESSAGE_BURST_SECONDS)
            self._audio = TokenBucket(audio_speed, audio_burst, clock)
        self.messages_per_second, self.audio_speed = messages_per_second, audio_speed

    def message(self, audio_seconds: float | None = None) -> None:
        """One message: text (None) or an audio frame of `audio_seconds`; raises
        ProtocolError `rate_limited` past the limit."""
        cost = 1.0 if audio_seconds is None else max(0.0, 1 - audio_seconds / MIN_FRAME_SECONDS)
        if cost and not self._messages.take(cost):
            raise ProtocolError(
                "rate_limited",
                f"more than {self.messages_per_second:g} messages per second: send audio in "
                "frames of 20-100 ms",
                CloseCode.POLICY_VIOLATION,
            )

    def audio(self, seconds: float) -> None:
        """`seconds` of audio received; raises ProtocolError `rate_limited` past the limit."""
        if self._audio is not None and not self._audio.take(seconds):
            raise ProtocolError(
                "rate_limited",
                f"audio sent faster than {self.audio_speed:g}x real time",
                CloseCode.POLICY_VIOLATION,
            )


class Pace:
    """Whether a session sends at about real time: how far the audio it sent runs ahead of the
    wall clock since its first frame (a session that paused, or lost its connection, is
    behind, never ahead)."""

    def __init__(self) -> None:
        self._first: float | None = None
        self._audio = 0.0

    def heard(self, seconds: float, now: float) -> None:
        if self._first is None:
            self._first = now
        # Behind the clock does not bank credit: a pause is not a licence to burst.
        self._audio = max(self._audio, now - self._first - AHEAD_SLACK_SECONDS) + seconds

    def live(self, now: float) -> bool:
        return self._first is None or self._audio - (now - self._first) <= AHEAD_SLACK_SECONDS
