"""Frame bookkeeping of wav2vec2 chunks, with integers alone."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.frames import STRIDE, chunk_frames, frames_in_window
from stream.core.audio.chunker import Chunker


def test_without_left_context_a_boundary_frame_is_lost() -> None:
    # Two chunks of 640 samples and no context: global frame 1 (samples 320..720) straddles
    # the boundary, so neither window can compute it. Hence the one-frame minimum.
    first = chunk_frames(640, 0, 640)
    second = chunk_frames(640, 0, 640)
    emitted = [first.first + k for k in range(first.count)]
    emitted += [640 // STRIDE + second.first + k for k in range(second.count)]
    assert emitted == [0, 2] and frames_in_window(1280) == 3


def test_frame_count_formula() -> None:
    assert frames_in_window(16000) == 49
    assert frames_in_window(399) == 0 and frames_in_window(400) == 1
    assert frames_in_window(400 + 320) == 2


@settings(max_examples=200, deadline=None)
@given(
    chunk_frames_n=st.integers(1, 120),
    left_frames=st.integers(1, 120),  # at least one frame: the session guarantees it
    lookahead=st.integers(0, 1000),
    total=st.integers(0, 60000),
)
def test_chunks_emit_each_frame_of_the_whole_stream_exactly_once(
    chunk_frames_n: int, left_frames: int, lookahead: int, total: int
) -> None:
    # Chunk and context on the 20 ms grid, as the session rounds them.
    chunker = Chunker(chunk_frames_n * STRIDE, left_frames * STRIDE, lookahead)
    windows = chunker.push(np.zeros(total, np.float32)) + chunker.finish()
    emitted = []
    for w in windows:
        audio_start = w.start - w.chunk_start
        assert audio_start % STRIDE == 0
        span = chunk_frames(len(w.audio), w.chunk_start, w.chunk_end)
        emitted += [audio_start // STRIDE + span.first + k for k in range(span.count)]
    assert emitted == list(range(frames_in_window(total)))
