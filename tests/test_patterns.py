"""Pattern detectors and the rolling context, on synthetic signals with known answers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models.base import decode_embedding
from stream.core.steps import patterns
from stream.core.steps.context import ContextWindow, RollingContext, TimelineEntry
from stream.core.steps.detectors import DETECTORS, detect_all
from stream.session.steps import SessionContext, timeline_entry

RATE = 16_000


def _t(seconds: float) -> np.ndarray:
    return np.arange(int(seconds * RATE)) / RATE


def tone(hz: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * _t(seconds))).astype(np.float32)


def noise(seconds: float, amplitude: float = 0.1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (amplitude * rng.standard_normal(int(seconds * RATE))).astype(np.float32)


def clicks(bpm: float, seconds: float) -> np.ndarray:
    audio = noise(seconds, 0.001)
    period = 60.0 / bpm
    for k in range(int(seconds / period) + 1):
        i = int(k * period * RATE)
        burst = noise(0.02, 0.5, seed=k)[: len(audio) - i]
        audio[i : i + len(burst)] += burst * np.hanning(len(burst))
    return audio


def window_of(audio: np.ndarray, entries: tuple[TimelineEntry, ...] = ()) -> ContextWindow:
    return ContextWindow(0, len(audio), RATE, audio, entries)


def test_loudness_and_dynamics() -> None:
    loud, spread = patterns.loudness(tone(440, 2.0, amplitude=1.0))
    assert loud == pytest.approx(-3.01, abs=0.05) and spread < 0.5
    quiet, _ = patterns.loudness(tone(440, 2.0, amplitude=0.01))
    assert quiet == pytest.approx(-43.0, abs=0.1)
    # Alternating 20 dB steps: a dynamic signal.
    steps = np.concatenate([tone(440, 0.5, 0.5), tone(440, 0.5, 0.05)] * 3)
    assert patterns.loudness(steps)[1] == pytest.approx(20.0, abs=1.0)


@pytest.mark.parametrize("bpm", [75.0, 100.0, 150.0])
def test_onset_rate_and_tempo_of_a_click_track(bpm: float) -> None:
    rate_hz, tempo = patterns.onsets(clicks(bpm, 8.0), RATE)
    assert rate_hz == pytest.approx(bpm / 60.0, rel=0.15)
    assert tempo is not None and tempo == pytest.approx(bpm, rel=0.04)


def test_no_tempo_in_steady_noise() -> None:
    rate_hz, tempo = patterns.onsets(noise(6.0), RATE)
    assert tempo is None and rate_hz < 3


@pytest.mark.parametrize("hz", [110.0, 220.0, 440.0, 800.0])
def test_pitch_range_of_tones(hz: float) -> None:
    low, high = patterns.pitch_range(tone(hz, 1.0), RATE)
    assert low == pytest.approx(hz, rel=0.03) and high == pytest.approx(hz, rel=0.03)


def test_pitch_range_of_a_glide_and_of_noise() -> None:
    glide = np.concatenate([tone(hz, 0.25) for hz in np.linspace(150, 600, 12)])
    low, high = patterns.pitch_range(glide, RATE)
    assert low is not None and high is not None
    assert 150 <= low < 250 and 480 < high <= 620
    assert patterns.pitch_range(noise(1.0), RATE) == (None, None)


def test_balance_of_speech_sound_and_silence() -> None:
    audio = np.concatenate([noise(2.0, 0.1), np.zeros(2 * RATE, np.float32)])
    entries = (
        TimelineEntry(0, RATE, speech=True, speech_ratio=1.0),
        TimelineEntry(RATE, 2 * RATE, speech=False, speech_ratio=0.0),
        TimelineEntry(2 * RATE, 4 * RATE, speech=False, speech_ratio=0.0),
    )
    speech, sound, silence = patterns.balance(window_of(audio, entries))
    assert speech == pytest.approx(0.25, abs=0.02)
    assert sound == pytest.approx(0.25, abs=0.02)
    assert silence == pytest.approx(0.5, abs=0.02)


def test_novelty_sees_a_change_of_sound() -> None:
    steady = tone(300, 9.0)
    change = np.concatenate([tone(300, 6.0), noise(3.0, 0.3)])
    assert patterns.novelty(window_of(steady)) < 0.05
    assert patterns.novelty(window_of(change)) > 0.3
    # A level change alone is not a new sound.
    louder = np.concatenate([tone(300, 6.0, 0.05), tone(300, 3.0, 0.5)])
    assert patterns.novelty(window_of(louder)) < 0.05


def test_novelty_uses_embeddings_when_the_timeline_has_them() -> None:
    a, b = np.array([1.0, 0.0, 0.0], np.float32), np.array([0.0, 1.0, 0.0], np.float32)
    same = tuple(TimelineEntry(i * RATE, (i + 1) * RATE, embedding=a) for i in range(6))
    changed = same[:4] + tuple(TimelineEntry(i * RATE, (i + 1) * RATE, embedding=b) for i in (4, 5))
    silence = np.zeros(6 * RATE, np.float32)
    assert patterns.novelty(window_of(silence, same)) == pytest.approx(0.0, abs=1e-6)
    assert patterns.novelty(window_of(silence, changed)) == pytest.approx(1.0, abs=1e-6)


def test_repetition_finds_a_riffs_period() -> None:
    riff = np.concatenate([tone(hz, 0.5) for hz in (262, 330, 392, 494)])  # 2 s
    strength, period = patterns.repetition(np.tile(riff, 5), RATE)
    assert period == pytest.approx(2.0, abs=0.01) and strength > 0.4
    assert patterns.repetition(noise(10.0), RATE)[0] < 0.1
    assert patterns.repetition(tone(440, 10.0), RATE)[0] < 0.1


def test_keywords_skip_stopwords_and_rank_by_count() -> None:
    entries = (
        TimelineEntry(0, 1, text="THE RAIN IS FALLING ON THE ROOF"),
        TimelineEntry(1, 2, text="I LIKE THE RAIN"),
        TimelineEntry(2, 3, text="AND THE WIND"),
    )
    assert patterns.keywords(window_of(np.zeros(3, np.float32), entries)) == (
        "rain",
        "wind",
        "like",
    )


def test_keywords_include_classification_labels() -> None:
    entries = (
        TimelineEntry(0, 1, label="Rain"),
        TimelineEntry(1, 2, label="Rain"),
        TimelineEntry(2, 3, text="THE ROOF", label="Speech"),
    )
    assert patterns.keywords(window_of(np.zeros(3, np.float32), entries))[0] == "rain"
    fields = {"wav2vec2": {"labels": [{"label": "Rain", "score": 0.9}]}}
    assert timeline_entry(0, 1, fields).label == "Rain"


def test_describe_runs_every_detector() -> None:
    d = patterns.describe(window_of(clicks(120, 6.0)))
    assert d.tempo_bpm == pytest.approx(120, rel=0.04)
    assert d.speech + d.sound + d.silence == pytest.approx(1.0)
    as_dict = d.to_dict()
    assert set(as_dict) >= {"loudness_dbfs", "tempo_bpm", "novelty", "keywords"}


def test_each_measurement_is_computed_once_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The detectors and then the prompt read one window's measurements: every measurement runs
    once, the findings are the measurements rounded, and the descriptors are describe()'s."""
    entries = (TimelineEntry(0, RATE, speech_ratio=0.5, text="RAIN ON THE ROOF"),)
    window = window_of(clicks(120, 6.0), entries)
    expected = patterns.describe(window)
    calls: dict[str, int] = {}
    for name in ("frame_levels", "onsets", "pitch_range", "novelty", "repetition", "ranked_words"):
        original = getattr(patterns, name)

        def counted(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args)

        monkeypatch.setattr(patterns, name, counted)
    detectors = [cls(cls.Options()) for cls in (DETECTORS[n] for n in DETECTORS.names())]
    measured = patterns.Measurements(window)
    found = detect_all(detectors, measured)
    assert measured.descriptors() == expected
    assert calls == dict.fromkeys(calls, 1) and len(calls) == 6
    assert found["rhythm"]["tempo_bpm"] == round(expected.tempo_bpm or 0.0, 3)
    assert found["balance"]["speech"] == round(expected.speech, 3)
    assert found["keywords"] == list(expected.keywords) == ["roof", "rain"]
    assert {d.name: d.detect(window) for d in detectors} == found  # a detector on its own


