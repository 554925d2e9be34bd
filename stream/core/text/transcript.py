"""Greedy CTC decoding stitched across chunks, cut into utterances at the ends of turns.

Each chunk brings the argmax token of each of its frames (frames tile the stream exactly, see
models/frames.py). Repeats collapse and blanks vanish as in whole-utterance greedy decoding;
the last token of the previous chunk is remembered, so a character held across a boundary is
neither doubled nor lost: the stitched text equals the whole utterance's decode. Each word of a
final carries its times: from the first frame of its first character to the end of the last
frame its last character was held (20 ms resolution).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

FRAME_SECONDS = 0.02
PAUSE_FRAMES = 10  # 200 ms without voice between two characters: a word break
# CTC emits a letter up to ~200 ms after its sound (the model looks ahead), so an utterance
# ended by a turn keeps the frames this long after the silence began (within the chunk).
LATE_FRAMES = 10


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


Word = dict[str, Any]  # {"word", "start", "end"}: seconds on the 20 ms frame grid


@dataclass
class TranscriptUpdate:
    text: str  # what this chunk added
    partial: str  # the current utterance so far ("" right after a final)
    # {"text", "start", "end", "words"} of each utterance that ended in the chunk (a turn
    # ended, the client committed, the stream ended), in order; nearly always one at most
    finals: list[dict[str, Any]]
    # Words of the utterance under way that became final in this chunk (greedy decoding only:
    # a word is final once the next has begun); the utterance's final repeats them all.
    words: list[Word] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any] | None:
        """The utterance that ended here; several that did, as one."""
        return merged(self.finals)

    def to_event(self) -> dict[str, Any]:
        event = {"text": self.text, "partial": self.partial, "final": self.final}
        if len(self.finals) > 1:
            event["finals"] = self.finals
        if self.words:
            event["words"] = self.words
        return event


def merged(finals: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    if len(finals) < 2:
        return finals[0] if finals else None
    return {
        "text": " ".join(f["text"] for f in finals),
        "start": finals[0]["start"],
        "end": finals[-1]["end"],
        "words": [w for f in finals for w in f["words"]],
    }


def words_of(
    chars: Sequence[tuple[str, int, int]], voiced: Callable[[int], bool | None] = lambda f: None
) -> list[Word]:
    """(character, first frame, last frame) of an utterance's characters, in order -> its
    words. A word starts at its first character's first frame. CTC emits a character as a spike
    anywhere in its sound, so its last character's frames say little of where the word ends:
    where `voiced` knows (voice activity per frame), the word ends at the first unvoiced frame
    after its last character appeared, or where the next word starts (a last character that
    appeared in the pause after the word, late: where the voice stopped before it); else one
    past the last frame its last character was held."""
    return timed_words(chars, word_spans(chars, voiced), voiced)


def word_spans(
    chars: Sequence[tuple[str, int, int]], voiced: Callable[[int], bool | None]
) -> list[tuple[int, int]]:
    """Where each word is in `chars`: (index of its first character, of its last). A pause
    (PAUSE_FRAMES unvoiced) between two characters is a word break, whether or not the model
    printed one: it learned word breaks in connected speech, and may not print one across a
    pause. Words depend only on the characters around them: a slice of `chars` that starts at
    a word gives that word and the ones after it."""
    spans: list[tuple[int, int]] = []
    first: int | None = None
    for i, char in enumerate([*chars, (" ", -1, -1)]):
        if char[0].strip() and not (first is not None and _pause(chars[i - 1][2], char[1], voiced)):
            first = i if first is None else first
            continue
        if first is not None:
            spans.append((first, i - 1))
        first = i if char[0].strip() else None
    return spans


def timed_words(
    chars: Sequence[tuple[str, int, int]],
    spans: Sequence[tuple[int, int]],
    voiced: Callable[[int], bool | None],
) -> list[Word]:
    """The words of `spans` (word_spans), each with its times (words_of says how)."""
    words: list[Word] = []
    for i, (first, final) in enumerate(spans):
        text = "".join(c for c, _, _ in chars[first : final + 1])
        start, (_, last, held) = chars[first][1], chars[final]
        limit = chars[spans[i + 1][0]][1] if i + 1 < len(spans) else None
        end = held + 1
        if voiced(last):
            end = last + 1
            while (limit is None or end < limit) and voiced(end):
                end += 1
        elif voiced(last) is False:  # emitted late, in the pause: the word ended before it
            voice = next((f for f in range(last - 1, start, -1) if voiced(f)), None)
            if voice is not None:
                end = voice + 1
        if limit is not None:
            end = min(end, limit)
        words.append({
            "word": text,
            "start": round(start * FRAME_SECONDS, 3),
            "end": round(max(end, start + 1) * FRAME_SECONDS, 3),
        })  # fmt: skip
    return words


def _pause(after: int, before: int, voiced: Callable[[int], bool | None]) -> bool:
    """Whether the frames between two characters hold a pause."""
    unvoiced = 0
    for frame in range(after + 1, before):
        unvoiced = unvoiced + 1 if voiced(frame) is False else 0
        if unvoiced >= PAUSE_FRAMES:
            return True
    return False


class Utterances:
    """What the greedy and the beam stitcher share: utterances cut at the frames where turns
    ended (anywhere in a chunk, or before it when the end was known late)."""

    def __init__(self) -> None:
        self._end_frame = 0  # one past the last frame pushed
        self._voiced: list[bool] = []  # voice activity of the frames from _voiced_from on
        self._voiced_from = 0

    def push(
        self,
        first_frame: int,
        frames: Any,
        ends: Sequence[int] = (),
        last: bool = False,
        voiced: Sequence[bool] | None = None,
    ) -> TranscriptUpdate:
        """One chunk's frames (global index of the first; a token id or a row of
        log-probabilities per frame). An utterance ends at each frame of `ends` (a turn ended
        there: frames from LATE_FRAMES after it on belong to the next) and at `last` (end of
        stream). `voiced`:
        the chunk's voice activity per frame, where known (it places the ends of words)."""
        if voiced is not None:
            if first_frame != self._voiced_from + len(self._voiced):
                self._voiced, self._voiced_from = [], first_frame  # a gap: start again
            self._voiced.extend(voiced)
        cursor = 0
        pieces, finals = [], []
        for end in sorted(ends):
            cut = min(max(end + LATE_FRAMES - first_frame, cursor), len(frames))
            pieces.append(self._advance(first_frame + cursor, frames[cursor:cut]))
            finals.append(self._finish(max(end, 0)))
            cursor = cut
        pieces.append(self._advance(first_frame + cursor, frames[cursor:]))
        self._end_frame = first_frame + len(frames)
        if last:
            finals.append(self._finish(self._end_frame))
        said = [final for final in finals if final is not None]
        return self._update("".join(pieces), self._partial(), said)

    def flush(self) -> dict[str, Any] | None:
        """End of stream: the final of the utterance still open, if it said anything."""
        return self._finish(self._end_frame)

    def _is_voiced(self, frame: int) -> bool | None:
        index = frame - self._voiced_from
        return self._voiced[index] if 0 <= index < len(self._voiced) else None

    def _words(self, chars: Sequence[tuple[str, int, int]], at: int) -> list[Word]:
        """The ended utterance's words; the voicing before `at` is forgotten."""
        words = words_of(chars, self._is_voiced)
        drop = max(0, min(at - self._voiced_from, len(self._voiced)))
        del self._voiced[:drop]
        self._voiced_from += drop
        return words

    # What each stitcher implements:
    def _advance(self, first_frame: int, frames: Any) -> str:
        """Take frames of the current utterance; return the text they added."""
        raise NotImplementedError

    def _finish(self, at: int) -> dict[str, Any] | None:
        """End the current utterance at frame `at`: its final, or None if it said nothing."""
        raise NotImplementedError

    def _partial(self) -> str:
        raise NotImplementedError

    def _update(self, added: str, partial: str, finals: list[dict[str, Any]]) -> TranscriptUpdate:
        """The chunk's update; `added`: the text its frames added."""
        return TranscriptUpdate(added, partial, finals)


