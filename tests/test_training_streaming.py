"""The server's streamed path emulated in PyTorch (models/training/streaming.py): the frames tile
the utterance, batching and padding change nothing, and the loss matches Wav2Vec2ForCTC's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2ForCTC

from models.frames import frames_in_window
from models.training.streaming import (
    Streaming,
    stream_windows,
    streamed_ctc_loss,
    streamed_logits,
)
from models.training.train import model_config, shift_phase
from models.wav2vec2_runtime import normalise


@pytest.fixture(scope="module")
def model() -> Wav2Vec2ForCTC:
    torch.manual_seed(0)
    return Wav2Vec2ForCTC(model_config()).eval()


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    tone = np.sin(2 * np.pi * (150 + 100 * t) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * tone + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.mark.parametrize("samples", [399, 400, 16_000, 16_319, 40_000, 52_123])
@pytest.mark.parametrize("streaming", [Streaming(), Streaming(8_000, 8_000), Streaming(16_000, 0)])
def test_chunk_frames_tile_the_whole_utterance(samples: int, streaming: Streaming) -> None:
    pieces = stream_windows(np.zeros(samples, np.float32), streaming)
    if streaming.context == 0 and samples > streaming.chunk:
        # Without context a frame straddling a chunk boundary belongs to no window: lost frames,
        # the reason the server requires at least one frame of context (models/frames.py).
        assert sum(p.count for p in pieces) < frames_in_window(samples)
    else:
        assert sum(p.count for p in pieces) == frames_in_window(samples)
    for piece in pieces:
        assert len(piece.audio) <= streaming.context + streaming.chunk
        assert piece.first + piece.count <= frames_in_window(len(piece.audio))


def test_batched_windows_equal_each_window_alone(model: Wav2Vec2ForCTC) -> None:
    clips = [_clip(3.3, 1), _clip(1.7, 2), _clip(0.6, 3)]
    with torch.no_grad():
        padded, lengths = streamed_logits(model, clips)
        for row, clip in enumerate(clips):
            alone = [
                model(torch.from_numpy(normalise(p.audio))[None]).logits[
                    0, p.first : p.first + p.count
                ]
                for p in stream_windows(clip)
            ]
            expected = torch.cat(alone)
            assert int(lengths[row]) == len(expected) == frames_in_window(len(clip))
            torch.testing.assert_close(padded[row, : len(expected)], expected, atol=2e-4, rtol=0)


def test_one_window_is_the_whole_utterance(model: Wav2Vec2ForCTC) -> None:
    clip = _clip(2.0, 4)
    wide = Streaming(chunk=len(clip), context=0)
    with torch.no_grad():
        padded, _ = streamed_logits(model, [clip], wide)
        whole = model(torch.from_numpy(normalise(clip))[None]).logits[0]
    torch.testing.assert_close(padded[0], whole, atol=1e-5, rtol=0)


def test_streamed_loss_matches_the_model_loss_and_trains(model: Wav2Vec2ForCTC) -> None:
    clips = [_clip(2.0, 5), _clip(1.5, 6)]
    labels = [[5, 6, 7, 4, 8], [9, 10, 4, 11]]
    wide = Streaming(chunk=32_000, context=0)
    n = max(len(c) for c in clips)
    audio = np.zeros((2, n), np.float32)
    mask = np.zeros((2, n), np.int64)
    for row, clip in enumerate(clips):
        audio[row, : len(clip)], mask[row, : len(clip)] = normalise(clip), 1
    target = torch.full((2, 5), -100)
    for row, label in enumerate(labels):
        target[row, : len(label)] = torch.tensor(label)
    with torch.no_grad():
        reference = model(
            input_values=torch.from_numpy(audio),
            attention_mask=torch.from_numpy(mask),
            labels=target,
        ).loss
        ours = streamed_ctc_loss(model, clips, labels, wide)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)

    # The streamed loss (several windows per clip) is differentiable end to end.
    loss = streamed_ctc_loss(model, clips, labels)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_phase_shift_lands_on_the_frame_grid() -> None:
    rng = np.random.default_rng(0)
    clip = _clip(1.0, 7)
    leads = {len(shift_phase(clip, 16_000, rng)) - len(clip) for _ in range(50)}
    assert len(leads) > 10 and all(lead % 320 == 0 and 0 <= lead < 16_000 for lead in leads)
