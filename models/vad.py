"""Silero VAD run directly from its ONNX file: batched across streams, stateful per stream.

The silero-vad wheel ships the trained model as ONNX; we load that file with onnxruntime and
never import the package's Python modules, which would pull in torch.

Silero is a recurrent model meant to run once over a stream, frame after frame. Until issue 21
every window was analysed from zero state over its left context and chunk (62 frames per 1 s +
1 s window), so each frame ran twice and the VAD cost as much as a share of the server's
capacity. `StreamingVad` keeps per stream what the model carries from frame to frame (the
recurrent state, the 64-sample context, the index of the next frame), on the stream's own
512-sample grid, so each window runs only the frames no earlier window ran (about 31 per 1 s
chunk). A window the stream's state does not continue (the stream's first, a session resumed
here from another server, a stream evicted from the LRU, a gap, a replay) starts from zero state
at its first whole grid frame, warmed up by the left context as before. Results depend only on
the stream's own audio and chunking (a replay from the start gives the same results): rows of a
batch have independent states, so windows of different sessions can share one batch.
Windows without a stream are analysed as before: from zero state, from their first sample.
"""

from __future__ import annotations

import importlib.resources
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.base import ANALYSIS_SAMPLE_RATE
from models.stream_table import StreamTable

try:
    import onnxruntime as ort
except ImportError as exc:  # neither extra installed
    raise ImportError(
        "ONNX Runtime is not installed: pip install 'grym-stream[cpu]' "
        "(or 'grym-stream[gpu]' on a CUDA machine)"
    ) from exc

FRAME_SAMPLES = 512  # the model's step at 16 kHz (32 ms)
CONTEXT_SAMPLES = 64  # tail of the previous frame the model sees before each frame
STATE_SHAPE = (2, 128)  # recurrent state per signal: (2, batch, 128) once batched
# Probabilities kept per stream for chunks that start in frames an earlier window ran: the
# frame straddling two chunks (look-ahead), or the whole chunk when a batch is retried.
HISTORY_FRAMES = 256


def bundled_model_path() -> str:
    """Path of the ONNX model inside the installed silero-vad wheel."""
    resource = importlib.resources.files("silero_vad").joinpath("data/silero_vad.onnx")
    return str(resource)


@dataclass(frozen=True)
class VadRow:
    """One row of a batch: samples (only whole frames are run), the recurrent state (2, 128)
    and the 64-sample context to start from; None: zeros."""

    samples: np.ndarray
    state: np.ndarray | None = None
    context: np.ndarray | None = None


@dataclass(frozen=True)
class VadRun:
    """A row's probability per whole frame, and its state and context after its last frame."""

    probabilities: np.ndarray
    state: np.ndarray
    context: np.ndarray


