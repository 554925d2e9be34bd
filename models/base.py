"""The one small interface every analysis model runner implements.

Runners are plain synchronous code: the analysis engine (stream/engines/analysis.py) calls
`analyse` from its own executor thread, never from the event loop. A runner receives a batch of
windows, possibly from several sessions at once, and returns one result per window, in order.

Besides its results, a runner declares what else it offers in its `info` (AnalyserInfo): whether
it is trained, the context it needs, a CTC vocabulary to stitch transcripts with. Runners and
their results subclass `Analyser` and `AnalysisResult` to take the defaults (plain info, no CTC
frames, no frame counts) for what they do not offer.

Here too: the analysis rate, and the encoding of an embedding in an event's fields (written by
runners, read back by the session's timeline).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
    from models.char_lm import LanguageModelFolder

# The one analysis rate: every window a runner sees, and the session's timeline, are mono samples
# at this rate (the server resamples what clients send). stream.protocol announces it to clients
# as `analysis_sample_rate`; the generator's output rate is its own (models.generation).
ANALYSIS_SAMPLE_RATE = 16_000


class AnalysisWindow(Protocol):
    """What a runner sees of one chunk: the audio around it and where the chunk lies in it."""

    @property
    def audio(self) -> np.ndarray:
        """float32 mono samples at the analysis rate: left context + chunk + look-ahead."""

    @property
    def chunk_start(self) -> int:
        """Index into `audio` where the chunk itself begins (= the left context's length)."""

    @property
    def chunk_end(self) -> int:
        """Index into `audio` where the chunk ends (the look-ahead follows)."""

    @property
    def audio_start(self) -> int:
        """Position of audio[0] on the session's timeline, in samples since the start."""

    @property
    def stream(self) -> str:
        """Which stream (session) the window belongs to; "" when anonymous. Runners that keep
        per-stream state key it by this and drop it in `release`."""


class CtcTokens(NamedTuple):
    """A CTC head's vocabulary, as the checkpoint lists it; the session builds its decoder's
    vocabulary from it (stream/core/text/transcript.py, CtcVocabulary.from_tokens)."""

    tokens: Sequence[str]  # token id -> string
    blank_id: int
    word_delimiter: str = "|"


@dataclass(frozen=True)
class CtcFrames:
    """One chunk's CTC output, which the session stitches into its transcript (never sent to
    clients). Frames are the model's 20 ms steps, numbered from the start of the stream."""

    first_frame: int  # global index of the chunk's first frame
    token_ids: Sequence[int]  # the most likely token of each frame
    # (frames, vocabulary) natural-log probabilities, for beam search; None when the analyser
    # gives token ids only (AnalyserInfo.ctc_log_probs is False) or the chunk has no frames.
    log_probs: np.ndarray | None = None


@dataclass(frozen=True)
class FrameCounts:
    """Work a frame-based runner has done so far, for /healthz and the benchmarks."""

    windowed: int  # frames its model saw, left context included
    encoded: int  # frames its feature encoder computed (fewer where features are reused)


@dataclass(frozen=True)
class AnalyserInfo:
    """What an analyser offers besides its fields; the defaults suit a runner offering nothing
    more. Read once, when the server starts its engine."""

    trained: bool = True  # False: random weights (the `tiny-random` preset); clients are told
    label: str | None = None  # the model as `ready` and /healthz name it; None: the analyser's name
    note: str = ""  # a word on the model for clients and the log (a demo model, ...)
    min_left_context: int = 0  # samples at the analysis rate that each chunk needs before it
    ctc_vocabulary: CtcTokens | None = None  # a CTC model: its results carry CtcFrames
    # Its CtcFrames carry each frame's log-probabilities, so sessions may decode them by beam
    # search; without them a session decodes greedily whatever it asks for.
    ctc_log_probs: bool = False
    language_model: LanguageModelFolder | None = None  # the character LM for beam search
    # False: the analyser runs each window alone whatever it is given (batching would change
    # its results), so the engine hands it one window at a time and never waits for a batch.
    batches: bool = True


class AnalysisResult(Protocol):
    def to_event(self) -> dict[str, Any]:
        """JSON-ready fields merged into the `analysis` event of the chunk."""

    @property
    def ctc(self) -> CtcFrames | None:
        """The chunk's CTC frames (models whose info declares a `ctc_vocabulary`); None here."""
        return None


class Analyser(Protocol):
    name: str
    sample_rate: int

    @property
    def info(self) -> AnalyserInfo:
        """What the analyser offers besides its fields; here, nothing more."""
        return AnalyserInfo()

    def analyse(self, windows: Sequence[AnalysisWindow]) -> list[AnalysisResult]:
        """Analyse a batch of windows; one result per window, in the same order."""

    def release(self, stream: str) -> None:
        """The stream ended: forget anything kept for it (a no-op for stateless runners)."""

    def frame_counts(self) -> FrameCounts | None:
        """Frames processed so far; None: not counted (here). /healthz reads it while batches
        run, so it must be thread-safe."""
        return None

    @property
    def available(self) -> bool:
        """False while the analyser cannot run at all (a remote one whose cluster is gone):
        /readyz says 503. Local runners always can."""
        return True

    def close(self) -> None:
        """Let go of what the analyser holds beyond memory (processes, connections); the
        engine calls it once it has stopped."""


def encode_embedding(vector: np.ndarray) -> dict[str, Any]:
    """float16 little-endian, base64: about 2 KB for 768 dimensions."""
    data = np.asarray(vector, dtype="<f2").tobytes()
    return {
        "dtype": "float16",
        "dim": int(vector.shape[0]),
        "base64": base64.b64encode(data).decode("ascii"),
    }


def decode_embedding(field: dict[str, Any]) -> np.ndarray:
    """`encode_embedding`'s output -> the float32 vector."""
    return np.frombuffer(base64.b64decode(field["base64"]), dtype="<f2").astype(np.float32)
