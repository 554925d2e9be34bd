"""wav2vec2 on ONNX Runtime: the analyser the server runs (export lives in models/export.py).

Each window runs through the artifact's two graphs: the conv encoder (with a per-stream feature
cache, only over the frames no earlier window computed) and the transformer over all its frames.
Windows of equal length run as one batch (wav2vec2-base normalises conv features over the whole
window, so padding windows of other lengths into a batch would change their results). Each
window yields the frames of its chunk only (models/frames.py), so chunks tile the frame grid:
CTC token ids per frame (stitched into text per session by stream/core/text/transcript.py), a
mean-pooled embedding, and for classification checkpoints the top labels of the window.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.base import (
    ANALYSIS_SAMPLE_RATE,
    Analyser,
    AnalyserInfo,
    AnalysisResult,
    AnalysisWindow,
    CtcFrames,
    CtcTokens,
    FrameCounts,
    encode_embedding,
)
from models.char_lm import LanguageModelFolder
from models.conv_norm import FirstConvNorm, StreamNorm
from models.conv_norm import stack as stack_norms
from models.export import INT8_ENCODER
from models.feature_cache import FeatureCache
from models.frames import (
    MIN_LEFT_CONTEXT,
    RECEPTIVE_FIELD,
    STRIDE,
    chunk_frames,
    frame_samples,
    frames_in_window,
)

log = logging.getLogger(__name__)


def session_options(threads: int = 1) -> ort.SessionOptions:
    """The one place ONNX Runtime sessions are configured (server, verification, benchmarks)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ONNX Runtime's idle intra-op threads spin for a while after each run. Each session has its
    # own pool, so the transformer's run right after the encoder's shared the cores with the
    # encoder pool's spinning threads: 99 ms instead of 50 for base int8 on 2 cores (measured).
    # Spinning also takes CPU from the event loop and the other engines between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
class Wav2Vec2Result(AnalysisResult):
    model: str
    first_frame: int  # global frame index (20 ms each) of the chunk's first frame
    tokens: list[int] | None  # CTC argmax per frame
    log_probs: np.ndarray | None  # CTC (frames, vocabulary) log-probabilities, for beam search
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
        return {"wav2vec2": fields}

    @property
    def ctc(self) -> CtcFrames | None:
        """The frames for the session's transcript stitcher; None without a CTC head."""
        if self.tokens is None:
            return None
        return CtcFrames(self.first_frame, self.tokens, self.log_probs)