class TranscriptStitcher(Utterances):
    needs = "tokens"  # what push() takes per frame (BeamTranscriptStitcher: "log_probs")
    decoding = "greedy"  # what `ready` calls it

    def __init__(self, vocabulary: CtcVocabulary) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self._previous: int | None = None  # last frame's token id, across chunk boundaries
        # The utterance's characters: (text, first frame, last frame it was held).
        self._chars: list[tuple[str, int, int]] = []
        self._word_from = 0  # index in _chars of the first word not yet in an update's `words`

    def _advance(self, first_frame: int, token_ids: Sequence[int]) -> str:
        added = []
        for offset, token in enumerate(token_ids):
            token = int(token)
            frame = first_frame + offset
            piece = "" if token == self.vocabulary.blank_id else self.vocabulary.text(token)
            if not piece:  # blank, or a token that never prints
                pass
            elif token != self._previous:
                if piece.strip() or self._chars:  # an utterance starts with a printing char
                    self._chars.append((piece, frame, frame))
                added.append(piece)
            elif self._chars:  # held: the character goes on
                self._chars[-1] = (piece, self._chars[-1][1], frame)
            self._previous = token
        return "".join(added)

    def _finish(self, at: int) -> dict[str, Any] | None:
        words = self._words(self._chars, at)
        self._chars, self._word_from = [], 0
        if not words:
            return None
        return {
            "text": " ".join(w["word"] for w in words),
            "start": words[0]["start"],
            "end": round(max(at * FRAME_SECONDS, words[-1]["end"]), 6),
            "words": words,
        }

    def _partial(self) -> str:
        return " ".join("".join(c for c, _, _ in self._chars).split())

    def _update(self, added: str, partial: str, finals: list[dict[str, Any]]) -> TranscriptUpdate:
        """With the words that became final: greedy decoding never revises a letter, and a
        word's times are known once the next word has begun (all but the last word). Only the
        characters from the first word not given yet are looked at: a long utterance costs
        each chunk what it added, not all it holds."""
        rest = self._chars[self._word_from :]
        spans = word_spans(rest, self._is_voiced)
        stable = timed_words(rest, spans, self._is_voiced)[:-1]
        if stable:
            self._word_from += spans[-1][0]
        return TranscriptUpdate(added, partial, finals, stable)

    def gap(self) -> None:
        """Chunks were skipped: the next frame does not follow the last one."""
        self._previous = None
