"""A session's send rates and pace, on a clock the tests move (sans-I/O)."""

from __future__ import annotations

import pytest

from stream.protocol import ProtocolError
from stream.session.rates import (
    AHEAD_SLACK_SECONDS,
    MIN_FRAME_SECONDS,
    Pace,
    SendRates,
    TokenBucket,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert all(bucket.take(1) for _ in range(5)) and not bucket.take(1)
    clock.now += 0.35  # 3.5 tokens back
    assert [bucket.take(1) for _ in range(4)] == [True, True, True, False]
    clock.now += 60  # never more than the burst
    assert sum(bucket.take(1) for _ in range(10)) == 5


def test_one_sample_frames_are_refused_within_a_second_of_them() -> None:
    clock = Clock()
    rates = SendRates(messages_per_second=250, audio_speed=100, clock=clock)
    sent = 0
    with pytest.raises(ProtocolError) as refused:
        while True:
            rates.message(1 / 16000)
            sent += 1
            clock.now += 0.0001  # 10,000 frames a second
    assert refused.value.code == "rate_limited" and refused.value.close_code == 1008
    assert 250 <= sent <= 300  # the 1 s burst, and what refilled meanwhile


def test_audio_faster_than_the_limit_is_refused_after_its_burst() -> None:
    clock = Clock()
    rates = SendRates(messages_per_second=1000, audio_speed=10, clock=clock)
    for _ in range(590):  # 59 s of audio at once: within the burst of 60
        rates.audio(0.1)
    with pytest.raises(ProtocolError, match="faster than 10x real time"):
        rates.audio(2.0)
    clock.now += 1.0  # then 10 s of audio a second
    rates.audio(10.5)
    with pytest.raises(ProtocolError):
        rates.audio(1.0)


def test_ordinary_frames_cost_no_message_and_wait_sessions_no_audio_limit() -> None:
    """20 ms frames as fast as a `wait` session is read: neither limit applies (its reading
    stops while analysis is behind); text messages count in full."""
    rates = SendRates(messages_per_second=10, audio_speed=None, clock=Clock())
    for _ in range(10_000):
        rates.message(0.02)
        rates.audio(0.02)
    rates.message(MIN_FRAME_SECONDS / 2)  # half a message
    for _ in range(9):
        rates.message()
    with pytest.raises(ProtocolError):
        rates.message()


def test_pace_tells_live_sessions_from_bulk_ones() -> None:
    live, fast, t = Pace(), Pace(), 0.0
    for _ in range(100):  # 10 s: one at real time, one at 10x, in 100 ms frames
        t += 0.1
        live.heard(0.1, t)
        fast.heard(1.0, t)
    assert live.live(t) and not fast.live(t)


def test_a_pause_banks_no_credit_for_a_burst() -> None:
    pace = Pace()
    pace.heard(1.0, 0.0)
    # A minute of silence, then the client catches up with 2 s at once (a resume): live;
    # 10 s at once (a file): bulk.
    pace.heard(2.0, 60.0)
    assert pace.live(60.0)
    pace.heard(AHEAD_SLACK_SECONDS + 8.0, 60.0)
    assert not pace.live(60.0)