class Wav2Vec2Graphs:
    """An artifact's two ONNX graphs: `encoder` (audio -> conv features per frame) and
    `transformer` (features -> hidden + head outputs); `run` chains them. `first_conv` is set
    for "group"-norm checkpoints, whose encoder takes its first layer's normalisation as inputs
    (models/conv_norm.py). `int8_encoder`: the int8 artifact's other encoder graph
    (models/encoder_int8.py) instead of the fp32 one."""

    def __init__(
        self, folder: Path | str, threads: int = 2, device: str = "cpu", int8_encoder: bool = False
    ) -> None:
        folder = Path(folder)
        options, chosen = session_options(threads), providers(device)
        encoder = folder / (INT8_ENCODER if int8_encoder else "encoder.onnx")
        self.encoder = ort.InferenceSession(str(encoder), options, providers=chosen)
        self.transformer = ort.InferenceSession(
            str(folder / "transformer.onnx"), options, providers=chosen
        )
        self.output_names = [o.name for o in self.transformer.get_outputs()]
        self.first_conv = FirstConvNorm.load(folder)

    def encode(
        self, audio: np.ndarray, norm: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """(batch, samples) float32 -> (batch, frames, dim). `norm`: (batch, channels) shift
        and scale for a group-norm encoder; None: each row's own (the checkpoint's behaviour)."""
        inputs = {}
        if self.first_conv is not None:
            shift, scale = norm if norm is not None else self.first_conv.window(audio)
            inputs.update(norm_shift=shift, norm_scale=scale)
        # Samples past the last whole frame feed no frame (once group norm's statistics, which
        # PyTorch takes over all of them, are fixed above); the int8 encoder takes whole frames
        # only.
        inputs["audio"] = audio[:, : frame_samples(audio.shape[1])]
        return self.encoder.run(None, inputs)[0]

    def transform(self, features: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.transformer.run(None, {"features": features})))

    def run(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        return self.transform(self.encode(audio))


@dataclass
class _Plan:
    """One window on its way through the two graphs."""

    window: AnalysisWindow
    audio: np.ndarray  # normalised like the checkpoint's feature extractor does
    frames: int  # frames in the whole window
    first_frame: int | None  # global index of the window's frame 0; None: off the frame grid
    reused: np.ndarray | None  # cached features of the window's first frames
    norm: tuple[np.ndarray, np.ndarray] | None = None  # group norm's shift and scale
    features: np.ndarray | None = None  # all the window's frames, once encoded

    @property
    def encode_from(self) -> int:
        return 0 if self.reused is None else len(self.reused)

    def segment(self) -> np.ndarray:
        """The samples of the frames still to encode (each frame: 400 samples, 320 apart)."""
        k = self.encode_from
        return self.audio[k * STRIDE : (self.frames - 1) * STRIDE + RECEPTIVE_FIELD]


class Wav2Vec2Analyser(Analyser):
    name = "wav2vec2"
    sample_rate = ANALYSIS_SAMPLE_RATE

    def __init__(
        self,
        artifact_dir: Path | str,
        threads: int = 2,
        device: str = "cpu",
        top_k: int = 5,
        feature_cache: bool = False,
        max_streams: int = 256,
        language_model: LanguageModelFolder | None = None,
        norm_seconds: float = 0.0,
        encoder: str = "fp32",
    ) -> None:
        artifact_dir = Path(artifact_dir)
        self.meta: dict[str, Any] = json.loads((artifact_dir / "meta.json").read_text())
        # "int8": the conv encoder with int8 matrix products (economy mode), where the artifact
        # has one (int8 variants of group-norm checkpoints); the fp32 encoder elsewhere.
        int8 = encoder == "int8" and self.has_int8_encoder(artifact_dir)
        self.encoder = "int8" if int8 else "fp32"
        self.head: str = self.meta["head"]
        self.trained: bool = bool(self.meta.get("trained", False))
        self.note: str = self.meta.get("note", "")
        self.model_label = (
            f"{self.meta.get('preset') or self.meta.get('source')}:{self.meta['variant']}"
        )
        self.normalises_input = bool(self.meta.get("do_normalize", True))
        # Which file said so (artifacts made before it was recorded say nothing).
        self.normalise_source: str = self.meta.get("do_normalize_from", "not recorded")
        self._labels: list[str] | None = self.meta.get("labels")
        self._top_k = top_k
        self.graphs = Wav2Vec2Graphs(artifact_dir, threads, device, self.encoder == "int8")
        # Group-norm checkpoints: the first conv layer's normalisation over each stream's last
        # `norm_seconds` instead of over each window (models/conv_norm.py); 0: per window.
        first_conv = self.graphs.first_conv
        self.stream_norm = (
            StreamNorm(first_conv, round(norm_seconds * ANALYSIS_SAMPLE_RATE), max_streams)
            if first_conv is not None and norm_seconds > 0
            else None
        )
        # Per-stream conv features reused by the next overlapping window (models/feature_cache.py).
        # Exact for "layer"-norm checkpoints; with "group" norm a frame's features depend on the
        # statistics they were normalised with: the stream's (above), which drift little from
        # one window to the next, or each window's own, where reuse changes results more
        # (docs/fidelity.md has how much).
        self.feature_cache = FeatureCache(max_streams) if feature_cache else None
        self.frames_windowed = 0  # frames the transformer saw
        self.frames_encoded = 0  # frames the conv encoder computed (fewer with the cache)
        self._counter_lock = threading.Lock()
        # Dynamic int8 quantises activations with one scale per tensor, i.e. per BATCH: batched
        # with a loud session, a quiet one would lose precision and get other results than alone.
        # So int8 runs each window on its own; float variants batch (rows stay independent).
        self.max_batch = 1 if self.meta["variant"] == "int8" else None
        # The vocabulary for the session's transcript stitcher; None: not CTC.
        self.ctc_vocabulary = (
            CtcTokens(
                self.meta["vocab"], self.meta["blank_id"], self.meta.get("word_delimiter", "|")
            )
            if self.head == "ctc"
            else None
        )
        # The checkpoint's character LM (language_model/), for sessions that decode by beam search.
        self.language_model = language_model if self.head == "ctc" else None

    @staticmethod
    def has_int8_encoder(artifact_dir: Path | str) -> bool:
        return (Path(artifact_dir) / INT8_ENCODER).is_file()

    @property
    def info(self) -> AnalyserInfo:
        """The attributes above as the server reads them (models/base.py)."""
        return AnalyserInfo(
            trained=self.trained,
            label=self.model_label,
            note=self.note,
            min_left_context=MIN_LEFT_CONTEXT,
            ctc_vocabulary=self.ctc_vocabulary,
            ctc_log_probs=self.ctc_vocabulary is not None,  # results carry log_probs
            language_model=self.language_model,
            batches=self.max_batch is None,
        )

    def frame_counts(self) -> FrameCounts:
        with self._counter_lock:
            return FrameCounts(self.frames_windowed, self.frames_encoded)

    def release(self, stream: str) -> None:
        """The stream ended: drop its cached features and statistics."""
        if self.feature_cache is not None:
            self.feature_cache.forget(stream)
        if self.stream_norm is not None:
            self.stream_norm.forget(stream)

    def analyse(self, windows: Sequence[AnalysisWindow]) -> list[Wav2Vec2Result]:
        return [self._result(w, out) for w, out in zip(windows, self.window_outputs(windows))]

    def window_outputs(
        self, windows: Sequence[AnalysisWindow]
    ) -> list[dict[str, np.ndarray] | None]:
        """Raw outputs of each window's frames (hidden, logits or class_logits; no batch axis),
        computed as `analyse` does; None for a window too short for one frame."""
        plans = [self._plan(window) for window in windows]
        runnable = [plan for plan in plans if plan.frames > 0]
        self._encode(runnable)
        outputs: dict[int, dict[str, np.ndarray]] = {}
        step = self.max_batch or len(runnable) or 1
        for group in _group_by(runnable, lambda plan: plan.frames):
            for start in range(0, len(group), step):
                batch = group[start : start + step]
                result = self.graphs.transform(np.stack([plan.features for plan in batch]))
                for row, plan in enumerate(batch):
                    outputs[id(plan)] = {name: value[row] for name, value in result.items()}
        with self._counter_lock:
            self.frames_windowed += sum(plan.frames for plan in runnable)
            self.frames_encoded += sum(plan.frames - plan.encode_from for plan in runnable)
        return [outputs.get(id(plan)) for plan in plans]

    def run_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs (hidden, logits, class_logits) for equal-length windows (B, N), whole:
        no feature reuse."""
        return self.graphs.run(self._normalised(batch.astype(np.float32)))

    def _normalised(self, batch: np.ndarray) -> np.ndarray:
        # What the checkpoint's feature extractor does, per window. (Group-norm encoders fold
        # it into their first layer's normalisation: models/conv_norm.py.)
        return (
            normalise(batch) if self.normalises_input and self.graphs.first_conv is None else batch
        )

    def _plan(self, window: AnalysisWindow) -> _Plan:
        audio = self._normalised(np.asarray(window.audio, dtype=np.float32))
        frames = frames_in_window(len(audio))
        on_grid = window.audio_start % STRIDE == 0
        first_frame = window.audio_start // STRIDE if on_grid else None
        reused = norm = None
        stream = getattr(window, "stream", None)
        if self.stream_norm is not None and stream and first_frame is not None and frames:
            start = window.audio_start
            norm = self.stream_norm.for_window(stream, audio, start, window.chunk_start)
        if self.feature_cache is not None and stream and first_frame is not None and frames:
            reused = self.feature_cache.lookup(stream, first_frame, frames)
        return _Plan(window, audio, frames, first_frame, reused, norm)

    def _encode(self, plans: list[_Plan]) -> None:
        """Each plan's features: cached ones plus the encoder's output for the rest, computed in
        batches of equal segment length (rows are independent in the encoder)."""
        todo = [plan for plan in plans if plan.encode_from < plan.frames]
        for group in _group_by(todo, lambda plan: plan.frames - plan.encode_from):
            new = self.graphs.encode(
                np.stack([plan.segment() for plan in group]), self._norms(group)
            )
            for row, plan in enumerate(group):
                plan.features = (
                    new[row] if plan.reused is None else np.concatenate([plan.reused, new[row]])
                )
        for plan in plans:
            if plan.features is None:  # every frame came from the cache
                plan.features = plan.reused
            stream = getattr(plan.window, "stream", None)
            if self.feature_cache is not None and stream and plan.first_frame is not None:
                self.feature_cache.store(stream, plan.first_frame, plan.features)

    def _norms(self, plans: list[_Plan]) -> tuple[np.ndarray, np.ndarray] | None:
        """Group norm's shift and scale per plan: the stream's, else over the whole window
        (not over the segment left to encode)."""
        if self.graphs.first_conv is None:
            return None
        first_conv = self.graphs.first_conv
        return stack_norms([plan.norm or first_conv.over(plan.audio) for plan in plans])

    def _result(
        self, window: AnalysisWindow, outputs: dict[str, np.ndarray] | None
    ) -> Wav2Vec2Result:
        span = chunk_frames(len(window.audio), window.chunk_start, window.chunk_end)
        first = window.audio_start // STRIDE + span.first
        frames = slice(span.first, span.first + span.count)
        tokens: list[int] | None = [] if self.head == "ctc" else None
        confidence = embedding = labels = log_probs = None
        if outputs is not None and span.count:
            embedding = outputs["hidden"][frames].mean(axis=0)
            if "logits" in outputs:
                logits = outputs["logits"][frames]
                tokens = logits.argmax(axis=-1).tolist()
                log_probs = log_softmax(logits)
                confidence = round(float(np.exp(log_probs.max(axis=-1)).mean()), 4)
        if outputs is not None and "class_logits" in outputs:
            labels = self._top_labels(outputs["class_logits"])
        return Wav2Vec2Result(
            self.model_label, first, tokens, log_probs, confidence, embedding, labels
        )

    def _top_labels(self, logits: np.ndarray) -> list[dict[str, Any]]:
        scores = _softmax(logits)
        order = np.argsort(-scores)[: self._top_k]
        names = self._labels or [str(i) for i in range(len(scores))]
        return [{"label": names[i], "score": round(float(scores[i]), 4)} for i in order]


def _group_by(plans: list[_Plan], key: Callable[[_Plan], int]) -> list[list[_Plan]]:
    groups: dict[int, list[_Plan]] = {}
    for plan in plans:
        groups.setdefault(key(plan), []).append(plan)
    return list(groups.values())


def normalise(audio: np.ndarray) -> np.ndarray:
    """Zero mean and unit variance along the last axis (each window, or each row of a batch),
    as wav2vec2 feature extractors with do_normalize do; training uses it too."""
    mean = audio.mean(axis=-1, keepdims=True)
    std = np.sqrt(audio.var(axis=-1, keepdims=True) + 1e-7)
    return ((audio - mean) / std).astype(np.float32, copy=False)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 natural-log probabilities along the last axis (stable: max subtracted first)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
