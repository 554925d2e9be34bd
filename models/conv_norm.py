"""The first conv layer's normalisation of "group"-norm wav2vec2 checkpoints, outside the graph.

wav2vec2-base's feature encoder normalises each channel of its first conv layer over the whole
input it is given (GroupNorm, one group per channel). That makes a frame's conv features depend
on the window they were computed in, which is why they could not be reused across overlapping
windows. The exported encoder of such a checkpoint therefore takes that normalisation as inputs
(`norm_shift`, `norm_scale`: per channel, the mean and 1/std of the first conv's output), and
the runner chooses the statistics:

- `window`: over the window itself, which is exactly what the checkpoint does to a window given
  alone (the export is verified against PyTorch this way);
- `stream`: over the stream's last `horizon` seconds, as one pass over the stream's recent past
  would. A frame is then normalised the same way whichever window computes it, up to the drift
  of the statistics from one chunk to the next, so the feature cache can keep a stream's frames
  for the next window (docs/fidelity.md measures what it changes).

The statistics need no convolution: the first conv is linear and has no bias, so channel c's
mean over n frames is w_c . s / n and its mean square w_c^T G w_c / n, where s is the sum and G
the Gram matrix of the frames' input patches (10 samples each): sums over the audio a stream
accumulates chunk by chunk. The checkpoint's input normalisation (zero mean, unit variance over
the same span) is folded in: it only rescales the conv's output, which the norm undoes, except
inside GroupNorm's epsilon, which is scaled by the audio's variance instead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.stream_table import StreamTable

FILE = "first_conv.npz"  # the first conv's weights, kernel, stride and epsilon, in the artifact


@dataclass(frozen=True)
class Moments:
    """Sums over a span of audio: of the first conv's input patches and of the samples."""

    frames: int
    patch_sum: np.ndarray  # (kernel,)
    gram: np.ndarray  # (kernel, kernel)
    samples: int
    sample_sum: float
    square_sum: float

    def __add__(self, other: Moments) -> Moments:
        return Moments(
            self.frames + other.frames,
            self.patch_sum + other.patch_sum,
            self.gram + other.gram,
            self.samples + other.samples,
            self.sample_sum + other.sample_sum,
            self.square_sum + other.square_sum,
        )


class FirstConvNorm:
    """Per-channel shift and scale of the first conv layer's GroupNorm, from audio moments."""

    def __init__(
        self, weight: np.ndarray, stride: int, eps: float, input_normalised: bool = True
    ) -> None:
        self.weight = np.asarray(weight, dtype=np.float64)  # (channels, kernel)
        self.kernel = self.weight.shape[1]
        self.stride = stride
        self.eps = eps
        # The checkpoint normalises its input (do_normalize): fold that in (see shift_scale).
        self.input_normalised = input_normalised

    @classmethod
    def load(cls, folder: Path) -> FirstConvNorm | None:
        """The artifact's first-conv file, or None for checkpoints without one (layer norm)."""
        path = Path(folder) / FILE
        if not path.is_file():
            return None
        with np.load(path) as saved:
            return cls(saved["weight"], int(saved["stride"]), float(saved["eps"]),
                       bool(saved["input_normalised"]))  # fmt: skip

    def save(self, folder: Path) -> None:
        np.savez(Path(folder) / FILE, weight=self.weight.astype(np.float32), stride=self.stride,
                 eps=self.eps, input_normalised=self.input_normalised)  # fmt: skip

    def moments(self, audio: np.ndarray) -> Moments:
        """Moments of the conv frames that start in `audio` and fit in it."""
        audio = np.asarray(audio, dtype=np.float64)
        count = (len(audio) - self.kernel) // self.stride + 1 if len(audio) >= self.kernel else 0
        windows = np.lib.stride_tricks.sliding_window_view(audio, self.kernel)
        patches = windows[:: self.stride][:count]
        return Moments(count, patches.sum(axis=0), patches.T @ patches, len(audio),
                       float(audio.sum()), float(np.square(audio).sum()))  # fmt: skip

    def shift_scale(self, moments: Moments) -> tuple[np.ndarray, np.ndarray]:
        """float32 (channels,) shift and scale: (conv - shift) * scale is the normalised conv."""
        frames = max(moments.frames, 1)
        mean = self.weight @ moments.patch_sum / frames
        square = np.einsum("ck,kj,cj->c", self.weight, moments.gram, self.weight) / frames
        variance = np.maximum(square - mean**2, 0.0)
        eps = self.eps
        if self.input_normalised:
            # The checkpoint scales its input to unit variance (+1e-7) before the conv; the
            # conv's variance here is on raw audio, so the epsilon scales with the audio's.
            samples = max(moments.samples, 1)
            audio_variance = moments.square_sum / samples - (moments.sample_sum / samples) ** 2
            eps *= audio_variance + 1e-7
        scale = 1.0 / np.sqrt(variance + eps)
        return mean.astype(np.float32), scale.astype(np.float32)

    def over(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shift and scale over `audio` alone: what the checkpoint does to it."""
        return self.shift_scale(self.moments(audio))

    def window(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(batch, channels) shift and scale of each row over itself."""
        return stack([self.over(row) for row in batch])


def stack(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (shift, scale) -> the (batch, channels) inputs of the encoder."""
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


class StreamNorm:
    """Each stream's moments over its last `horizon` samples, for `stream` normalisation.

    A window adds the moments of its new audio (from its chunk's start) when the stream's
    history reaches exactly there; the same window again (a retried batch) first takes back
    what it added, so it gets the same statistics; otherwise (the stream's first window, a
    resumed session, an evicted stream, a gap) the history starts again from the whole window.
    At most `max_streams` streams are kept, least recently used first out."""

    def __init__(self, norm: FirstConvNorm, horizon: int, max_streams: int = 256) -> None:
        self.norm = norm
        self.horizon = horizon
        # Per stream: (start, end, moments) of the new audio of each window within the horizon.
        self._streams: StreamTable[deque[tuple[int, int, Moments]]] = StreamTable(max_streams)

    def __len__(self) -> int:
        return len(self._streams)

    def for_window(
        self, stream: str, audio: np.ndarray, audio_start: int, chunk_start: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Shift and scale for a window of `stream` starting at stream sample `audio_start`
        whose chunk starts `chunk_start` samples into it."""
        new_from, end = audio_start + chunk_start, audio_start + len(audio)
        spans = self._streams.setdefault(stream, deque)
        while spans and spans[-1][0] >= new_from:
            spans.pop()  # this window (or a later one) seen before: a retry or a replay
        if not spans or spans[-1][1] != new_from:
            spans.clear()  # no history that reaches this window: start from all of it
            new_from = audio_start
        spans.append((new_from, end, self.norm.moments(audio[new_from - audio_start :])))
        while len(spans) > 1 and spans[0][1] <= end - self.horizon:
            spans.popleft()  # it ended before the horizon
        total = spans[0][2]
        for _, _, moments in list(spans)[1:]:
            total = total + moments
        return self.norm.shift_scale(total)

    def forget(self, stream: str) -> None:
        self._streams.forget(stream)