class SileroVad:
    """Per-frame speech probabilities for 16 kHz float32 audio.

    Only whole 512-sample frames are analysed: the `len(signal) % 512` samples after the last
    whole frame are not seen by the model.
    """

    def __init__(self, model_path: str | None = None) -> None:
        options = ort.SessionOptions()
        # One thread each: the engine runs analysers in its own executor and scales by batching,
        # not by letting onnxruntime spin up a thread pool per call.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            model_path or bundled_model_path(),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        self._sample_rate = np.array(ANALYSIS_SAMPLE_RATE, dtype=np.int64)

    def run(self, rows: Sequence[VadRow]) -> list[VadRun]:
        """Run rows of any lengths as one batch, stepping through the frames together.

        Rows are ordered longest first and a row leaves the batch after its own last frame, so
        the steps past it cost nothing and its state is the one after that frame. Rows never mix:
        a row's results do not depend on the others' audio (the model's batch rows are
        independent; onnxruntime gives the same bits for a row at any batch size here).
        """
        counts = np.array([len(row.samples) // FRAME_SAMPLES for row in rows], dtype=np.int64)
        order = np.argsort(-counts, kind="stable")
        batch_size, longest = len(rows), int(counts.max(initial=0))
        frames = np.zeros((batch_size, longest * FRAME_SAMPLES), dtype=np.float32)
        state = np.zeros((STATE_SHAPE[0], batch_size, STATE_SHAPE[1]), dtype=np.float32)
        model_input = np.zeros((batch_size, CONTEXT_SAMPLES + FRAME_SAMPLES), dtype=np.float32)
        for slot, index in enumerate(order):
            row, length = rows[index], counts[index] * FRAME_SAMPLES
            frames[slot, :length] = row.samples[:length]
            if row.state is not None:
                state[:, slot] = row.state
            if row.context is not None:
                model_input[slot, :CONTEXT_SAMPLES] = row.context
        probabilities = np.zeros((batch_size, longest), dtype=np.float32)
        for frame in range(longest):
            active = int(np.count_nonzero(counts > frame))
            start = frame * FRAME_SAMPLES
            model_input[:active, CONTEXT_SAMPLES:] = frames[:active, start : start + FRAME_SAMPLES]
            output, state[:, :active] = self._session.run(
                None,
                {
                    "input": model_input[:active],
                    "state": np.ascontiguousarray(state[:, :active]),
                    "sr": self._sample_rate,
                },
            )
            probabilities[:active, frame] = output[:, 0]
            # The context of the next frame is the last 64 samples of this one.
            model_input[:active, :CONTEXT_SAMPLES] = model_input[:active, -CONTEXT_SAMPLES:]
        runs: list[VadRun] = [None] * batch_size  # type: ignore[list-item]
        for slot, index in enumerate(order):
            runs[index] = VadRun(
                probabilities[slot, : counts[index]].copy(),
                state[:, slot].copy(),
                model_input[slot, :CONTEXT_SAMPLES].copy(),
            )
        return runs

    def probabilities(self, signals: Sequence[np.ndarray]) -> np.ndarray:
        """Speech probability per whole frame of signals of equal length, each from zero state
        and zero context: shape (len(signals), n_frames)."""
        if len({len(signal) for signal in signals}) > 1:
            raise ValueError("probabilities() needs signals of equal length; use run()")
        runs = self.run([VadRow(np.asarray(signal, dtype=np.float32)) for signal in signals])
        n_frames = len(signals[0]) // FRAME_SAMPLES if signals else 0
        return np.array([run.probabilities for run in runs], np.float32).reshape(-1, n_frames)


@dataclass(frozen=True)
class VadRequest:
    """One window for `StreamingVad`: its audio, where audio[0] lies in the stream, its chunk
    (indices into `audio`) and its stream ("" = anonymous: no state, the grid starts at
    audio[0])."""

    stream: str
    audio_start: int
    audio: np.ndarray
    chunk_start: int
    chunk_end: int


@dataclass(frozen=True)
class VadFrames:
    """Probabilities of grid frames first_frame, first_frame + 1, ...; frame j covers samples
    [512 j, 512 j + 512) of the grid, whose sample `origin` is audio[0] of the window."""

    origin: int
    first_frame: int
    probabilities: np.ndarray

    def of_samples(self, start: int, end: int) -> np.ndarray:
        """Probability of each window sample in [start, end): its frame's, or the nearest
        frame's for samples before the first or past the last frame (needs a frame)."""
        frames = (np.arange(start, end) + self.origin) // FRAME_SAMPLES - self.first_frame
        return self.probabilities[np.clip(frames, 0, len(self.probabilities) - 1)]


@dataclass(frozen=True)
class _Stream:
    """What a stream carries to its next window (all positions on the stream's grid)."""

    next_frame: int  # the first frame not yet run
    state: np.ndarray | None  # recurrent state after frame next_frame - 1 (None: zeros)
    context: np.ndarray | None  # the 64 samples before next_frame (None: zeros)
    seen_end: int  # one past the last sample seen
    seen: np.ndarray  # the samples before seen_end from next_frame * 512 - 64 on (or fewer)
    first_frame: int  # the frame of probabilities[0]
    probabilities: np.ndarray  # frames [first_frame, next_frame), the last HISTORY_FRAMES


class StreamingVad:
    """SileroVad over windows of many streams, carrying each stream's state across its windows.

    At most `max_streams` streams are kept, least recently used first out; `release` drops one.
    Thread-safe (models/stream_table.py); the model runs outside any lock.
    """

    def __init__(self, vad: SileroVad, max_streams: int = 256) -> None:
        self.vad = vad
        self._streams: StreamTable[_Stream] = StreamTable(max_streams)
        self._counter_lock = threading.Lock()
        self.frames_run = 0  # model steps taken, summed over rows (for tests and benchmarks)

    def __len__(self) -> int:
        return len(self._streams)

    def release(self, stream: str) -> None:
        self._streams.forget(stream)

    def analyse(self, requests: Sequence[VadRequest]) -> list[VadFrames]:
        """The frames covering each request's chunk, in order. A stream's windows in one batch
        run one after another (in order), different streams' side by side."""
        results: list[VadFrames] = [VadFrames(0, 0, np.zeros(0, np.float32))] * len(requests)
        passes: list[list[int]] = []  # each stream at most once per pass
        seen: dict[str, int] = {}
        for index, request in enumerate(requests):
            if request.chunk_end <= request.chunk_start:
                continue  # an empty chunk needs no frame and changes no state
            depth = seen.get(request.stream, -1) + 1 if request.stream else 0
            if request.stream:
                seen[request.stream] = depth
            if depth == len(passes):
                passes.append([])
            passes[depth].append(index)
        for indices in passes:
            for index, frames in zip(indices, self._run([requests[i] for i in indices])):
                results[index] = frames
        return results

    def _run(self, requests: Sequence[VadRequest]) -> list[VadFrames]:
        plans = [self._plan(request) for request in requests]
        runs = self.vad.run(
            [
                VadRow(
                    known[stream.next_frame * FRAME_SAMPLES - start :], stream.state, stream.context
                )
                for stream, known, start in plans
            ]
        )
        results = []
        for request, (stream, known, known_start), run in zip(requests, plans, runs):
            kept = np.concatenate([stream.probabilities, run.probabilities])
            origin = request.audio_start if request.stream else 0
            results.append(VadFrames(origin, stream.first_frame, kept))
            if request.stream:
                self._store(request.stream, stream, known, known_start, run, kept)
        with self._counter_lock:
            self.frames_run += sum(len(run.probabilities) for run in runs)
        return results

    def _plan(self, request: VadRequest) -> tuple[_Stream, np.ndarray, int]:
        """The stream's state to go on from (a fresh one where it cannot), and the samples
        known from its next frame (or the window's start, if later) on, with their position."""
        start = request.audio_start if request.stream else 0
        chunk_last = start + request.chunk_end - 1
        # Silero is causal: nothing after the frame holding the chunk's last sample is needed.
        end = min(start + len(request.audio), (chunk_last // FRAME_SAMPLES + 1) * FRAME_SAMPLES)
        audio = request.audio[: end - start]
        stream = self._streams.get(request.stream) if request.stream else None
        if stream is not None and _continues(stream, start, audio, start + request.chunk_start):
            buffer_start = stream.next_frame * FRAME_SAMPLES
            if buffer_start < start:  # the window begins inside the next frame: seen before
                seen_start = stream.seen_end - len(stream.seen)
                pending = stream.seen[buffer_start - seen_start : start - seen_start]
                return stream, np.concatenate([pending, audio]), buffer_start
            return stream, audio, start
        first = -(-start // FRAME_SAMPLES)
        empty = np.zeros(0, np.float32)
        return _Stream(first, None, None, start, empty, first, empty), audio, start

    def _store(
        self,
        name: str,
        stream: _Stream,
        known: np.ndarray,
        known_start: int,
        run: VadRun,
        kept: np.ndarray,
    ) -> None:
        next_frame = stream.next_frame + len(run.probabilities)
        seen_end = known_start + len(known)
        seen_from = min(max(next_frame * FRAME_SAMPLES - CONTEXT_SAMPLES, known_start), seen_end)
        dropped = max(0, len(kept) - HISTORY_FRAMES)
        ran = len(run.probabilities) > 0
        kept_stream = _Stream(
            next_frame,
            run.state if ran else stream.state,
            run.context if ran else stream.context,
            seen_end,
            known[seen_from - known_start :].copy(),
            stream.first_frame + dropped,
            kept[dropped:],
        )
        self._streams.put(name, kept_stream)


def _continues(stream: _Stream, start: int, audio: np.ndarray, chunk_first: int) -> bool:
    """Whether a window (audio from grid sample `start`) goes on from the stream's state: it
    reaches back to the last sample seen, not behind it, agrees with the samples kept, and its
    chunk starts in no frame older than the probabilities kept."""
    end = start + len(audio)
    if not start <= stream.seen_end <= end or chunk_first // FRAME_SAMPLES < stream.first_frame:
        return False
    overlap = min(len(stream.seen), stream.seen_end - start)
    window = audio[stream.seen_end - start - overlap : stream.seen_end - start]
    return bool(np.array_equal(stream.seen[len(stream.seen) - overlap :], window))
