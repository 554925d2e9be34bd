"""CTC prefix beam search over a stream of frames, with an optional character language model.

Greedy decoding takes each frame's best token; beam search keeps the `width` most likely
texts, summing every frame alignment that spells the same text (CTC's blank and repeat rules),
so a character that no single frame is sure of can still win. A character LM (models/char_lm.py
trains one) adds `alpha` x log P(character | text so far) and `beta` per character (the bonus
keeps the LM from preferring short texts). Frames arrive chunk by chunk (`advance`); the best
text can change as later frames arrive, and `finish` closes the sentence (the LM scores its end).

Cost is bounded per frame: `width` texts, each extended only by the tokens more likely than
`prune` (natural log), which on most frames of a CTC model is none or one.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from stream.core.text.transcript import (
    FRAME_SECONDS,
    CtcVocabulary,
    TranscriptUpdate,
    Utterances,
)

_Chain = tuple[Any, int, int] | None  # (earlier chain, frame, token id): see CtcBeamDecoder
END = "$"  # the character a language model scores as the end of a sentence
_NEG = -math.inf


class CharLanguageModel(Protocol):
    def log_prob(self, history: str, char: str) -> float:
        """ln P(char | history), history = the sentence so far; char END ends it."""
        ...


@dataclass(frozen=True)
class BeamSettings:
    width: int = 8
    alpha: float = 0.0  # LM weight (0: no LM)
    beta: float = 0.0  # bonus per character emitted
    prune: float = -8.0  # tokens with ln p below this are not tried at a frame


def _logadd(a: float, b: float) -> float:
    if a == _NEG:
        return b
    if b == _NEG:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


class CtcBeamDecoder:
    """Prefix beam search, fed (frames, vocabulary) log-probability arrays."""

    def __init__(
        self,
        vocabulary: CtcVocabulary,
        settings: BeamSettings = BeamSettings(),
        lm: CharLanguageModel | None = None,
    ) -> None:
        self.settings = settings
        self.lm = lm if settings.alpha else None
        self.blank = vocabulary.blank_id
        # Tokens that print nothing (<s>, </s>, <unk>) count as blank: they start no character.
        self._silent = sorted(vocabulary.silent)
        self._chars = {
            i: vocabulary.text(i)
            for i in range(len(vocabulary.tokens))
            if i != self.blank and i not in vocabulary.silent
        }
        self._char_ids = np.array(sorted(self._chars), dtype=np.int64)
        self.printing = [i for i, text in self._chars.items() if text.strip()]
        self._t = 0  # the stream's index of the next frame
        self.reset()

    def reset(self) -> None:
        """Start a new sentence."""
        # text -> [ln P(ends in blank), ln P(ends in its last character), LM score + bonuses]
        self._beams: dict[str, list[float]] = {"": [0.0, _NEG, 0.0]}
        self._last_id: dict[str, int] = {"": -1}  # token id of each text's last character
        # Where each text's characters were first emitted, as a chain (earlier chain, frame,
        # token id) shared between texts with a common prefix: the words' times.
        self._emitted: dict[str, _Chain] = {"": None}

    def advance(self, log_probs: np.ndarray, first_frame: int | None = None) -> None:
        """Take the next frames: (frames, vocabulary) natural-log probabilities; `first_frame`:
        the stream's index of the first (default: after the last frame taken)."""
        if first_frame is not None:
            self._t = first_frame
        log_probs = np.asarray(log_probs, dtype=np.float64)
        if self._silent:
            blank = np.logaddexp.reduce(log_probs[:, [self.blank, *self._silent]], axis=1)
        else:
            blank = log_probs[:, self.blank]
        # Python floats inside the loop: numpy scalars would make every sum below slower.
        for row, values, p_blank in zip(log_probs, log_probs.tolist(), blank.tolist()):
            self._frame(row, values, p_blank)
            self._t += 1

    def best(self) -> str:
        """The most likely text so far (it may still change)."""
        text = max(self._beams, key=self._score)
        return " ".join(text.split())

    def finish(self) -> str:
        """The sentence's most likely text, its end scored by the LM; then start a new one."""
        return " ".join(self.finish_aligned()[0].split())

    def finish_aligned(self) -> tuple[str, list[tuple[str, int, int]]]:
        """finish(), with the text as searched (spaces not yet normalised) and, per character
        of it, (character, frame where it was first emitted, its token id)."""

        def closed(text: str) -> float:
            score = self._score(text)
            if self.lm is not None:
                score += self.settings.alpha * self.lm.log_prob(text.rstrip(), END)
            return score

        text = max(self._beams, key=closed)
        chars: list[tuple[str, int, int]] = []
        link = self._emitted[text]
        while link is not None:
            link, frame, token = link
            chars.append((self._chars[token], frame, token))
        self.reset()
        return text, chars[::-1]

    def break_repeats(self) -> None:
        """The next frame does not follow the last one (skipped audio): a character repeated
        across the gap is a new character, not a held one."""
        for entry in self._beams.values():
            entry[0], entry[1] = _logadd(entry[0], entry[1]), _NEG

    def _score(self, text: str) -> float:
        blank, char, lm = self._beams[text]
        return _logadd(blank, char) + lm

    def _frame(self, row: np.ndarray, values: list[float], p_blank: float) -> None:
        settings = self.settings
        candidates = self._char_ids[row[self._char_ids] > settings.prune].tolist()
        nxt: dict[str, list[float]] = {}
        last_ids: dict[str, int] = {}
        emitted: dict[str, _Chain] = {}

        def slot(text: str, lm_score: float, last: int, chain: _Chain) -> list[float]:
            entry = nxt.get(text)
            if entry is None:
                entry = nxt[text] = [_NEG, _NEG, lm_score]
                last_ids[text] = last
                emitted[text] = chain
            return entry

        for text, (b, c, lm_score) in self._beams.items():
            total = _logadd(b, c)
            last = self._last_id[text]
            chain = self._emitted[text]
            here = slot(text, lm_score, last, chain)
            here[0] = _logadd(here[0], total + p_blank)
            for token in candidates:
                p = values[token]
                char = self._chars[token]
                if token == last:  # held: same text; only after a blank is it a new character
                    here[1] = _logadd(here[1], c + p)
                    if b == _NEG:
                        continue
                    source = b
                else:
                    source = total
                if char == " " and (not text or text.endswith(" ")):
                    here[1] = _logadd(here[1], source + p)  # no leading or double spaces
                    continue
                extended = text + char
                entry = nxt.get(extended)
                if entry is None:
                    bonus = settings.beta
                    if self.lm is not None:
                        bonus += settings.alpha * self.lm.log_prob(text, char)
                    entry = slot(extended, lm_score + bonus, token, (chain, self._t, token))
                entry[1] = _logadd(entry[1], source + p)
        if len(nxt) > settings.width:
            kept = heapq.nlargest(
                settings.width, nxt.items(), key=lambda kv: _logadd(kv[1][0], kv[1][1]) + kv[1][2]
            )
            nxt = dict(kept)
        self._beams = nxt
        self._last_id = {text: last_ids[text] for text in nxt}
        self._emitted = {text: emitted[text] for text in nxt}


