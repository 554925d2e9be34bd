"""Pattern detectors over a context window: what the last seconds sounded like, as numbers.

Each detector is a small function of the window's audio (16 kHz mono) and/or its analysis
timeline, with an answer that a synthetic signal can check: a tone's pitch, a click track's tempo,
a repeated phrase's period. `Measurements` is one window's: each measurement computed once, when
first asked for, then shared by the pipeline's detectors (detectors.py, whose findings the
novelty trigger watches) and the prompt (prompts.py), which takes them all as `Descriptors`;
`describe()` is that for a window of its own. numpy only; a 10 s window takes a few tens of
milliseconds, so callers run it off the event loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from stream.core.steps.context import ContextWindow

SILENCE_DBFS = -50.0  # frames quieter than this count as silence
FRAME, HOP = 512, 256  # 32 ms frames every 16 ms: level and onsets
PITCH_FRAME, PITCH_HOP = 1024, 512
PITCH_MIN_HZ, PITCH_MAX_HZ = 60.0, 1000.0
VOICED = 0.7  # normalised autocorrelation peak that makes a frame pitched
TEMPO_BPM = (60.0, 180.0)
SEGMENT_S = 0.25  # chroma / spectrum segments for repetition and the novelty fallback
STOPWORDS = frozenset(
    "A AN THE AND OR BUT IF OF TO IN ON AT BY FOR WITH FROM AS IS ARE WAS WERE BE BEEN AM IT ITS "
    "THIS THAT THESE THOSE I YOU HE SHE WE THEY ME HIM HER US THEM MY YOUR HIS OUR THEIR DO DOES "
    "DID NOT NO SO THEN THAN TOO VERY CAN WILL WOULD SHOULD COULD HAVE HAS HAD WHAT WHO WHEN "
    "WHERE WHY HOW ALL ANY SOME JUST ABOUT INTO OVER UP DOWN OUT THERE HERE OH UH UM YES".split()
)
KEYWORDS = 3  # in Descriptors (the keywords detector's own `top` may differ)


@dataclass(frozen=True)
class Descriptors:
    loudness_dbfs: float  # mean power of the window
    dynamics_db: float  # spread of frame levels (90th - 10th percentile of non-silent frames)
    onset_rate_hz: float  # onsets per second
    tempo_bpm: float | None  # None when no steady pulse
    pitch_low_hz: float | None  # 10th / 90th percentile of pitched frames; None if none
    pitch_high_hz: float | None
    speech: float  # shares of the window: voice activity, other sound, silence (sum to 1)
    sound: float
    silence: float
    novelty: float | None  # 0 = the recent third is like the rest, 1 = nothing alike
    repetition: float  # strength of the best repetition period over the baseline similarity
    repetition_period_s: float | None
    keywords: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        out = {}
        for key, value in asdict(self).items():
            out[key] = round(value, 3) if isinstance(value, float) else value
        out["keywords"] = list(self.keywords)
        return out


class Measurements:
    """One window's measurements, each computed the first time it is asked for and kept: the
    detectors of a chunk read the ones they report, a prompt over the same window then reads
    them all (`descriptors`) without computing those again. Not locked: two threads asking for
    the same measurement at once both compute it (the same value)."""

    def __init__(self, window: ContextWindow) -> None:
        self.window = window
        self._kept: dict[str, Any] = {}

    def _once(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self._kept:
            self._kept[name] = compute()
        return self._kept[name]

    def frame_levels(self) -> np.ndarray:
        return self._once("frame_levels", lambda: frame_levels(self.window.audio))

    def loudness(self) -> tuple[float, float]:
        return self._once("loudness", lambda: loudness(self.window.audio, self.frame_levels()))

    def onsets(self) -> tuple[float, float | None]:
        w = self.window
        return self._once("onsets", lambda: onsets(w.audio, w.sample_rate))

    def pitch_range(self) -> tuple[float | None, float | None]:
        w = self.window
        return self._once("pitch_range", lambda: pitch_range(w.audio, w.sample_rate))

    def balance(self) -> tuple[float, float, float]:
        return self._once("balance", lambda: balance(self.window, self.frame_levels()))

    def novelty(self) -> float | None:
        return self._once("novelty", lambda: novelty(self.window))

    def repetition(self) -> tuple[float, float | None]:
        w = self.window
        return self._once("repetition", lambda: repetition(w.audio, w.sample_rate))

    def keywords(self, top: int = KEYWORDS) -> tuple[str, ...]:
        return top_words(self._once("words", lambda: ranked_words(self.window)), top)

    def descriptors(self) -> Descriptors:
        loud, dynamics = self.loudness()
        rate_hz, bpm = self.onsets()
        low, high = self.pitch_range()
        speech, sound, silence = self.balance()
        repeat, period = self.repetition()
        return Descriptors(
            loud, dynamics, rate_hz, bpm, low, high, speech, sound, silence,
            self.novelty(), repeat, period, self.keywords(),
        )  # fmt: skip


def describe(window: ContextWindow) -> Descriptors:
    """Every measurement of `window` (on its own: `Measurements` shares them)."""
    return Measurements(window).descriptors()


def frame_levels(audio: np.ndarray) -> np.ndarray:
    """dBFS of each FRAME-sample frame every HOP samples (a sine of amplitude 1 is -3 dBFS)."""
    if len(audio) < FRAME:
        audio = np.pad(audio, (0, FRAME - len(audio)))
    frames = sliding_window_view(audio, FRAME)[::HOP]
    power = np.mean(frames.astype(np.float64) ** 2, axis=1)
    return 10 * np.log10(np.maximum(power, 1e-12))


def loudness(audio: np.ndarray, levels: np.ndarray | None = None) -> tuple[float, float]:
    """(mean power in dBFS, 90th - 10th percentile of the non-silent frame levels in dB);
    `levels`: the audio's `frame_levels`, when computed already."""
    if not len(audio):
        return -120.0, 0.0
    mean = 10 * np.log10(max(float(np.mean(audio.astype(np.float64) ** 2)), 1e-12))
    levels = frame_levels(audio) if levels is None else levels
    sounding = levels[levels > SILENCE_DBFS]
    if len(sounding) < 2:
        return float(mean), 0.0
    return float(mean), float(np.percentile(sounding, 90) - np.percentile(sounding, 10))