def test_a_trigger_reuses_the_measurements_of_its_chunk() -> None:
    """The session keeps the last window's measurements; the same bounds get them back, a
    window that ends elsewhere (a manual `generate` ahead of the analysis) is measured anew."""
    context = SessionContext(seconds=3.0, sample_rate=RATE)
    for k in range(3):
        context.push_audio(k * RATE, tone(220, 1.0))
    detected = context.measured(2.0, end=2 * RATE)
    assert context.measured(2.0, end=2 * RATE) is detected
    assert (detected.window.start, detected.window.end) == (0, 2 * RATE)
    ahead = context.measured(2.0, end=context.end)
    assert ahead is not detected and (ahead.window.start, ahead.window.end) == (RATE, 3 * RATE)
    context.forget_measured()  # no trigger fired: the copy of the audio goes
    assert context.measured(2.0, end=context.end) is not ahead


def test_rolling_context_keeps_the_last_seconds() -> None:
    context = RollingContext(seconds=2.0, sample_rate=RATE)
    for k in range(5):
        chunk = np.full(RATE, k, np.float32)
        context.push_audio(k * RATE, chunk)
        context.push_entry(TimelineEntry(k * RATE, (k + 1) * RATE, rms_dbfs=float(k)))
    window = context.window()
    assert (window.start, window.end) == (3 * RATE, 5 * RATE)
    assert window.audio[0] == 3 and window.audio[-1] == 4
    assert [e.rms_dbfs for e in window.entries] == [3.0, 4.0]
    assert context.window(0.5).start == 4.5 * RATE
    earlier = context.window(1.0, end=4 * RATE)  # audio runs ahead of analysis
    assert (earlier.start, earlier.end) == (3 * RATE, 4 * RATE) and earlier.audio[0] == 3
    assert [e.rms_dbfs for e in earlier.entries] == [3.0]
    with pytest.raises(ValueError):
        context.push_audio(7 * RATE, np.zeros(10, np.float32))  # a gap in the timeline


def test_entries_from_event_fields() -> None:
    vector = np.array([0.5, -1.25, 2.0], np.float32)
    import base64

    fields = {
        "features": {"rms_dbfs": -20.0, "pitch_hz": 180.0},
        "vad": {"speech": True, "speech_ratio": 0.8},
        "transcript": {"text": "", "partial": "", "final": {"text": "HELLO THERE"}},
        "wav2vec2": {
            "embedding": {
                "dtype": "float16",
                "dim": 3,
                "base64": base64.b64encode(vector.astype("<f2").tobytes()).decode(),
            }
        },
    }
    entry = timeline_entry(0, 16_000, fields)
    assert (entry.rms_dbfs, entry.pitch_hz, entry.speech, entry.text) == (
        -20.0,
        180.0,
        True,
        "HELLO THERE",
    )
    np.testing.assert_array_equal(entry.embedding, vector)
    np.testing.assert_array_equal(decode_embedding(fields["wav2vec2"]["embedding"]), vector)
    assert timeline_entry(0, 1, {}).speech is None
