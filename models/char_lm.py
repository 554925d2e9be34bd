"""A character n-gram language model for CTC beam search: trained from text, kept as ARPA.

Why characters: a CTC model over letters spells; a character model scores any spelling, so words
the LM never saw are still decodable (a word LM would force them into its vocabulary), and it is
small. The estimate is interpolated absolute discounting (each order keeps `discount` of every
seen count for the next lower order, down to a uniform distribution), written in the standard
ARPA back-off form so that other tools can read it; `log_prob` reads it back the way ARPA
defines. Tokens are single characters; in the file a space is "|" (wav2vec2's word delimiter)
and a sentence runs from <s> to </s>.

    python -m models.char_lm --text train.txt --order 6 --out lm.arpa
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LM_FOLDER = "language_model"  # inside a model folder, as Hugging Face's *-with-lm checkpoints
START, END, UNKNOWN = "^", "$", "\x00"  # internal one-character stand-ins for <s>, </s>, <unk>
_TO_ARPA = {START: "<s>", END: "</s>", UNKNOWN: "<unk>", " ": "|"}
_FROM_ARPA = {v: k for k, v in _TO_ARPA.items()}
_LN10 = math.log(10.0)
_CACHE_LIMIT = 200_000  # scores kept per LM (about 30 MB at most); cleared when full


class LanguageModelError(ValueError):
    """An LM file that is not a character-level ARPA model."""


class CharNgramLM:
    """Back-off character n-gram model. `log_prob(history, char)`: natural log of P(char | the
    sentence so far); `END` as char scores the end of the sentence."""

    def __init__(self, order: int, probs: dict[str, float], backoffs: dict[str, float]) -> None:
        self.order = order
        self._probs = probs  # n-gram (history + char, as a string) -> natural-log probability
        self._backoffs = backoffs  # history -> natural-log back-off weight
        self._cache: dict[tuple[str, str], float] = {}
        if UNKNOWN not in probs:
            raise LanguageModelError("the model has no <unk> unigram")

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        order: int = 6,
        discount: float = 0.75,
        min_count: int = 1,
        prune_from: int = 4,
    ) -> CharNgramLM:
        """Estimate from sentences (one per item; spaces separate words).

        `min_count` > 1 prunes: n-grams of `prune_from` characters or more seen fewer times are
        dropped (their probability then comes from the shorter history, through the back-off
        weight, which is recomputed so that each history's distribution still sums to one).
        Broad text has a long tail of n-grams seen once: pruning them keeps the file a few MB.
        """
        if order < 1 or not 0.0 < discount < 1.0:
            raise ValueError("order must be >= 1 and discount in (0, 1)")
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        alphabet: set[str] = set()
        for sentence in sentences:
            text = START + " ".join(sentence.split()) + END
            for i in range(1, len(text)):
                alphabet.add(text[i])
                for k in range(min(order - 1, i) + 1):  # histories of 0 .. order-1 characters
                    counts[text[i - k : i]][text[i]] += 1
        if not alphabet:
            raise ValueError("no text to train on")
        uniform = 1.0 / (len(alphabet) + 1)  # + <unk>
        probs: dict[str, float] = {}
        backoffs: dict[str, float] = {}
        # Shortest histories first: each order interpolates with the one below, already done.
        for history in sorted(counts, key=len):
            following = counts[history]
            total = sum(following.values())
            weight = discount * len(following) / total
            backoffs[history] = math.log(weight)
            for char, n in following.items():
                lower = math.exp(probs[history[1:] + char]) if history else uniform
                probs[history + char] = math.log((n - discount) / total + weight * lower)
        probs[UNKNOWN] = math.log(math.exp(backoffs[""]) * uniform)
        backoffs.pop("", None)  # the empty history backs off to the uniform <unk> share
        if min_count > 1:
            _prune(counts, probs, backoffs, min_count, prune_from)
        return cls(order, probs, backoffs)

    def log_prob(self, history: str, char: str) -> float:
        context = (START + history)[-(self.order - 1) :] if self.order > 1 else ""
        key = (context, char)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        score = _backed_off(self._probs, self._backoffs, context, char)
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = score
        return score

    def sentence_log_prob(self, sentence: str) -> float:
        text = " ".join(sentence.split())
        return sum(self.log_prob(text[:i], c) for i, c in enumerate(text + END))

    # -- ARPA ---------------------------------------------------------------------------

    def write_arpa(self, path: Path) -> None:
        by_order: dict[int, list[str]] = defaultdict(list)
        for ngram in self._probs:
            by_order[len(ngram)].append(ngram)
        by_order[1].append(START)  # <s> is only ever a history: probability -99 by convention
        lines = ["", "\\data\\"]
        lines += [f"ngram {n}={len(by_order[n])}" for n in sorted(by_order)]
        for n in sorted(by_order):
            lines += ["", f"\\{n}-grams:"]
            for ngram in sorted(by_order[n]):
                p = -99.0 if ngram == START else self._probs[ngram] / _LN10
                row = f"{p:.6f}\t{' '.join(_TO_ARPA.get(c, c) for c in ngram)}"
                if ngram in self._backoffs:
                    row += f"\t{self._backoffs[ngram] / _LN10:.6f}"
                lines.append(row)
        lines += ["", "\\end\\", ""]
        path.write_text("\n".join(lines), encoding="utf-8")

    @classmethod
    def read_arpa(cls, path: Path) -> CharNgramLM:
        probs: dict[str, float] = {}
        backoffs: dict[str, float] = {}
        order = 0
        section = 0
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                line = line.strip()
                if not line or line.startswith("ngram ") or line == "\\data\\":
                    continue
                if line == "\\end\\":
                    break
                if line.startswith("\\") and line.endswith("-grams:"):
                    section = int(line[1:].split("-")[0])
                    order = max(order, section)
                    continue
                fields = line.split()
                if section == 0 or len(fields) not in (section + 1, section + 2):
                    raise LanguageModelError(f"{path}:{number}: not an ARPA n-gram line")
                tokens = fields[1 : section + 1]
                chars = [_FROM_ARPA.get(t, t) for t in tokens]
                if any(len(c) != 1 for c in chars):
                    raise LanguageModelError(
                        f"{path}:{number}: token {tokens!r} is longer than one character: a "
                        "word-level model (this decoder reads character-level ARPA files)"
                    )
                ngram = "".join(chars)
                try:
                    if ngram != START:
                        probs[ngram] = float(fields[0]) * _LN10
                    if len(fields) == section + 2:
                        backoffs[ngram] = float(fields[-1]) * _LN10
                except ValueError:
                    raise LanguageModelError(f"{path}:{number}: not an ARPA n-gram line") from None
        if not order:
            raise LanguageModelError(f"{path}: no n-gram sections")
        return cls(order, probs, backoffs)


def _backed_off(
    probs: dict[str, float], backoffs: dict[str, float], context: str, char: str
) -> float:
    """ARPA's reading: the longest n-gram of context + char that the model has, times the
    back-off weights of the longer histories passed over (in natural logs)."""
    score = 0.0
    while True:
        p = probs.get(context + char)
        if p is not None:
            return score + p
        if not context:
            return score + probs[UNKNOWN]
        score += backoffs.get(context, 0.0)
        context = context[1:]


def _prune(
    counts: dict[str, dict[str, int]],
    probs: dict[str, float],
    backoffs: dict[str, float],
    min_count: int,
    prune_from: int,
) -> None:
    """Drop rare long n-grams in place and renormalise their histories' back-off weights:
    bow(h) = (1 - P(kept | h)) / (1 - P_lower(kept | h[1:])), shortest histories first, so
    that P_lower is already the pruned model's."""
    for history in sorted(counts, key=len):
        if len(history) + 1 < prune_from:
            continue
        following = counts[history]
        dropped = [c for c, n in following.items() if n < min_count]
        if not dropped:
            continue
        for c in dropped:
            del probs[history + c]
        kept = [c for c in following if c not in dropped]
        if not kept:
            backoffs.pop(history, None)  # backs off with weight one: nothing left to correct
            continue
        mass = sum(math.exp(probs[history + c]) for c in kept)
        lower = sum(math.exp(_backed_off(probs, backoffs, history[1:], c)) for c in kept)
        backoffs[history] = math.log(max(1.0 - mass, 1e-12) / max(1.0 - lower, 1e-12))


@dataclass(frozen=True)
class LanguageModelFolder:
    """A model folder's `language_model/`: the LM and the decoding weights tuned with it."""

    lm: CharNgramLM
    alpha: float  # LM weight in beam search
    beta: float  # bonus per character
    path: Path

    def describe(self) -> dict[str, Any]:
        return {
            "kind": f"character {self.lm.order}-gram",
            "alpha": self.alpha,
            "beta": self.beta,
        }


def write_folder(
    model_folder: Path, lm: CharNgramLM, alpha: float, beta: float, **extra: Any
) -> Path:
    """Write `language_model/` (the ARPA file and attrs.json) into a model folder."""
    folder = model_folder / LM_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    name = f"char_{lm.order}gram.arpa"
    lm.write_arpa(folder / name)
    attrs = {"unit": "char", "file": name, "alpha": alpha, "beta": beta, **extra}
    (folder / "attrs.json").write_text(json.dumps(attrs, indent=1) + "\n")
    return folder


def find_language_model(model_folder: Path) -> LanguageModelFolder | None:
    """The model folder's character LM; None when it has no `language_model/attrs.json`.
    Raises LanguageModelError for one this decoder cannot use (e.g. a word-level KenLM)."""
    folder = model_folder / LM_FOLDER
    attrs_path = folder / "attrs.json"
    if not attrs_path.is_file():
        return None
    try:
        attrs = json.loads(attrs_path.read_text())
    except (OSError, ValueError) as exc:
        raise LanguageModelError(f"{attrs_path} is not readable JSON: {exc}") from exc
    if (
        not isinstance(attrs, dict)
        or attrs.get("unit") != "char"
        or not isinstance(attrs.get("file"), str)
    ):
        raise LanguageModelError(
            f"{folder} is not a character LM (a word-level KenLM for pyctcdecode?): the beam "
            "decoder reads character-level ARPA files (python -m models.char_lm makes one)"
        )
    try:
        lm = CharNgramLM.read_arpa(folder / attrs["file"])
        alpha, beta = float(attrs.get("alpha", 0.5)), float(attrs.get("beta", 1.0))
    except (OSError, ValueError) as exc:  # LanguageModelError is a ValueError too
        raise LanguageModelError(f"{folder}: {exc}") from exc
    return LanguageModelFolder(lm, alpha, beta, folder)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, required=True, help="sentences, one per line")
    parser.add_argument("--out", type=Path, required=True, help="ARPA file to write")
    parser.add_argument("--order", type=int, default=6)
    args = parser.parse_args(argv)
    lines = args.text.read_text(encoding="utf-8").splitlines()
    lm = CharNgramLM.train([t for t in lines if t.strip() and not t.startswith("#")], args.order)
    lm.write_arpa(args.out)
    print(f"{args.out}: order {lm.order}, {len(lm._probs)} n-grams")
    return 0


if __name__ == "__main__":
    sys.exit(main())
