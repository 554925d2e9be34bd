"""StreamingVad (models/vad.py): Silero's state carried per stream across overlapping windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from models.dsp import DspAnalyser
from models.vad import SileroVad, StreamingVad, VadFrames, VadRequest
from tests.conftest import ArrayWindow as Window
from tests.conftest import espeak

SR = 16000


@pytest.fixture(scope="module")
def silero() -> SileroVad:
    return SileroVad()


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    path = Path(tmp_path_factory.mktemp("vad")) / "speech.wav"
    text = "Voice activity runs once over the stream. Then we pause, and speak again."
    audio, rate = soundfile.read(espeak(text, path), dtype="float32")
    audio = soxr.resample(audio, rate, SR).astype(np.float32)
    silence = np.zeros(SR // 2, np.float32)
    return np.concatenate([silence, audio, silence, 0.5 * audio, silence])


def windows(
    audio: np.ndarray,
    stream: str,
    chunk: int = SR,
    context: int = SR,
    lookahead: int = 0,
    first: int = 0,
) -> list[Window]:
    """Windows as stream/core/audio/chunker.py cuts them, from chunk `first` on."""
    cut = []
    for start in range(first * chunk, len(audio), chunk):
        end = min(start + chunk, len(audio))
        audio_start = max(0, start - context)
        window_audio = audio[audio_start : min(end + lookahead, len(audio))]
        cut.append(
            Window(window_audio, start - audio_start, end - audio_start, audio_start, stream)
        )
    return cut


def request(window: Window) -> VadRequest:
    return VadRequest(
        window.stream, window.audio_start, window.audio, window.chunk_start, window.chunk_end
    )


def chunk_probabilities(frames: VadFrames, window: Window) -> np.ndarray:
    return frames.of_samples(window.chunk_start, window.chunk_end)


def stream_through(vad: StreamingVad, cut: list[Window]) -> np.ndarray:
    """Per-sample probabilities of every chunk, one window per batch, concatenated."""
    return np.concatenate([chunk_probabilities(*vad.analyse([request(w)]), w) for w in cut])


@pytest.mark.parametrize(
    ("chunk", "context", "lookahead"),
    [(SR, SR, 0), (SR // 2, SR // 2, SR // 2), (1600, 0, 0), (5000, 700, 300)],
)
def test_streaming_runs_each_frame_once_and_matches_one_run(
    silero: SileroVad, speech: np.ndarray, chunk: int, context: int, lookahead: int
) -> None:
    vad = StreamingVad(silero)
    by_frame: dict[int, float] = {}
    for window in windows(speech, "s", chunk, context, lookahead):
        (frames,) = vad.analyse([request(window)])
        for offset, probability in enumerate(frames.probabilities.tolist()):
            assert by_frame.setdefault(frames.first_frame + offset, probability) == probability
    # A stream that starts at sample 0 runs exactly as Silero over the whole signal, even with
    # chunks that no window holds whole frames of (no context: the samples wait in the state).
    assert vad.frames_run == len(speech) // 512
    whole = silero.probabilities([speech])[0]
    assert sorted(by_frame) == list(range(len(whole)))
    np.testing.assert_allclose([by_frame[i] for i in range(len(whole))], whole, atol=1e-6)


def test_one_stream_never_changes_another(silero: SileroVad, speech: np.ndarray) -> None:
    quiet, loud = StreamingVad(silero), StreamingVad(silero)
    alone = StreamingVad(silero)
    rng = np.random.default_rng(0)
    noise = (0.8 * rng.standard_normal(len(speech))).astype(np.float32)
    mine = windows(speech, "mine")
    theirs_quiet = windows(np.zeros_like(speech), "theirs")
    # The other stream joins late: its first windows run 62 frames beside our 31-32.
    theirs_loud = windows(noise, "theirs", first=2)
    theirs_quiet = theirs_quiet[2:]
    for index, window in enumerate(mine):
        others = index - 2
        if 0 <= others < len(theirs_loud):
            (a, _), (b, _) = (
                quiet.analyse([request(window), request(theirs_quiet[others])]),
                loud.analyse([request(window), request(theirs_loud[others])]),
            )
        else:
            (a,), (b,) = quiet.analyse([request(window)]), loud.analyse([request(window)])
        (c,) = alone.analyse([request(window)])
        np.testing.assert_array_equal(a.probabilities, b.probabilities)  # the same bits
        # onnxruntime may pick other kernels for other batch sizes: float rounding at most.
        np.testing.assert_allclose(a.probabilities, c.probabilities, atol=1e-5)


def test_replay_retry_and_batches_of_one_stream(silero: SileroVad, speech: np.ndarray) -> None:
    vad = StreamingVad(silero)
    cut = windows(speech, "s")
    first = stream_through(vad, cut)
    run = vad.frames_run
    (frames,) = vad.analyse([request(cut[-1])])  # a batch retried: the frames kept answer
    np.testing.assert_array_equal(
        chunk_probabilities(frames, cut[-1]), first[-cut[-1].chunk_end + cut[-1].chunk_start :]
    )
    assert vad.frames_run == run
    np.testing.assert_array_equal(stream_through(vad, cut), first)  # a replay from the start
    vad.release("s")
    together = vad.analyse([request(w) for w in cut])  # its windows in order, one batch
    joined = np.concatenate([chunk_probabilities(f, w) for f, w in zip(together, cut)])
    np.testing.assert_allclose(joined, first, atol=1e-6)


def test_resumed_gapped_and_evicted_streams_start_afresh(
    silero: SileroVad, speech: np.ndarray
) -> None:
    cut = windows(speech, "s")
    fresh = [StreamingVad(silero).analyse([request(w)])[0] for w in cut]
    vad = StreamingVad(silero, max_streams=2)
    (resumed,) = vad.analyse([request(cut[3])])  # a session resumed here at chunk 3
    assert resumed.first_frame == -(-cut[3].audio_start // 512)
    np.testing.assert_array_equal(resumed.probabilities, fresh[3].probabilities)
    vad.analyse([request(cut[4])])
    (skipped,) = vad.analyse([request(cut[6])])  # chunk 5 is in its context: it goes on
    assert skipped.first_frame < -(-cut[6].audio_start // 512)
    (gapped,) = vad.analyse([request(cut[9])])  # chunks 7 and 8 never came: a gap
    np.testing.assert_array_equal(gapped.probabilities, fresh[9].probabilities)
    for name in ("a", "b"):
        vad.analyse([request(windows(speech, name)[0])])
    assert len(vad) == 2  # "s" was the least recently used
    (evicted,) = vad.analyse([request(cut[10])])
    np.testing.assert_array_equal(evicted.probabilities, fresh[10].probabilities)
    vad.release("a")
    vad.release("nobody")
    assert len(vad) == 2


def test_different_audio_under_one_name_starts_afresh(silero: SileroVad) -> None:
    vad = StreamingVad(silero)
    noise = np.random.default_rng(1).standard_normal(2 * SR).astype(np.float32) * 0.1
    vad.analyse([request(Window(np.zeros(2 * SR, np.float32), SR, 2 * SR, 0, "s"))])
    (frames,) = vad.analyse([request(Window(noise, SR, 2 * SR, 0, "s"))])
    np.testing.assert_array_equal(frames.probabilities, silero.probabilities([noise])[0])


def test_analyser_keeps_and_releases_stream_state(speech: np.ndarray) -> None:
    analyser = DspAnalyser(max_streams=4)
    cut = windows(speech, "session")
    results = [analyser.analyse([w])[0] for w in cut]
    assert len(analyser.vad) == 1
    assert analyser.vad.frames_run == len(speech) // 512
    assert any(result.vad.speech for result in results)
    assert max(results[0].vad.frames[:20]) < 0.5  # half a second of silence, then speech
    analyser.release("session")
    assert len(analyser.vad) == 0
