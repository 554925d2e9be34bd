"""Trigger policies on the sample clock, and prompts from descriptors: no models, no sockets."""

from __future__ import annotations

import pytest

from stream.core.steps.context import TimelineEntry
from stream.core.steps.patterns import Descriptors
from stream.core.steps.prompts import DEFAULT_NEGATIVE, build_prompt
from stream.core.steps.triggers import MANUAL, TRIGGERS, NoveltyTrigger, TriggerPolicy, TriggerStep

S = 16_000  # samples per second


def step(name: str, start: int = 0, **options: float) -> TriggerStep:
    cls = TRIGGERS[name]
    return cls(cls.Options(**options), S, start)


def chunks(count: int, speech: list[bool] | None = None) -> list[TimelineEntry]:
    return [
        TimelineEntry(k * S, (k + 1) * S, speech=None if speech is None else speech[k])
        for k in range(count)
    ]


def fire_times(policy: TriggerPolicy, entries: list[TimelineEntry], novelty=None) -> list:
    fired = []
    for k, entry in enumerate(entries):
        found = {} if novelty is None else {"novelty": novelty[k]}
        trigger = policy.observe(entry, found)
        if trigger is not None:
            fired.append((trigger.reason, trigger.at // S))
    return fired


def test_interval_fires_on_the_sample_clock() -> None:
    policy = TriggerPolicy([step("interval", seconds=3)])
    assert fire_times(policy, chunks(10)) == [("interval", t) for t in (3, 6, 9)]


def test_interval_counts_from_where_the_policy_starts() -> None:
    policy = TriggerPolicy([step("interval", start=5 * S, seconds=3)])
    assert fire_times(policy, chunks(12)) == [("interval", 8), ("interval", 11)]


def test_interval_does_not_make_up_missed_marks() -> None:
    policy = TriggerPolicy([step("interval", seconds=2)])
    # A skipped stretch: the next analysed chunk ends at 9 s; one trigger, next mark 10 s.
    entries = [TimelineEntry(0, S), TimelineEntry(8 * S, 9 * S), TimelineEntry(9 * S, 10 * S)]
    assert fire_times(policy, entries) == [("interval", 9), ("interval", 10)]


def test_novelty_hysteresis_and_cooldown() -> None:
    #          t:  1    2    3    4    5    6    7    8    9    10   11   12
    novelty = [0.1, 0.6, 0.7, 0.4, 0.6, 0.1, 0.9, 0.1, 0.1, 0.1, 0.6, 0.6]
    policy = TriggerPolicy([step("novelty", on=0.5, off=0.2, cooldown_seconds=3)])
    fired = fire_times(policy, chunks(12), novelty)
    # 2: fires. 3, 5: high again without having fallen to 0.2 (hysteresis). 6: re-armed.
    # 7: 5 s after the last trigger, past the 3 s cool-down: fires. 11: likewise.
    assert fired == [("novelty", 2), ("novelty", 7), ("novelty", 11)]
    # With a long cool-down the re-armed rise at 7 s is refused, and later ones fire only after.
    slow = TriggerPolicy([step("novelty", on=0.5, off=0.2, cooldown_seconds=6)])
    assert fire_times(slow, chunks(12), novelty) == [("novelty", 2), ("novelty", 11)]
    # Without the novelty detector's finding it never fires.
    assert fire_times(TriggerPolicy([step("novelty")]), chunks(12)) == []


def test_after_speech_fires_when_an_utterance_ends() -> None:
    speech = [False, True, True, False, True, False, False, True, True, True, False, False]
    policy = TriggerPolicy([step("after_speech", min_speech_seconds=2, cooldown_seconds=0)])
    fired = fire_times(policy, chunks(12, speech))
    # 1-3 s of speech ends at chunk 3 (fires at its end, 4 s); the 1 s blip at 4 is too short.
    assert fired == [("after_speech", 4), ("after_speech", 11)]
    # Without voice activity in the timeline it never fires.
    quiet = TriggerPolicy([step("after_speech", min_speech_seconds=0)])
    assert fire_times(quiet, chunks(12)) == []


def test_combined_steps_fire_once_in_declared_order_with_the_others_noted() -> None:
    speech = [True, True, True, False, False, False]
    steps = [step("after_speech", min_speech_seconds=1), step("interval", seconds=4)]
    policy = TriggerPolicy(steps)
    fired = [t for e in chunks(6, speech) if (t := policy.observe(e)) is not None]
    assert len(fired) == 1
    assert fired[0].reason == "after_speech" and fired[0].also == ("interval",)
    assert fired[0].describe(S)["at"] == 4.0 and fired[0].detail == {"speech_seconds": 3.0}
    # Declared the other way round, the interval leads.
    policy = TriggerPolicy(
        [step("interval", seconds=4), step("after_speech", min_speech_seconds=1)]
    )
    fired = [t for e in chunks(6, speech) if (t := policy.observe(e)) is not None]
    assert [(t.reason, t.also) for t in fired] == [("interval", ("after_speech",))]


def test_manual_always_fires_and_options_are_checked() -> None:
    policy = TriggerPolicy([])
    assert fire_times(policy, chunks(5)) == []
    assert policy.manual(123).reason == MANUAL
    with pytest.raises(ValueError, match="hysteresis"):
        NoveltyTrigger.Options(on=0.2, off=0.5)


def descriptors(**overrides) -> Descriptors:
    base = dict(
        loudness_dbfs=-25.0, dynamics_db=5.0, onset_rate_hz=0.2, tempo_bpm=None,
        pitch_low_hz=90.0, pitch_high_hz=140.0, speech=0.3, sound=0.3, silence=0.4,
        novelty=0.1, repetition=0.0, repetition_period_s=None, keywords=("rain", "roof"),
    )  # fmt: skip
    return Descriptors(**{**base, **overrides})


def test_prompt_from_descriptors_records_its_sources() -> None:
    window = {"start": 2.0, "end": 12.0}
    prompt = build_prompt(descriptors(), window)
    assert prompt.text == (
        "calm ambient pad, without a beat, low register, soft, matching the sparse speech, "
        "evoking rain and roof"
    )
    assert prompt.window == window and prompt.descriptors["keywords"] == ["rain", "roof"]
    assert prompt.negative == DEFAULT_NEGATIVE

    fast = build_prompt(
        descriptors(tempo_bpm=142.4, repetition=0.5, repetition_period_s=2.0, speech=0.0),
        window,
        template="rhythmic",
        user="techno",
    )
    assert fast.text == "techno, percussive groove, fast at 142 bpm, soft, repeating every 2 s"


def test_prompt_user_only_and_unknown_template() -> None:
    assert build_prompt(descriptors(), {}, user="harp", auto=False).text == "harp"
    assert build_prompt(None, {}).text == "calm ambient pad"
    with pytest.raises(ValueError):
        build_prompt(descriptors(), {}, template="opera")
