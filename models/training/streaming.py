"""The server's streaming analysis, emulated in PyTorch: for training and offline evaluation.

The server cuts a stream into chunks with left context (stream/core/audio/chunker.py), runs each
window through the model on its own (normalised per window), keeps the frames that belong to the
chunk (models/frames.py) and decodes the concatenation. A model trained only on whole utterances
leans on context the server never gives it: the frames at a chunk's end have no look-ahead, the
ones at its start only the window's context. `streamed_logits` reproduces that path exactly (same
Chunker, same frame spans), batched and differentiable, so training can put a CTC loss on what the
server will decode and evaluation can report streamed CER without a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.frames import chunk_frames
from models.wav2vec2_runtime import normalise
from stream.core.audio.chunker import Chunker


@dataclass(frozen=True)
class Streaming:
    """Chunking as the server does it, in samples at 16 kHz."""

    chunk: int = 16_000
    context: int = 16_000
    lookahead: int = 0


@dataclass(frozen=True)
class WindowPiece:
    audio: np.ndarray  # the window as the model sees it (not yet normalised)
    first: int  # the chunk's first frame within the window's frames
    count: int  # the chunk's frames


def stream_windows(audio: np.ndarray, streaming: Streaming = Streaming()) -> list[WindowPiece]:
    """The windows the server would analyse for `audio` streamed from its first sample, with
    each chunk's frame span; their frames concatenate to the whole utterance's frame count."""
    chunker = Chunker(streaming.chunk, streaming.context, streaming.lookahead)
    windows = chunker.push(np.asarray(audio, np.float32)) + chunker.finish()
    pieces = []
    for w in windows:
        span = chunk_frames(len(w.audio), w.chunk_start, w.chunk_end)
        if span.count:
            pieces.append(WindowPiece(w.audio, span.first, span.count))
    return pieces


def streamed_logits(
    model: torch.nn.Module, clips: Sequence[np.ndarray], streaming: Streaming = Streaming()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of each clip as the server would compute them, chunk by chunk.

    All windows of all clips run as one zero-padded batch (with an attention mask, which for a
    layer-norm wav2vec2 makes padding exact). Returns (B, T, V) logits padded with zeros and
    the (B,) frame counts, T = the longest clip's frame count.
    """
    per_clip = [stream_windows(clip, streaming) for clip in clips]
    pieces = [p for clip_pieces in per_clip for p in clip_pieces]
    longest = max(len(p.audio) for p in pieces)
    audio = np.zeros((len(pieces), longest), np.float32)
    mask = np.zeros((len(pieces), longest), np.int64)
    for row, piece in enumerate(pieces):
        audio[row, : len(piece.audio)] = normalise(piece.audio)
        mask[row, : len(piece.audio)] = 1
    logits = model(
        input_values=torch.from_numpy(audio), attention_mask=torch.from_numpy(mask)
    ).logits
    rows = iter(range(len(pieces)))
    sequences = []
    for clip_pieces in per_clip:
        parts = []
        for piece in clip_pieces:
            parts.append(logits[next(rows), piece.first : piece.first + piece.count])
        sequences.append(torch.cat(parts))
    lengths = torch.tensor([len(s) for s in sequences])
    padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    return padded, lengths


def streamed_ctc_loss(
    model: torch.nn.Module,
    clips: Sequence[np.ndarray],
    labels: Sequence[Sequence[int]],
    streaming: Streaming = Streaming(),
    blank: int = 0,
) -> torch.Tensor:
    """CTC loss of the streamed path against each clip's whole transcript (reduced as
    Wav2Vec2ForCTC does with ctc_loss_reduction="mean")."""
    logits, lengths = streamed_logits(model, clips, streaming)
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)
    targets = torch.tensor([token for label in labels for token in label])
    target_lengths = torch.tensor([len(label) for label in labels])
    return torch.nn.functional.ctc_loss(
        log_probs, targets, lengths, target_lengths, blank=blank, zero_infinity=True
    )
