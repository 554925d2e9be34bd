"""The training and held-out sentence lists, their normalisation, and the grammar that wrote them.

The lists are committed text files (`data/train.txt`, `data/heldout.txt`) so that every run reads
the same sentences; `python -m models.training.corpus` rewrites them from the word lists in
`data/lexicon.txt` with a fixed seed (deterministic: the same files every time). The grammar mixes
names, contractions and possessives (the apostrophe), numbers spelled out as words, and words
covering all 26 letters, so a character CTC model sees every symbol of the wav2vec2 vocabulary.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE = DATA_DIR / "train.txt"
HELDOUT_FILE = DATA_DIR / "heldout.txt"
LEXICON_FILE = DATA_DIR / "lexicon.txt"
N_TRAIN = 4000
N_HELDOUT = 150
SEED = 20240611

_NOT_ALLOWED = re.compile(r"[^A-Z' ]+")


def normalize(text: str) -> str:
    """Uppercase, keep A-Z, apostrophe and space (anything else becomes a space), collapse spaces.

    Curly apostrophes count as apostrophes, so "don’t" and "don't" normalise alike.
    """
    text = text.upper().replace("\u2019", "'").replace("\u2018", "'")
    return " ".join(_NOT_ALLOWED.sub(" ", text).split())


def read_sentences(path: Path) -> list[str]:
    """Normalised, non-empty lines of a sentence file (`#` starts a comment line)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [normalize(s) for s in lines if s.strip() and not s.lstrip().startswith("#")]


def train_sentences() -> list[str]:
    return read_sentences(TRAIN_FILE)


def heldout_sentences() -> list[str]:
    return read_sentences(HELDOUT_FILE)


# --- numbers as words -------------------------------------------------------------------------
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0 <= n < 10000 spelled out the American way ("three hundred twelve")."""
    if not 0 <= n < 10000:
        raise ValueError(f"out of range: {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = "" if n % 100 == 0 else " " + number_words(n % 100)
        return _ONES[n // 100] + " hundred" + rest
    rest = "" if n % 1000 == 0 else " " + number_words(n % 1000)
    return _ONES[n // 1000] + " thousand" + rest


# --- the grammar ------------------------------------------------------------------------------
def load_lexicon(path: Path = LEXICON_FILE) -> dict[str, list]:
    """Sections of the lexicon: names/adjectives/places are words; nouns and verbs are pairs."""
    sections: dict[str, list] = {}
    name = ""
    # Pairs are split in the middle of their words: "box boxes", "jump over jumped over".
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            name = line.strip("[]")
            sections[name] = []
        elif name in ("noun", "verb", "time"):
            entries = [e.strip() for e in line.split("|") if e.strip()]
            if name == "time":
                sections[name] += entries
            else:
                for e in entries:
                    w = e.split()
                    sections[name].append((" ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2 :])))
        else:
            sections[name] += line.split()
    return {k: list(dict.fromkeys(v)) for k, v in sections.items()}  # drop duplicates, keep order


_SUBJECT_CONTRACTIONS = ["i'm", "you're", "we're", "they're", "he's", "she's", "it's"]
_NEGATIONS = ["don't", "can't", "won't", "didn't", "shouldn't", "wouldn't", "couldn't"]
_PRONOUNS = ["i", "you", "we", "they", "he", "she"]
_PREPOSITIONS = ["in the", "at the", "near the", "behind the", "next to the", "outside the"]


def _sentence(rng: random.Random, lex: dict[str, list]) -> str:
    """One sentence from one of the templates below, picked at random."""

    def c(key: str):  # noqa: ANN202 - a word, or a (singular, plural) / (base, past) pair
        return rng.choice(lex[key])

    def np_() -> str:  # "the red fox" / "a cat" / "my old lamp"
        det = rng.choice(["the", "the", "a", "my", "your", "our", "this", "that"])
        adj = c("adjective") + " " if rng.random() < 0.6 else ""
        rest = f"{adj}{c('noun')[0]}"
        return f"{'an' if det == 'a' and rest[0] in 'aeiou' else det} {rest}"

    def place() -> str:
        return f"{rng.choice(_PREPOSITIONS)} {c('place')}"

    def num() -> str:
        return number_words(
            rng.choice([rng.randint(2, 20), rng.randint(21, 99), rng.randint(100, 2999)])
        )

    name, name2, time = c("name"), c("name"), c("time")
    verb, noun = c("verb"), c("noun")
    templates = [
        lambda: f"{name} {verb[1]} {np_()} {time}",
        lambda: f"{np_()} is {c('adjective')} {time}",
        lambda: f"{rng.choice(_SUBJECT_CONTRACTIONS)} going to {verb[0]} {np_()} {place()}",
        lambda: f"{name}'s {noun[0]} is {c('adjective')} and {c('adjective')}",
        lambda: f"there are {num()} {noun[1]} {place()}",
        lambda: f"did {name} {verb[0]} {np_()} {time}",
        lambda: f"{rng.choice(_PRONOUNS)} {rng.choice(_NEGATIONS)} {verb[0]} {np_()} {time}",
        lambda: f"{name} and {name2} {verb[1]} {num()} {c('adjective')} {noun[1]}",
        lambda: f"{np_()} costs {num()} dollars",
        lambda: f"please {verb[0]} {np_()} before {time}",
        lambda: f"it's {c('adjective')} {place()} {time}",
        lambda: f"{name} said that {np_()} was {c('adjective')}",
        lambda: f"we'll meet {place()} at {number_words(rng.randint(1, 12))} o'clock",
        lambda: f"how many {noun[1]} did {name} {verb[0]} {place()}",
        lambda: f"my {noun[0]} is {number_words(rng.randint(2, 99))} years old",
        lambda: (
            f"{name} {verb[1]} {np_()} and "
            f"{verb[1] if rng.random() < 0.5 else c('verb')[1]} {np_()}"
        ),
        lambda: f"the {c('adjective')} {noun[1]} of {name2} are {place()}",
        lambda: (
            f"{name} found {num()} {noun[1]} and {number_words(rng.randint(2, 19))} {c('noun')[1]}"
        ),
        lambda: f"why didn't you {verb[0]} {np_()} {place()}",
        lambda: f"the year was {number_words(rng.randint(1000, 2099))}",
    ]
    return rng.choice(templates)()


def generate(
    n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT, seed: int = SEED
) -> tuple[list[str], list[str]]:
    """Disjoint train and held-out sentence lists (normalised), deterministic for a seed."""
    rng = random.Random(seed)
    lex = load_lexicon()
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n_train + n_heldout:
        s = normalize(_sentence(rng, lex))
        if s not in seen and 3 <= len(s.split()) <= 16:
            seen.add(s)
            out.append(s)
    return out[n_heldout:], out[:n_heldout]


def write_lists() -> None:
    """Rewrite data/train.txt and data/heldout.txt from the grammar (same output every time)."""
    train, heldout = generate()
    header = "# Generated by `python -m models.training.corpus` (seed {}); do not edit by hand.\n"
    TRAIN_FILE.write_text(header.format(SEED) + "\n".join(train) + "\n", encoding="utf-8")
    HELDOUT_FILE.write_text(header.format(SEED) + "\n".join(heldout) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_lists()
    print(f"wrote {TRAIN_FILE} and {HELDOUT_FILE}")
