"""Signal-level analysis of each chunk: level, spectrum, pitch (YIN) and voice activity (Silero).

Level, spectral and pitch features look only at the chunk itself, audio[chunk_start:chunk_end].
Voice activity runs Silero once over each stream, keeping its recurrent state from one window
to the next (models/vad.py, StreamingVad): a window runs only the frames no earlier window of
its stream ran, and where the stream's state cannot go on (its first window, a gap) Silero starts
afresh at the window's first sample on the stream's frame grid, warmed up by the left context.
Each chunk reports the frames that cover it. Windows of no stream run from their first sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from models.base import ANALYSIS_SAMPLE_RATE, Analyser, AnalysisResult, AnalysisWindow
from models.vad import SileroVad, StreamingVad, VadFrames, VadRequest

DBFS_FLOOR = -120.0  # reported instead of -inf for digital silence
AMPLITUDE_FLOOR = 10.0 ** (DBFS_FLOOR / 20.0)
SPECTRUM_FRAME, SPECTRUM_HOP = 512, 256
SPECTRUM_WINDOW = np.hanning(SPECTRUM_FRAME)
SPECTRUM_FREQS = np.fft.rfftfreq(SPECTRUM_FRAME, 1.0 / ANALYSIS_SAMPLE_RATE)
GRID_SAMPLES = ANALYSIS_SAMPLE_RATE // 50  # 20 ms: the frame grid of wav2vec2's CTC output
YIN_FRAME, YIN_HOP = 2048, 512
YIN_SILENCE_RMS = 10.0 ** (-70.0 / 20.0)  # quieter YIN frames are unvoiced, not analysed


@dataclass(frozen=True)
class DspFeatures:
    rms_dbfs: float
    peak_dbfs: float
    spectral_centroid_hz: float
    zero_crossing_rate: float
    pitch_hz: float | None
    pitch_confidence: float


@dataclass(frozen=True)
class VoiceActivity:
    speech: bool
    probability: float  # highest frame probability over the chunk
    speech_ratio: float  # share of the chunk's samples in frames at or above the threshold
    # The probability of speech per 20 ms step of the chunk (the CTC frames' grid; the last
    # step may be shorter): what turn detection reads (stream/core/audio/turns.py).
    frames: tuple[float, ...] = ()


@dataclass(frozen=True)
class DspResult(AnalysisResult):
    features: DspFeatures
    vad: VoiceActivity

    def to_event(self) -> dict[str, Any]:
        """Plain JSON types only, rounded to what is meaningful for a live display."""
        f, v = self.features, self.vad
        return {
            "features": {
                "rms_dbfs": round(f.rms_dbfs, 2),
                "peak_dbfs": round(f.peak_dbfs, 2),
                "spectral_centroid_hz": round(f.spectral_centroid_hz, 1),
                "zero_crossing_rate": round(f.zero_crossing_rate, 4),
                "pitch_hz": None if f.pitch_hz is None else round(f.pitch_hz, 2),
                "pitch_confidence": round(f.pitch_confidence, 3),
            },
            "vad": {
                "speech": v.speech,
                "probability": round(v.probability, 3),
                "speech_ratio": round(v.speech_ratio, 3),
                "frames": [round(p, 2) for p in v.frames],
            },
        }


def to_dbfs(amplitude: float) -> float:
    """20*log10 of a linear amplitude (1.0 = full scale), floored at DBFS_FLOOR."""
    return float(20.0 * np.log10(max(amplitude, AMPLITUDE_FLOOR)))


def zero_crossing_rate(chunk: np.ndarray) -> float:
    """Share of adjacent sample pairs whose sign differs; zero counts as positive."""
    if len(chunk) < 2:
        return 0.0
    positive = chunk >= 0
    return float(np.count_nonzero(positive[1:] != positive[:-1]) / (len(chunk) - 1))


def spectral_centroid(chunk: np.ndarray) -> float:
    """Mean of per-frame magnitude-spectrum centroids, weighted by frame energy; 0.0 if silent.

    The chunk is zero-padded at the end so every sample falls in some Hann frame.
    """
    if len(chunk) == 0:
        return 0.0
    n_frames = 1 + max(0, -(-(len(chunk) - SPECTRUM_FRAME) // SPECTRUM_HOP))
    padded = np.zeros(SPECTRUM_FRAME + (n_frames - 1) * SPECTRUM_HOP)
    padded[: len(chunk)] = chunk
    frames = sliding_window_view(padded, SPECTRUM_FRAME)[::SPECTRUM_HOP] * SPECTRUM_WINDOW
    magnitude = np.abs(np.fft.rfft(frames, axis=1))
    magnitude_sum = magnitude.sum(axis=1)
    energy = np.square(magnitude).sum(axis=1)
    total_energy = energy.sum()
    if not total_energy > 0.0:
        return 0.0
    centroids = np.zeros(n_frames)
    np.divide(magnitude @ SPECTRUM_FREQS, magnitude_sum, out=centroids, where=magnitude_sum > 0)
    return float(centroids @ energy / total_energy)


def yin_pitch(
    chunk: np.ndarray, fmin: float, fmax: float, threshold: float, min_voiced_fraction: float
) -> tuple[float | None, float]:
    """YIN (de Cheveigné & Kawahara 2002) over frames of the chunk: (pitch_hz, confidence).

    A frame is voiced when its cumulative mean normalised difference (CMND) dips below
    `threshold` between the periods of fmax and fmin. The chunk gets a pitch, the median f0 of
    its voiced frames, only when at least `min_voiced_fraction` of its frames are voiced, so
    one stray periodic frame does not give a chunk a pitch. (The analyser's default, a quarter,
    keeps a pitch for speech chunks broken by consonants and pauses; white, pink and brown
    noise give no voiced frame at all.) Confidence is 1 - the median CMND minimum
    (aperiodicity) of the voiced frames. Chunks shorter than two periods of fmin have no
    pitch; a chunk shorter than one YIN frame is analysed as a single frame.
    """
    tau_min = max(2, int(ANALYSIS_SAMPLE_RATE // fmax))
    tau_max = int(np.ceil(ANALYSIS_SAMPLE_RATE / fmin))
    if len(chunk) < 2 * tau_max:
        return None, 0.0
    frame_length = min(YIN_FRAME, len(chunk))
    frames = sliding_window_view(chunk.astype(np.float64), frame_length)[::YIN_HOP]
    width = frame_length - tau_max - 1  # integration window, leaving room for lags to tau_max+1
    n_lags = tau_max + 2

    # d(tau) = sum_j (x_j - x_{j+tau})^2 = e(0) + e(tau) - 2 r(tau), the energies from a running
    # sum of squares and the cross-correlation r from one FFT (no wrap: n_fft >= frame_length).
    n_fft = 1 << (frame_length - 1).bit_length()
    head_spectrum = np.fft.rfft(frames[:, :width], n_fft, axis=1)
    cross = np.fft.irfft(np.conj(head_spectrum) * np.fft.rfft(frames, n_fft, axis=1), n_fft)
    square_sums = np.zeros((len(frames), frame_length + 1))
    np.cumsum(np.square(frames), axis=1, out=square_sums[:, 1:])
    lags = np.arange(n_lags)
    energies = square_sums[:, lags + width] - square_sums[:, lags]
    difference = np.maximum(energies[:, :1] + energies - 2.0 * cross[:, :n_lags], 0.0)

    # CMND: d'(tau) = d(tau) * tau / sum_{k<=tau} d(k), d'(0) = 1; 1 where undefined (silence).
    running = np.cumsum(difference[:, 1:], axis=1)
    cmnd = np.ones_like(difference)
    np.divide(difference[:, 1:] * lags[1:], running, out=cmnd[:, 1:], where=running > 0)

    # First lag below threshold, then walk down to the bottom of that dip.
    search = cmnd[:, tau_min : tau_max + 1]
    below = search < threshold
    loud = np.sqrt(energies[:, 0] / width) >= YIN_SILENCE_RMS
    voiced = below.any(axis=1) & loud
    if np.count_nonzero(voiced) < min_voiced_fraction * len(frames) or not voiced.any():
        return None, 0.0
    first_below = np.argmax(below, axis=1)
    at_bottom = cmnd[:, tau_min + 1 : tau_max + 2] >= search
    at_bottom &= np.arange(search.shape[1]) >= first_below[:, None]
    offsets = np.where(at_bottom.any(axis=1), np.argmax(at_bottom, axis=1), search.shape[1] - 1)
    rows = np.flatnonzero(voiced)
    tau = offsets[rows] + tau_min

    # Parabolic interpolation through the three CMND values around the dip.
    left, centre, right = cmnd[rows, tau - 1], cmnd[rows, tau], cmnd[rows, tau + 1]
    curvature = left - 2.0 * centre + right
    shift = np.zeros(len(rows))
    np.divide(left - right, 2.0 * curvature, out=shift, where=curvature > 0)
    f0 = ANALYSIS_SAMPLE_RATE / (tau + np.clip(shift, -1.0, 1.0))
    return float(np.median(f0)), float(1.0 - np.median(centre))


class DspAnalyser(Analyser):
    """Analyser "dsp": DspResult per window. Thresholds are constructor arguments.

    Speech rule: a chunk is speech when the frames at or above `speech_threshold` cover at least
    `min_speech_seconds` of it; a chunk shorter than that is speech when any of its frames is at
    or above the threshold. A chunk no VAD frame (512 samples on the stream's grid) covers yet
    gets no VAD: speech False, probability 0. `max_streams` streams keep their VAD state (LRU).
    """

    name = "dsp"
    sample_rate = ANALYSIS_SAMPLE_RATE

    def __init__(
        self,
        speech_threshold: float = 0.5,
        min_speech_seconds: float = 0.1,
        pitch_fmin_hz: float = 50.0,
        pitch_fmax_hz: float = 1000.0,
        yin_threshold: float = 0.15,
        min_voiced_fraction: float = 0.25,
        vad: SileroVad | None = None,
        max_streams: int = 256,
    ) -> None:
        self.speech_threshold = speech_threshold
        self.min_speech_seconds = min_speech_seconds
        self.pitch_fmin_hz = pitch_fmin_hz
        self.pitch_fmax_hz = pitch_fmax_hz
        self.yin_threshold = yin_threshold
        self.min_voiced_fraction = min_voiced_fraction
        self.vad = StreamingVad(vad or SileroVad(), max_streams)

    def release(self, stream: str) -> None:
        """The stream ended: drop its VAD state."""
        self.vad.release(stream)

    def analyse(self, windows: Sequence[AnalysisWindow]) -> list[DspResult]:
        """One DspResult per window, in order; the VAD runs all windows in one batch."""
        audios, spans, requests = [], [], []
        for window in windows:
            audio = np.asarray(window.audio, dtype=np.float32).reshape(-1)
            if not np.isfinite(audio).all():  # keep NaN/inf out of the JSON events
                audio = np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0)
            start = min(max(int(window.chunk_start), 0), len(audio))
            end = min(max(int(window.chunk_end), start), len(audio))
            audios.append(audio)
            spans.append((start, end))
            stream = getattr(window, "stream", "") or ""
            audio_start = int(getattr(window, "audio_start", 0) or 0)
            requests.append(VadRequest(stream, audio_start, audio, start, end))
        vad_frames = self.vad.analyse(requests)
        return [
            DspResult(self._features(audio[start:end]), self._voice_activity(frames, start, end))
            for audio, (start, end), frames in zip(audios, spans, vad_frames)
        ]

    def _features(self, chunk: np.ndarray) -> DspFeatures:
        chunk64 = chunk.astype(np.float64)
        rms = float(np.sqrt(np.mean(np.square(chunk64)))) if len(chunk) else 0.0
        peak = float(np.max(np.abs(chunk64))) if len(chunk) else 0.0
        pitch_hz, confidence = yin_pitch(
            chunk64,
            self.pitch_fmin_hz,
            self.pitch_fmax_hz,
            self.yin_threshold,
            self.min_voiced_fraction,
        )
        return DspFeatures(
            rms_dbfs=to_dbfs(rms),
            peak_dbfs=to_dbfs(peak),
            spectral_centroid_hz=spectral_centroid(chunk64),
            zero_crossing_rate=zero_crossing_rate(chunk),
            pitch_hz=pitch_hz,
            pitch_confidence=confidence,
        )

    def _voice_activity(self, frames: VadFrames, start: int, end: int) -> VoiceActivity:
        if end <= start or len(frames.probabilities) == 0:
            return VoiceActivity(speech=False, probability=0.0, speech_ratio=0.0)
        # Each chunk sample takes the probability of the frame covering it (the tail past the
        # last whole frame takes the last frame's), so frames count by their overlap with the chunk.
        sample_probabilities = frames.of_samples(start, end)
        speech_samples = int(np.count_nonzero(sample_probabilities >= self.speech_threshold))
        probability = float(sample_probabilities.max())
        chunk_seconds = (end - start) / ANALYSIS_SAMPLE_RATE
        speech = speech_samples / ANALYSIS_SAMPLE_RATE >= self.min_speech_seconds or (
            chunk_seconds < self.min_speech_seconds and probability >= self.speech_threshold
        )
        speech_ratio = speech_samples / (end - start)
        steps = -(-(end - start) // GRID_SAMPLES)
        padded = np.pad(sample_probabilities, (0, steps * GRID_SAMPLES - (end - start)), "edge")
        per_step = padded.reshape(steps, GRID_SAMPLES).max(axis=1)
        return VoiceActivity(bool(speech), probability, speech_ratio, tuple(per_step.tolist()))
