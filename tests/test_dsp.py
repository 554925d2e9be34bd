"""DspAnalyser on plain arrays with known answers: no server, no engine."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from models.dsp import DspAnalyser, DspResult
from models.vad import SileroVad, VadRow, VadRun
from tests.conftest import ArrayWindow as Window

SR = 16000


@pytest.fixture(scope="module")
def analyser() -> DspAnalyser:
    return DspAnalyser()


def sine(freq: float, amplitude: float = 1.0, seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def white_noise(rms_dbfs: float, seconds: float = 1.5, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(int(seconds * SR))
    return (noise * 10 ** (rms_dbfs / 20) / np.sqrt(np.mean(noise**2))).astype(np.float32)


def whole(audio: np.ndarray) -> Window:
    return Window(audio, 0, len(audio))


def analyse_one(analyser: DspAnalyser, window: Window) -> DspResult:
    [result] = analyser.analyse([window])
    return result


def test_full_scale_sine_level(analyser: DspAnalyser) -> None:
    features = analyse_one(analyser, whole(sine(1000))).features
    assert features.rms_dbfs == pytest.approx(-3.01, abs=0.05)
    assert features.peak_dbfs == pytest.approx(0.0, abs=0.01)


def test_half_amplitude_is_6db_lower(analyser: DspAnalyser) -> None:
    full, half = analyser.analyse([whole(sine(440)), whole(sine(440, amplitude=0.5))])
    assert full.features.rms_dbfs - half.features.rms_dbfs == pytest.approx(6.02, abs=0.01)
    assert full.features.peak_dbfs - half.features.peak_dbfs == pytest.approx(6.02, abs=0.01)


def test_silence_gives_floors_no_pitch_no_speech(analyser: DspAnalyser) -> None:
    result = analyse_one(analyser, whole(np.zeros(SR, dtype=np.float32)))
    assert result.features.rms_dbfs == -120.0
    assert result.features.peak_dbfs == -120.0
    assert result.features.spectral_centroid_hz == 0.0
    assert result.features.zero_crossing_rate == 0.0
    assert result.features.pitch_hz is None
    assert result.features.pitch_confidence == 0.0
    assert result.vad.speech is False


@pytest.mark.parametrize("freq", [220.0, 440.0])
def test_sine_pitch(analyser: DspAnalyser, freq: float) -> None:
    features = analyse_one(analyser, whole(sine(freq, amplitude=0.5))).features
    assert features.pitch_hz == pytest.approx(freq, rel=0.01)
    assert features.pitch_confidence > 0.9


def test_sine_centroid_and_zero_crossings(analyser: DspAnalyser) -> None:
    features = analyse_one(analyser, whole(sine(1000, amplitude=0.5))).features
    assert features.spectral_centroid_hz == pytest.approx(1000, rel=0.05)
    assert features.zero_crossing_rate == pytest.approx(2 * 1000 / SR, abs=0.01)


def test_white_noise(analyser: DspAnalyser) -> None:
    features = analyse_one(analyser, whole(white_noise(-20))).features
    assert features.rms_dbfs == pytest.approx(-20, abs=0.01)
    assert features.pitch_hz is None
    assert features.spectral_centroid_hz == pytest.approx(SR / 4, rel=0.15)


def test_chunk_region_is_analysed_not_context(analyser: DspAnalyser) -> None:
    # Silent context and look-ahead around a 440 Hz chunk: features come from the chunk only.
    audio = np.concatenate([np.zeros(8000), sine(440, 0.5, 0.5), np.zeros(8000)])
    features = analyse_one(analyser, Window(audio.astype(np.float32), 8000, 16000)).features
    assert features.rms_dbfs == pytest.approx(-9.03, abs=0.05)
    assert features.pitch_hz == pytest.approx(440, rel=0.01)


def test_batching_does_not_change_results(analyser: DspAnalyser) -> None:
    windows = [
        Window(white_noise(-20, 1.5, seed=1), 8000, 16000),
        Window(sine(220, 0.3, 1.5), 8000, 16000),  # same length as the first: one VAD batch
        Window(sine(440, 0.3, 1.0), 0, 16000),
        Window(white_noise(-30, 0.7, seed=2), 3000, 11000),  # chunk ends past the last frame
        Window(sine(300, 0.3, 0.02), 0, 320),  # shorter than one VAD frame
        Window(sine(300, 0.3, 1.0), 5000, 5000),  # empty chunk
    ]
    batched = analyser.analyse(windows)
    alone = [analyse_one(analyser, window) for window in windows]
    for together, single in zip(batched, alone, strict=True):
        assert together.features == single.features
        assert together.vad.speech == single.vad.speech
        assert together.vad.speech_ratio == single.vad.speech_ratio
        # onnxruntime may pick other kernels for other batch sizes: allow float rounding only.
        assert together.vad.probability == pytest.approx(single.vad.probability, abs=1e-5)


@pytest.mark.parametrize("length", [0, 1, 10, 500, 700])
def test_short_chunks_do_not_crash(analyser: DspAnalyser, length: int) -> None:
    result = analyse_one(analyser, whole(sine(220, 0.5, 1.0)[:length]))
    json.dumps(result.to_event(), allow_nan=False)
    assert result.vad.speech is False
    if length < 640:  # under two periods of 50 Hz
        assert result.features.pitch_hz is None
    if length == 0:
        assert result.features.rms_dbfs == -120.0


def test_silero_frames_and_ragged_batches() -> None:
    vad = SileroVad()
    signals = [white_noise(-20, 0.1, seed=1), white_noise(-20, 0.1, seed=2), sine(200, 0.3, 0.02)]
    batch = vad.probabilities(signals[:2])
    assert batch.shape == (2, 1600 // 512)  # the 64-sample tail past the last frame is not seen
    runs = vad.run([VadRow(signal) for signal in signals])
    assert [len(run.probabilities) for run in runs] == [3, 3, 0]
    np.testing.assert_allclose(runs[1].probabilities, vad.probabilities([signals[1]])[0], atol=1e-5)
    with pytest.raises(ValueError):
        vad.probabilities(signals)


class FixedVad:
    """Stands in for SileroVad: the same per-frame probabilities for every signal."""

    def __init__(self, probabilities: list[float]) -> None:
        self.probabilities = np.asarray(probabilities, dtype=np.float32)

    def run(self, rows: list[VadRow]) -> list[VadRun]:
        state, context = np.zeros((2, 128), np.float32), np.zeros(64, np.float32)
        return [VadRun(self.probabilities[: len(r.samples) // 512], state, context) for r in rows]


@pytest.mark.parametrize(
    ("speech_frames", "chunk_samples", "expected"),
    [
        (3, 8192, False),  # 3 x 32 ms = 96 ms of speech: under 0.1 s
        (4, 8192, True),  # 128 ms
        (1, 1024, True),  # chunk shorter than 0.1 s: one speech frame is enough
        (0, 1024, False),
    ],
)
def test_speech_rule(speech_frames: int, chunk_samples: int, expected: bool) -> None:
    probabilities = [0.9] * speech_frames + [0.1] * (chunk_samples // 512 - speech_frames)
    analyser = DspAnalyser(vad=FixedVad(probabilities))  # type: ignore[arg-type]
    vad = analyse_one(analyser, whole(np.zeros(chunk_samples, dtype=np.float32))).vad
    assert vad.speech is expected
    assert vad.speech_ratio == pytest.approx(speech_frames * 512 / chunk_samples)
    assert vad.probability == pytest.approx(0.9 if speech_frames else 0.1)


def espeak_speech(tmp_path: Path) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (apt-get install espeak-ng); this test needs it")
    wav = tmp_path / "speech.wav"
    sentence = "The quick brown fox jumps over the lazy dog while we test voice activity."
    subprocess.run(["espeak-ng", "-w", str(wav), sentence], check=True, capture_output=True)
    audio, rate = soundfile.read(wav, dtype="float32")
    return soxr.resample(audio, rate, SR).astype(np.float32)


def test_speech_tone_and_noise_vad(analyser: DspAnalyser, tmp_path: Path) -> None:
    speech = espeak_speech(tmp_path)
    # Windows as the engine cuts them: 0.5 s context, 0.5 s chunk, 0.5 s look-ahead.
    context = chunk = lookahead = SR // 2
    size = context + chunk + lookahead
    padded = np.concatenate([np.zeros(context, np.float32), speech, np.zeros(size, np.float32)])
    starts = range(0, len(padded) - size + 1, chunk)
    speech_windows = [Window(padded[s : s + size], context, context + chunk) for s in starts]
    # Silero says about 0.01 for this tone and 0.04 for this noise: far from 0.5.
    tone = Window(sine(440, 10 ** (-20 / 20) * np.sqrt(2)), context, context + chunk)
    noise = Window(white_noise(-20), context, context + chunk)
    *speech_results, tone_result, noise_result = analyser.analyse(speech_windows + [tone, noise])
    assert any(result.vad.speech for result in speech_results)
    # espeak-ng's default voice sits around 100 Hz.
    assert any(60 < (result.features.pitch_hz or 0) < 300 for result in speech_results)
    assert tone_result.vad.speech is False
    assert noise_result.vad.speech is False


def assert_plain_json(value: object) -> None:
    if isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            assert_plain_json(item)
    else:
        assert value is None or type(value) in (bool, int, float, str), type(value)


def test_events_are_plain_json(analyser: DspAnalyser) -> None:
    windows = [whole(np.zeros(SR, np.float32)), whole(white_noise(-20)), whole(sine(440))]
    windows += [whole(np.zeros(0, np.float32)), Window(np.full(2000, np.nan, np.float32), 0, 2000)]
    for result in analyser.analyse(windows):
        event = result.to_event()
        assert set(event) == {"features", "vad"}
        assert set(event["vad"]) == {"speech", "probability", "speech_ratio", "frames"}
        chunk = result.vad.frames
        # One probability per 20 ms step of the chunk (the empty window has none).
        assert len(event["vad"]["frames"]) == len(chunk) and all(0 <= p <= 1 for p in chunk)
        assert_plain_json(event)
        json.dumps(event, allow_nan=False)


def test_vad_frames_follow_the_20_ms_grid(analyser: DspAnalyser) -> None:
    audio = np.concatenate([np.zeros(SR // 2, np.float32), white_noise(-20)[: SR // 2]])
    (result,) = analyser.analyse([whole(audio)])
    assert len(result.vad.frames) == SR // 320
    (partial,) = analyser.analyse([whole(audio[:1000])])
    assert len(partial.vad.frames) == 4  # 3 whole steps and a short one


@settings(max_examples=40, deadline=None, database=None)
@given(
    length=st.integers(0, 3000),
    bounds=st.tuples(st.integers(0, 3000), st.integers(0, 3000)),
    amplitude=st.sampled_from([0.0, 1e-30, 1e-6, 0.5, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_any_window_gives_finite_event(
    analyser: DspAnalyser, length: int, bounds: tuple[int, int], amplitude: float, seed: int
) -> None:
    audio = (amplitude * np.random.default_rng(seed).standard_normal(length)).astype(np.float32)
    start, end = sorted(bounds)
    json.dumps(analyse_one(analyser, Window(audio, start, end)).to_event(), allow_nan=False)
