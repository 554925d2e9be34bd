"""Which wav2vec2 frames belong to which chunk.

The conv feature encoder turns N samples into floor((N - 400) / 320) + 1 frames: frame j of a
window covers window samples [320 j, 320 j + 400). A frame belongs to the chunk that holds its
LAST sample. With windows starting on the 320-sample grid, consecutive chunks then emit
consecutive frames with no overlap and no gap, every frame's receptive field lies inside its own
window (no look-ahead needed), and a stream analysed chunk by chunk yields exactly the frames
of the whole utterance analysed at once, provided each window has at least one frame (320
samples) of left context: a frame straddling a chunk boundary is computed by the next window.
"""

from __future__ import annotations

from dataclasses import dataclass

STRIDE = 320  # samples per frame at 16 kHz (20 ms): the product of the conv strides
RECEPTIVE_FIELD = 400  # samples one frame sees (25 ms)
MIN_LEFT_CONTEXT = STRIDE  # one frame, on the grid


@dataclass(frozen=True)
class FrameSpan:
    first: int  # index of the chunk's first frame within the window's frames
    count: int  # frames that belong to the chunk (may be 0 for a very short last chunk)


def frames_in_window(samples: int, stride: int = STRIDE, field: int = RECEPTIVE_FIELD) -> int:
    """Frames the encoder yields for a window of `samples` samples."""
    return 0 if samples < field else (samples - field) // stride + 1


def frame_samples(samples: int, stride: int = STRIDE, field: int = RECEPTIVE_FIELD) -> int:
    """The samples of a window's whole frames: samples after the last frame's end feed no frame."""
    return 0 if samples < field else field + (samples - field) // stride * stride


def chunk_frames(
    window_samples: int,
    chunk_start: int,
    chunk_end: int,
    stride: int = STRIDE,
    field: int = RECEPTIVE_FIELD,
) -> FrameSpan:
    """The window frames whose last sample lies in [chunk_start, chunk_end) of the window."""
    # last sample of frame j: stride*j + field - 1; first j with that >= chunk_start:
    first = max(0, -(-(chunk_start - field + 1) // stride))
    last_exclusive = min(
        frames_in_window(window_samples, stride, field),
        max(0, (chunk_end - field) // stride + 1),
    )
    return FrameSpan(first, max(0, last_exclusive - first))
