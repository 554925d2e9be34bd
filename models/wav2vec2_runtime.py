"""wav2vec2 on ONNX Runtime: the analyser the server runs (export lives in models/export.py).

Windows of equal length run as one batch (wav2vec2-base normalises conv features over the whole
window, so padding windows of other lengths into a batch would change their results). Each
window yields the frames of its chunk only (models/frames.py), so chunks tile the frame grid:
CTC token ids per frame (stitched into text per session by stream/core/transcript.py), a
mean-pooled embedding, and for classification checkpoints the top labels of the window.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.base import AnalysisWindow
from models.frames import MIN_LEFT_CONTEXT, RECEPTIVE_FIELD, STRIDE, chunk_frames

log = logging.getLogger(__name__)


def session_options(threads: int = 1) -> ort.SessionOptions:
    """The one place ONNX Runtime sessions are configured (server, verification, benchmarks)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def providers(device: str) -> list[str]:
    """CUDA when asked for or, with `auto`, when onnxruntime-gpu sees a GPU; else the CPU."""
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            "device=cuda, but this onnxruntime has no CUDA provider "
            "(install grym-stream[gpu] on a machine with an NVIDIA GPU)"
        )
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class Wav2Vec2Result:
    model: str
    first_frame: int  # global frame index (20 ms each) of the chunk's first frame
    tokens: list[int] | None  # CTC argmax per frame
    confidence: float | None  # mean of the frames' top CTC probability
    embedding: np.ndarray | None  # mean-pooled last hidden state over the chunk's frames
    labels: list[dict[str, Any]] | None

    def to_event(self) -> dict[str, Any]:
        count = len(self.tokens) if self.tokens is not None else None
        fields: dict[str, Any] = {"model": self.model, "frames": {"start": self.first_frame}}
        if self.tokens is not None:
            fields["frames"]["count"] = count
            fields["ctc_confidence"] = self.confidence
        if self.embedding is not None:
            fields["embedding"] = encode_embedding(self.embedding)
        if self.labels is not None:
            fields["labels"] = self.labels
        event: dict[str, Any] = {"wav2vec2": fields}
        if self.tokens is not None:  # consumed by the session's transcript stitcher
            event["ctc"] = {"first_frame": self.first_frame, "tokens": self.tokens}
        return event


def encode_embedding(vector: np.ndarray) -> dict[str, Any]:
    """float16 little-endian, base64: about 2 KB for 768 dimensions."""
    data = np.asarray(vector, dtype="<f2").tobytes()
    return {
        "dtype": "float16",
        "dim": int(vector.shape[0]),
        "base64": base64.b64encode(data).decode("ascii"),
    }


def decode_embedding(field: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(field["base64"]), dtype="<f2").astype(np.float32)


class Wav2Vec2Analyser:
    name = "wav2vec2"
    sample_rate = 16000
    min_left_context = MIN_LEFT_CONTEXT

    def __init__(
        self, artifact_dir: Path | str, threads: int = 2, device: str = "cpu", top_k: int = 5
    ) -> None:
        artifact_dir = Path(artifact_dir)
        self.meta: dict[str, Any] = json.loads((artifact_dir / "meta.json").read_text())
        self.head: str = self.meta["head"]
        self.trained: bool = bool(self.meta.get("trained", False))
        self.model_label = (
            f"{self.meta.get('preset') or self.meta.get('source')}:{self.meta['variant']}"
        )
        self._normalise = bool(self.meta.get("do_normalize", True))
        self._labels: list[str] | None = self.meta.get("labels")
        self._top_k = top_k
        self.session = ort.InferenceSession(
            str(artifact_dir / "model.onnx"), session_options(threads), providers=providers(device)
        )
        self._outputs = [o.name for o in self.session.get_outputs()]
        # Dynamic int8 quantises activations with one scale per tensor, i.e. per BATCH: batched
        # with a loud session, a quiet one would lose precision and get other results than alone.
        # So int8 runs each window on its own; float variants batch (rows stay independent).
        self.max_batch = 1 if self.meta["variant"] == "int8" else None
        # (tokens, blank id, delimiter) for the session's transcript stitcher; None: not CTC.
        self.ctc_vocabulary = (
            (self.meta["vocab"], self.meta["blank_id"], self.meta.get("word_delimiter", "|"))
            if self.head == "ctc"
            else None
        )

    def analyse(self, windows: Sequence[AnalysisWindow]) -> list[Wav2Vec2Result]:
        by_length: dict[int, list[int]] = {}
        for index, window in enumerate(windows):
            by_length.setdefault(len(window.audio), []).append(index)
        results: list[Wav2Vec2Result | None] = [None] * len(windows)
        step = self.max_batch or len(windows)
        for length, same_length in by_length.items():
            for start in range(0, len(same_length), step):
                indices = same_length[start : start + step]
                group = [windows[i] for i in indices]
                outputs = (
                    self.run_batch(np.stack([w.audio for w in group]))
                    if length >= RECEPTIVE_FIELD
                    else None
                )
                for row, (index, window) in enumerate(zip(indices, group)):
                    results[index] = self._result(window, outputs, row)
        return results  # type: ignore[return-value]

    def run_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs (hidden, logits, class_logits) for equal-length windows (B, N)."""
        batch = batch.astype(np.float32)
        if self._normalise:  # what the checkpoint's feature extractor does, per window
            mean = batch.mean(axis=1, keepdims=True)
            std = np.sqrt(batch.var(axis=1, keepdims=True) + 1e-7)
            batch = (batch - mean) / std
        return dict(zip(self._outputs, self.session.run(None, {"audio": batch})))

    def _result(
        self, window: AnalysisWindow, outputs: dict[str, np.ndarray] | None, row: int
    ) -> Wav2Vec2Result:
        span = chunk_frames(len(window.audio), window.chunk_start, window.chunk_end)
        first = window.audio_start // STRIDE + span.first
        frames = slice(span.first, span.first + span.count)
        tokens: list[int] | None = [] if self.head == "ctc" else None
        confidence = embedding = labels = None
        if outputs is not None and span.count:
            embedding = outputs["hidden"][row, frames].mean(axis=0)
            if "logits" in outputs:
                logits = outputs["logits"][row, frames]
                tokens = logits.argmax(axis=-1).tolist()
                confidence = round(float(_softmax(logits).max(axis=-1).mean()), 4)
        elif self.head == "ctc":
            tokens = []
        if outputs is not None and "class_logits" in outputs:
            labels = self._top_labels(outputs["class_logits"][row])
        return Wav2Vec2Result(self.model_label, first, tokens, confidence, embedding, labels)

    def _top_labels(self, logits: np.ndarray) -> list[dict[str, Any]]:
        scores = _softmax(logits)
        order = np.argsort(-scores)[: self._top_k]
        names = self._labels or [str(i) for i in range(len(scores))]
        return [{"label": names[i], "score": round(float(scores[i]), 4)} for i in order]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