def onset_envelope(audio: np.ndarray) -> np.ndarray:
    """Half-wave rectified spectral flux of log-compressed magnitudes, one value per HOP."""
    if len(audio) < FRAME * 2:
        return np.zeros(0)
    frames = sliding_window_view(audio, FRAME)[::HOP] * np.hanning(FRAME)
    magnitude = np.log1p(100 * np.abs(np.fft.rfft(frames, axis=1)))
    return np.maximum(np.diff(magnitude, axis=0), 0).sum(axis=1)


def onsets(audio: np.ndarray, rate: int) -> tuple[float, float | None]:
    """(onsets per second, tempo in BPM or None): flux peaks, and the envelope's periodicity."""
    flux = onset_envelope(audio)
    seconds = len(audio) / rate
    if len(flux) < 3 or flux.max() <= 0:
        return 0.0, None
    # A flux peak must stand 3 sigmas (from the median absolute deviation) above the median, so
    # that steady noise, whose flux merely fluctuates, yields almost no onsets; and a tenth of
    # the way to the strongest peak, for windows where most frames have no flux at all.
    median = float(np.median(flux))
    sigma = 1.4826 * float(np.median(np.abs(flux - median)))
    threshold = median + max(3 * sigma, 0.1 * (float(flux.max()) - median))
    gap = int(0.05 * rate / HOP)  # peaks closer than 50 ms are one onset
    count, last = 0, -gap - 1
    for i in range(1, len(flux) - 1):
        peak = flux[i] >= flux[i - 1] and flux[i] > flux[i + 1] and flux[i] > threshold
        if peak and i - last > gap:
            count, last = count + 1, i
    return count / seconds, _tempo(flux, rate / HOP)