class BeamTranscriptStitcher(Utterances):
    """TranscriptStitcher's contract (stream/core/text/transcript.py) with beam search: chunks bring
    log-probabilities instead of argmax tokens, and an utterance's `partial` is the current best
    text, which later frames may revise; `text` is the part of `partial` from the first
    character that changed (new characters, or a revised tail). A word's times come from the
    frames where the best text's characters were emitted, each held while the frames' best
    token stays its own."""

    needs = "log_probs"  # what push() takes per frame (TranscriptStitcher: "tokens")

    def __init__(self, decoder: CtcBeamDecoder) -> None:
        super().__init__()
        self.decoder = decoder
        self.decoding = "beam+lm" if decoder.lm is not None else "beam"  # what `ready` calls it
        self._shown = ""  # the partial the last update showed
        self._said = False  # the utterance has printed something
        self._best: list[int] = []  # each frame's best token, from frame _best_from on
        self._best_from = 0

    def _update(self, added: str, partial: str, finals: list[dict[str, Any]]) -> TranscriptUpdate:
        """`text` is what changed: the new text from the first character that differs from
        the partial shown before."""
        update = TranscriptUpdate(added, partial, finals)
        shown = update.final["text"] if update.final and not partial else partial
        same = 0
        for a, b in zip(self._shown, shown):
            if a != b:
                break
            same += 1
        self._shown = partial
        update.text = shown[same:]
        return update

    def _advance(self, first_frame: int, log_probs: np.ndarray) -> str:
        if not len(log_probs):
            return ""
        log_probs = np.asarray(log_probs)
        if not self._best:
            self._best_from = first_frame
        self._best.extend(log_probs.argmax(axis=1).tolist())
        self.decoder.advance(log_probs, first_frame)
        self._said = self._said or bool(self.decoder.best())
        return ""  # push() works out the text from the partials

    def _finish(self, at: int) -> dict[str, Any] | None:
        if not self._said:
            self.decoder.reset()  # nothing said: drop what the beams hold (noise)
            self._forget_before(at)
            return None
        text, chars = self.decoder.finish_aligned()
        self._said = False
        held = [(char, frame, self._held_until(frame, token)) for char, frame, token in chars]
        self._forget_before(at)
        words = self._words(held, at)
        return {
            # The words' text: the search's, with a break wherever the speaker paused.
            "text": " ".join(w["word"] for w in words) if words else " ".join(text.split()),
            "start": words[0]["start"] if words else round(at * FRAME_SECONDS, 3),
            "end": round(max(at * FRAME_SECONDS, words[-1]["end"] if words else 0.0), 6),
            "words": words,
        }

    def _held_until(self, frame: int, token: int) -> int:
        end = frame
        while 0 <= end + 1 - self._best_from < len(self._best):
            if self._best[end + 1 - self._best_from] != token:
                break
            end += 1
        return end

    def _forget_before(self, frame: int) -> None:
        drop = max(0, min(frame - self._best_from, len(self._best)))
        del self._best[:drop]
        self._best_from += drop

    def _partial(self) -> str:
        return self.decoder.best() if self._said else ""

    def gap(self) -> None:
        self.decoder.break_repeats()
