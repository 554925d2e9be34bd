"""A session's options: its `start.config` over the server's defaults, in samples on the frame
grid; and where a session restored from storage goes on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from models.frames import STRIDE as GRID  # samples: the 20 ms frame grid of the analysis rate
from stream.core.audio.turns import TurnSettings
from stream.protocol import ANALYSIS_SAMPLE_RATE, SessionConfig, TurnDetection
from stream.settings import Settings

if TYPE_CHECKING:
    from stream.session.steps import KeptContext

T = TypeVar("T")


@dataclass(frozen=True)
class SessionOptions:
    """A session's effective options: its `start.config` over the server's defaults."""

    chunk: int  # samples at the analysis rate, on the 20 ms grid
    left_context: int  # likewise, at least what the models need
    lookahead: int
    when_behind: str
    embeddings: bool
    timing: bool
    ctc_decoder: str  # asked for (auto, greedy, beam); ready says what it became
    turns: TurnSettings | None  # end of speech; None: utterances end with the stream only

    @classmethod
    def resolve(cls, config: SessionConfig, settings: Settings, min_left: int) -> SessionOptions:
        def samples(seconds: float, grid: int = 1) -> int:
            return round(seconds * ANALYSIS_SAMPLE_RATE / grid) * grid

        # Chunks and context sit on the 20 ms frame grid so wav2vec2 frames tile across chunks.
        chunk = _or(config.chunk_seconds, settings.chunk_seconds)
        left = _or(config.left_context_seconds, settings.left_context_seconds)
        return cls(
            chunk=max(GRID, samples(chunk, GRID)),
            left_context=max(min_left, samples(left, GRID)),
            lookahead=samples(_or(config.lookahead_seconds, settings.lookahead_seconds)),
            when_behind=_or(config.when_behind, settings.when_behind),
            embeddings=_or(config.embeddings, False),
            timing=_or(config.timing, False),
            ctc_decoder=_or(config.ctc_decoder, settings.ctc_decoder),
            turns=turn_settings(config.turn_detection, settings),
        )

    def describe(self) -> dict[str, Any]:
        """The options as `ready` reports them, in seconds."""
        return {
            "chunk_seconds": self.chunk / ANALYSIS_SAMPLE_RATE,
            "left_context_seconds": self.left_context / ANALYSIS_SAMPLE_RATE,
            "lookahead_seconds": self.lookahead / ANALYSIS_SAMPLE_RATE,
            "when_behind": self.when_behind,
            "embeddings": self.embeddings,
            "timing": self.timing,
            "turn_detection": (
                dataclasses.asdict(self.turns) if self.turns else {"enabled": False}
            ),
        }


def turn_settings(asked: TurnDetection | None, settings: Settings) -> TurnSettings | None:
    """A session's end-of-speech settings: what it asked for over the server's."""
    asked = asked or TurnDetection()
    if not asked.enabled:
        return None
    return TurnSettings(
        threshold=_or(asked.threshold, settings.vad_threshold),
        min_speech_ms=_or(asked.min_speech_ms, settings.vad_min_speech_ms),
        min_silence_ms=_or(asked.min_silence_ms, settings.vad_min_silence_ms),
        prefix_padding_ms=_or(asked.prefix_padding_ms, settings.vad_prefix_padding_ms),
    )


def _or(asked: T | None, default: T) -> T:
    """What `start.config` asked for; None: the server's default."""
    return default if asked is None else asked


@dataclass(frozen=True)
class Restored:
    """Where a session read back from storage (after a restart, or from another front-end)
    goes on."""

    next_chunk: int  # the index of the first chunk to cut: the one after the last kept
    chunks: int  # chunks analysed before
    last_event: int  # the last event number sent or kept: new events are numbered after it
    generations: int  # generations made before: new ones are numbered after them
    # The kept events after the client's last one, numbered, to send again first.
    replay: tuple[dict[str, Any], ...] = ()
    # The rolling context it had when it moved (None: it starts afresh where it goes on).
    context: KeptContext | None = None
