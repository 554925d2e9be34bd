"""Turn detection from per-frame speech probabilities, with arrays alone."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stream.core.audio.turns import Turn, TurnDetector, TurnSettings

FAST = TurnSettings(threshold=0.5, min_speech_ms=100, min_silence_ms=200)  # 5 and 10 frames


def frames(spec: str) -> list[float]:
    """'#' speech (0.9), '.' silence (0.05), '~' in between (0.4): one character per frame."""
    return [{"#": 0.9, ".": 0.05, "~": 0.4}[c] for c in spec]


def test_speech_starts_and_stops_where_the_runs_began() -> None:
    detector = TurnDetector(FAST)
    turns = detector.push(0, frames("...#######" + "." * 12))
    assert turns == [Turn("started", 3, 8), Turn("stopped", 10, 20)]
    assert not detector.in_speech


def test_short_bursts_and_short_pauses_do_not_make_turns() -> None:
    detector = TurnDetector(FAST)
    assert detector.push(0, frames("###..##..")) == []  # never 5 frames of speech in a row
    turns = detector.push(9, frames("#####" + "." * 9 + "#####"))
    assert turns == [Turn("started", 9, 14)]  # the 9-frame pause is shorter than 10


def test_probabilities_between_the_thresholds_neither_start_nor_break_a_silence() -> None:
    detector = TurnDetector(FAST)
    detector.push(0, frames("#####"))
    # Below 0.5 but above 0.35: not silence yet; silence begins at the first '.'.
    assert detector.push(5, frames("~~~~" + "." * 10)) == [Turn("stopped", 9, 19)]


def test_a_turn_may_span_chunks_and_a_gap_counts_as_silence() -> None:
    detector = TurnDetector(FAST)
    assert detector.push(0, frames("..###")) == []
    assert detector.push(5, frames("###..")) == [Turn("started", 2, 7)]
    assert detector.push(30, frames("#")) == [Turn("stopped", 8, 30)]  # 20 frames missing


def test_cut_ends_a_turn_under_way() -> None:
    detector = TurnDetector(FAST)
    detector.push(0, frames("#######..."))
    assert detector.cut(10) == Turn("stopped", 7, 10)  # the silence under way began at 7
    assert detector.cut(12) is None


def test_the_settings_change_from_the_next_frame() -> None:
    detector = TurnDetector(FAST)
    detector.push(0, frames("######"))
    detector.reconfigure(TurnSettings(min_silence_ms=60))
    assert detector.push(6, frames("...")) == [Turn("stopped", 6, 9)]


@settings(max_examples=100, deadline=None)
@given(
    probabilities=st.lists(st.sampled_from([0.05, 0.4, 0.9]), max_size=300),
    cuts=st.lists(st.integers(1, 50), max_size=10),
)
def test_chunking_does_not_change_the_turns(probabilities: list[float], cuts: list[int]) -> None:
    whole = TurnDetector(FAST).push(0, probabilities)
    detector, pos, turns = TurnDetector(FAST), 0, []
    for size in [*cuts, len(probabilities)]:
        turns += detector.push(pos, probabilities[pos : pos + size])
        pos = min(pos + size, len(probabilities))
    assert turns == whole
    kinds = [t.kind for t in whole]
    assert kinds == ["started", "stopped"] * (len(kinds) // 2) + ["started"] * (len(kinds) % 2)


def test_off_finds_no_turns_and_may_be_turned_on() -> None:
    detector = TurnDetector(None)
    assert detector.push(0, frames("#" * 20 + "." * 20)) == []
    detector.reconfigure(FAST)
    assert detector.push(40, frames("#####")) == [Turn("started", 40, 45)]
    detector.reconfigure(None)  # off again: the turn under way is forgotten
    assert detector.push(45, frames("." * 20)) == [] and detector.cut(65) is None
