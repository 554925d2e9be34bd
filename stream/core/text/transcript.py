"""Greedy CTC decoding stitched across chunks, cut into utterances by voice activity.

Each chunk brings the argmax token of each of its frames (frames tile the stream exactly, see
models/frames.py). Repeats collapse and blanks vanish as in whole-utterance greedy decoding;
the last token of the previous chunk is remembered, so a character held across a boundary is
neither doubled nor lost: the stitched text equals the whole utterance's decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

FRAME_SECONDS = 0.02


@dataclass(frozen=True)
class CtcVocabulary:
    tokens: list[str]  # token id -> string
    blank_id: int
    word_delimiter: str = "|"
    # Tokens that never print (sentence markers, unknowns): by default the <...> ones.
    silent: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_tokens(
        cls, tokens: Sequence[str], blank_id: int, delimiter: str = "|"
    ) -> CtcVocabulary:
        silent = frozenset(
            i
            for i, t in enumerate(tokens)
            if i != blank_id and t.startswith("<") and t.endswith(">")
        )
        return cls(list(tokens), blank_id, delimiter, silent)

    def text(self, token_id: int) -> str:
        if token_id in self.silent:
            return ""
        token = self.tokens[token_id]
        return " " if token == self.word_delimiter else token

    def decode(self, token_ids: Sequence[int]) -> str:
        """Greedy CTC decoding of one whole sequence (repeats collapse, blanks vanish), with
        single spaces between words: what TranscriptStitcher gives for it pushed at once."""
        pieces, previous = [], None
        for token in token_ids:
            token = int(token)
            if token != previous and token != self.blank_id:
                pieces.append(self.text(token))
            previous = token
        return " ".join("".join(pieces).split())


@dataclass
class TranscriptUpdate:
    text: str  # what this chunk added
    partial: str  # the current utterance so far ("" right after a final)
    final: dict[str, Any] | None  # {"text", "start", "end"} when an utterance ended here

    def to_event(self) -> dict[str, Any]:
        return {"text": self.text, "partial": self.partial, "final": self.final}


class TranscriptStitcher:
    needs = "tokens"  # what push() takes per frame (BeamTranscriptStitcher: "log_probs")
    decoding = "greedy"  # what `ready` calls it

    def __init__(self, vocabulary: CtcVocabulary) -> None:
        self.vocabulary = vocabulary
        self._previous: int | None = None  # last frame's token id, across chunk boundaries
        self._utterance: list[str] = []
        self._utterance_start: float | None = None
        self._end_frame = 0  # one past the last frame pushed

    def push(
        self, first_frame: int, token_ids: Sequence[int], speech: bool | None, last: bool = False
    ) -> TranscriptUpdate:
        """One chunk's frames (global index of the first, then one token id per frame).

        `speech` is the chunk's voice-activity flag: a chunk without speech after some text ends
        the utterance. `last` ends it too (end of stream). None = no VAD: only `last` ends it.
        """
        added = []
        for offset, token in enumerate(token_ids):
            token = int(token)
            if token != self._previous and token != self.vocabulary.blank_id:
                piece = self.vocabulary.text(token)
                if piece.strip() and self._utterance_start is None:
                    self._utterance_start = (first_frame + offset) * FRAME_SECONDS
                added.append(piece)
            self._previous = token
        self._utterance.extend(added)
        self._end_frame = first_frame + len(token_ids)
        end = self._end_frame * FRAME_SECONDS
        final = None
        if (last or speech is False) and self._utterance_start is not None:
            final = {
                "text": self._clean("".join(self._utterance)),
                "start": self._utterance_start,
                "end": round(end, 6),
            }
            self._utterance, self._utterance_start = [], None
        partial = self._clean("".join(self._utterance))
        return TranscriptUpdate("".join(added), partial, final)

    def flush(self) -> dict[str, Any] | None:
        """End of stream: the final of an utterance still open, if any."""
        return self.push(self._end_frame, [], speech=None, last=True).final

    def gap(self) -> None:
        """Chunks were skipped: the next frame does not follow the last one."""
        self._previous = None

    @staticmethod
    def _clean(text: str) -> str:
        return " ".join(text.split())
