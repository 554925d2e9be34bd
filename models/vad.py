"""Silero VAD run directly from its ONNX file, batched across windows.

The silero-vad wheel ships the trained model as ONNX; we load that file with onnxruntime and
never import the package's Python modules, which would pull in torch.

Every signal is analysed on its own, from a zero state and a zero context: a result depends
only on the samples it was given. That makes replays deterministic and lets the engine put
windows from different sessions into one batch.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence

import numpy as np

from models.base import ANALYSIS_SAMPLE_RATE

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


def bundled_model_path() -> str:
    """Path of the ONNX model inside the installed silero-vad wheel."""
    resource = importlib.resources.files("silero_vad").joinpath("data/silero_vad.onnx")
    return str(resource)


class SileroVad:
    """Per-frame speech probabilities for 16 kHz float32 audio.

    Only whole 512-sample frames are analysed: the `len(signal) % 512` samples after the last
    whole frame are not seen by the model. Callers that map frames back to samples should give
    those tail samples the last frame's probability (see `frame_index_of_samples`).
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

    def probabilities(self, signals: Sequence[np.ndarray]) -> np.ndarray:
        """Speech probability per whole frame, shape (len(signals), n_frames).

        All signals must have the same length; they run as one batch, stepping through the
        frames together. A signal shorter than one frame yields zero columns.
        """
        if not signals:
            return np.zeros((0, 0), dtype=np.float32)
        length = len(signals[0])
        if any(len(signal) != length for signal in signals):
            raise ValueError("probabilities() needs signals of equal length; use grouped")
        batch = np.stack([np.asarray(signal, dtype=np.float32) for signal in signals])
        n_frames = length // FRAME_SAMPLES
        batch_size = batch.shape[0]
        probabilities = np.empty((batch_size, n_frames), dtype=np.float32)
        state = np.zeros((STATE_SHAPE[0], batch_size, STATE_SHAPE[1]), dtype=np.float32)
        model_input = np.zeros((batch_size, CONTEXT_SAMPLES + FRAME_SAMPLES), dtype=np.float32)
        for frame in range(n_frames):
            start = frame * FRAME_SAMPLES
            # The context is the last 64 samples of the previous frame (zeros before the first).
            model_input[:, :CONTEXT_SAMPLES] = model_input[:, -CONTEXT_SAMPLES:]
            model_input[:, CONTEXT_SAMPLES:] = batch[:, start : start + FRAME_SAMPLES]
            output, state = self._session.run(
                None, {"input": model_input, "state": state, "sr": self._sample_rate}
            )
            probabilities[:, frame] = output[:, 0]
        return probabilities

    def grouped(self, signals: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per-frame probabilities for signals of any lengths, one 1-D array per signal.

        Signals are grouped by length and each group runs as one batch.
        """
        results: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(signals)
        by_length: dict[int, list[int]] = {}
        for index, signal in enumerate(signals):
            by_length.setdefault(len(signal), []).append(index)
        for indices in by_length.values():
            group = self.probabilities([signals[i] for i in indices])
            for row, index in enumerate(indices):
                results[index] = group[row]
        return results


def frame_index_of_samples(start: int, end: int, n_frames: int) -> np.ndarray:
    """Index of the frame that covers each sample in [start, end).

    Samples past the last whole frame map to the last frame. Needs n_frames >= 1.
    """
    return np.minimum(np.arange(start, end) // FRAME_SAMPLES, n_frames - 1)