def _tempo(flux: np.ndarray, frames_per_s: float) -> float | None:
    centred = flux - flux.mean()
    ac = np.correlate(centred, centred, "full")[len(centred) - 1 :]
    if ac[0] <= 0:
        return None
    lo = int(frames_per_s * 60 / TEMPO_BPM[1])
    hi = min(int(frames_per_s * 60 / TEMPO_BPM[0]) + 1, len(ac) - 1)
    if hi <= lo:
        return None
    lag = lo + int(np.argmax(ac[lo:hi]))
    if ac[lag] / ac[0] < 0.3:  # no steady pulse
        return None
    # Parabolic interpolation around the peak for a tempo finer than one frame.
    if 0 < lag < len(ac) - 1:
        a, b, c = ac[lag - 1], ac[lag], ac[lag + 1]
        denom = a - 2 * b + c
        lag = lag + (0.5 * (a - c) / denom if denom else 0.0)
    return float(60.0 * frames_per_s / lag)


def frame_pitches(audio: np.ndarray, rate: int) -> np.ndarray:
    """Fundamental frequency (Hz) of each pitched PITCH_FRAME frame; unpitched frames dropped."""
    if len(audio) < PITCH_FRAME:
        return np.zeros(0)
    frames = sliding_window_view(audio, PITCH_FRAME)[::PITCH_HOP].astype(np.float64)
    frames = frames - frames.mean(axis=1, keepdims=True)
    loud = 10 * np.log10(np.maximum((frames**2).mean(axis=1), 1e-12)) > SILENCE_DBFS
    spectrum = np.fft.rfft(frames, 2 * PITCH_FRAME, axis=1)
    ac = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, :PITCH_FRAME]
    # Unbiased: divide by the overlap so that long lags are not penalised.
    ac = ac / (PITCH_FRAME - np.arange(PITCH_FRAME)) * PITCH_FRAME
    ac = ac / np.maximum(ac[:, :1], 1e-12)
    lo, hi = int(rate / PITCH_MAX_HZ), int(rate / PITCH_MIN_HZ)
    pitches = []
    for row, sounding in zip(ac, loud):
        if not sounding:
            continue
        band = row[lo:hi]
        best = float(band.max())
        if best < VOICED:
            continue
        # The first lag close to the best avoids sub-octave errors (multiples of the period).
        lag = lo + int(np.argmax(band >= 0.9 * best))
        while lag + 1 < hi and row[lag + 1] > row[lag]:
            lag += 1
        pitches.append(rate / lag)
    return np.asarray(pitches)


def pitch_range(audio: np.ndarray, rate: int) -> tuple[float | None, float | None]:
    """(10th, 90th percentile) of frame pitches in Hz; (None, None) with no pitched frames."""
    pitches = frame_pitches(audio, rate)
    if len(pitches) < 2:
        return None, None
    return float(np.percentile(pitches, 10)), float(np.percentile(pitches, 90))


def balance(window: ContextWindow, levels: np.ndarray | None = None) -> tuple[float, float, float]:
    """(speech, other sound, silence) shares: silence from frame levels, speech from the voice
    activity in the timeline (none without a detector), other sound the rest. `levels`: the
    window's `frame_levels`, when computed already."""
    levels = frame_levels(window.audio) if levels is None else levels
    silence = float(np.mean(levels <= SILENCE_DBFS)) if len(window.audio) else 1.0
    voiced = 0.0
    for e in window.entries:
        if e.speech_ratio is not None:
            overlap = min(e.end, window.end) - max(e.start, window.start)
            voiced += max(0, overlap) * e.speech_ratio
    span = max(window.end - window.start, 1)
    speech = min(voiced / span, 1.0 - silence)
    return speech, max(0.0, 1.0 - silence - speech), silence


def novelty(window: ContextWindow) -> float | None:
    """Cosine distance between the mean vector of the window's recent third and of the rest:
    wav2vec2 embeddings when the timeline has them, else spectral shapes. None if too short."""
    vectors = [e.embedding for e in window.entries if e.embedding is not None]
    if len(vectors) < 3:
        vectors = list(spectral_shapes(window.audio, window.sample_rate))
    if len(vectors) < 3:
        return None
    stacked = np.stack(vectors).astype(np.float64)
    split = len(stacked) - max(1, len(stacked) // 3)
    older, recent = stacked[:split].mean(axis=0), stacked[split:].mean(axis=0)
    norms = np.linalg.norm(older) * np.linalg.norm(recent)
    if norms == 0:
        return 0.0
    return float(np.clip(1.0 - older @ recent / norms, 0.0, 1.0))


def spectral_shapes(audio: np.ndarray, rate: int, bands: int = 24) -> np.ndarray:
    """Per SEGMENT_S segment: log energies of `bands` log-spaced bands (60 Hz-8 kHz), minus their
    mean, so that a level change alone is not a new sound."""
    size = int(SEGMENT_S * rate)
    count = len(audio) // size
    if count == 0:
        return np.zeros((0, bands))
    segments = audio[: count * size].reshape(count, size) * np.hanning(size)
    power = np.abs(np.fft.rfft(segments, axis=1)) ** 2
    freqs = np.fft.rfftfreq(size, 1 / rate)
    edges = np.geomspace(60, rate / 2, bands + 1)
    index = np.clip(np.searchsorted(edges, freqs) - 1, 0, bands - 1)
    valid = freqs >= 60
    energy = np.stack([power[:, valid & (index == b)].sum(axis=1) for b in range(bands)], axis=1)
    logs = np.log10(energy + 1e-10)
    return logs - logs.mean(axis=1, keepdims=True)


def chroma(audio: np.ndarray, rate: int) -> np.ndarray:
    """Per SEGMENT_S segment: energy in the 12 pitch classes (55 Hz-4 kHz), unit-normalised and
    centred, so that noise (flat chroma) is not similar to everything."""
    size = int(SEGMENT_S * rate)
    count = len(audio) // size
    if count == 0:
        return np.zeros((0, 12))
    segments = audio[: count * size].reshape(count, size) * np.hanning(size)
    power = np.abs(np.fft.rfft(segments, axis=1)) ** 2
    freqs = np.fft.rfftfreq(size, 1 / rate)
    keep = (freqs >= 55) & (freqs <= 4000)
    classes = np.round(12 * np.log2(freqs[keep] / 440.0)).astype(int) % 12
    out = np.zeros((count, 12))
    for c in range(12):
        out[:, c] = power[:, keep][:, classes == c].sum(axis=1)
    out = out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)
    out = out - out.mean(axis=1, keepdims=True)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def repetition(
    audio: np.ndarray, rate: int, min_period_s: float = 1.0
) -> tuple[float, float | None]:
    """(strength, period in s): the lag whose diagonal of the chroma self-similarity stands
    highest above the mean similarity. A steady tone or noise has none; a riff has its length."""
    c = chroma(audio, rate)
    lo = int(min_period_s / SEGMENT_S)
    if len(c) < 2 * lo + 1:
        return 0.0, None
    similarity = c @ c.T
    baseline = float(similarity[~np.eye(len(c), dtype=bool)].mean())
    best, period = 0.0, None
    for lag in range(lo, len(c) // 2 + 1):
        score = float(np.diagonal(similarity, lag).mean()) - baseline
        if score > best + 1e-9:
            best, period = score, lag * SEGMENT_S
    return float(np.clip(best, 0.0, 1.0)), period


def keywords(window: ContextWindow, top: int = KEYWORDS) -> tuple[str, ...]:
    """The most frequent non-stopwords of the window's transcript and of its chunks' labels (a
    classification checkpoint's: "applause", "rain"...), later ones winning ties."""
    return top_words(ranked_words(window), top)


def ranked_words(window: ContextWindow) -> list[str]:
    """The window's non-stopwords (upper case), most frequent first, later ones winning ties."""
    words = []
    for e in window.entries:
        words += [w for w in e.text.upper().split() if w not in STOPWORDS]
        if e.label:
            words.append(e.label.upper())
    last = {w: i for i, w in enumerate(words)}
    counts = Counter(words)
    return sorted(counts, key=lambda w: (-counts[w], -last[w]))


def top_words(ranked: list[str], top: int) -> tuple[str, ...]:
    """The keywords among the first `top` ranked words (shorter than 3 letters: left out)."""
    return tuple(w.lower() for w in ranked[:top] if len(w) > 2)
