"""The training text with breadth: sources, their split, the written/spoken agreement, coverage,
and the pruned character LM trained on it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from models.char_lm import END, UNKNOWN, CharNgramLM
from models.training import corpus, sources


def test_spoken_form_spells_numbers_and_leaves_out_what_reads_otherwise() -> None:
    assert sources.spoken_form("It cost 25 dollars & 3 cents.") == (
        "IT COST TWENTY FIVE DOLLARS AND THREE CENTS"
    )
    assert sources.spoken_form("Don’t look back, something might be gaining on you.") == (
        "DON'T LOOK BACK SOMETHING MIGHT BE GAINING ON YOU"
    )
    assert sources.spoken_form("Café au lait is what I ordered") == "CAFE AU LAIT IS WHAT I ORDERED"
    # Ordinary words that look like abbreviations stay.
    assert sources.spoken_form("No, I am not going.") == "NO I AM NOT GOING"
    # Read differently from how they are written: left out, never guessed at.
    for raw in (
        "Mr. Smith went to Washington today.",  # "mister"
        "The NASA launch was delayed again.",  # an acronym: a word or letters?
        "He finished 1st in the long race.",  # an ordinal
        "It is 3.5 miles to the next town.",  # a decimal
        "Send it to me at home@example.org now.",
        "Plan B was never going to work.",  # a single letter
        "Too short.",
        " ".join(["word"] * 25),
        "It holds 12,000,000 grains of sand.",  # past number_words
    ):
        assert sources.spoken_form(raw) is None, raw


def test_split_sentences() -> None:
    assert sources.split_sentences("One two three.  Four five six!\nSeven? eight") == [
        "One two three.",
        "Four five six!",
        "Seven?",
        "eight",
    ]


def test_lists_are_normalised_disjoint_and_the_eval_source_is_in_no_training_text() -> None:
    train = sources.broad_train_sentences()
    assert set(train) == {"grammar", *sources.TRAIN_SOURCES}
    assert all(len(train[s]) > 10_000 for s in sources.TRAIN_SOURCES)
    dev, evaluation = sources.dev_split(), sources.eval_sentences()
    assert len(dev) >= 500 and len(evaluation) == sources.EVAL_SENTENCES
    every_train = {s for group in train.values() for s in group}
    assert not every_train & set(dev)
    assert not every_train & set(evaluation) and not set(dev) & set(evaluation)
    assert not set(evaluation) & set(corpus.heldout_sentences())
    for sentence in [*every_train, *dev, *evaluation]:
        assert sentence == corpus.normalize(sentence)
        assert sources.MIN_WORDS <= len(sentence.split()) <= sources.MAX_WORDS
    assert all(sources.is_dev(s) for s in dev)


def test_committed_lists_are_what_the_packages_give(tmp_path: Path, monkeypatch) -> None:
    """Needs the Debian packages wordnet-base, dict-gcide and fortunes (`make system-deps`)."""
    monkeypatch.setattr(sources, "TEXT_DIR", tmp_path)
    sizes = sources.write_lists()
    for name, n in sizes.items():
        committed = Path(sources.DATA_DIR / "text" / name).read_text(encoding="utf-8")
        assert (tmp_path / name).read_text(encoding="utf-8") == committed, name
        assert n == len(committed.splitlines()) - 1  # less the header


def test_coverage_in_words_and_sounds() -> None:
    same = sources.coverage(["THE CAT SAT ON THE MAT"], ["THE CAT SAT"])
    assert same["test_words_in_train"] == 1.0 and same["test_diphones_in_train"] == 1.0
    apart = sources.coverage(["THE CAT SAT ON THE MAT"], ["A ZEBRA JUMPED"])
    assert apart["test_words_in_train"] == 0.0 and apart["test_diphones_in_train"] < 0.5
    assert apart["phones_in_train"] < 0.5
    # The real lists: the eval text's words and sounds are covered by the training text.
    train = [s for group in sources.broad_train_sentences().values() for s in group]
    real = sources.coverage(train, sources.eval_sentences())
    assert real["test_words_in_train"] > 0.95 and real["test_diphones_in_train"] > 0.99
    assert real["phones_in_train"] == 1.0 and real["rarest_phone_count"] > 100


def _distribution_sum(lm: CharNgramLM, history: str, alphabet: set[str]) -> float:
    return sum(math.exp(lm.log_prob(history, c)) for c in alphabet | {END, UNKNOWN})


def test_pruned_lm_is_smaller_still_normalised_and_survives_arpa(tmp_path: Path) -> None:
    texts = corpus.train_sentences()
    full = CharNgramLM.train(texts, 6)
    pruned = CharNgramLM.train(texts, 6, min_count=3)
    assert len(pruned._probs) < 0.7 * len(full._probs)
    alphabet = set("".join(texts))
    for history in ("", "T", "THE ", "QUICK BRO", "ZQXJ", "THERE ARE TWEN"):
        assert _distribution_sum(full, history, alphabet) == pytest.approx(1.0, abs=1e-9)
        assert _distribution_sum(pruned, history, alphabet) == pytest.approx(1.0, abs=1e-9)
    # Pruning costs little on the text it came from, and nothing is lost in the ARPA file.
    sample = texts[:200]
    full_ll = sum(full.sentence_log_prob(s) for s in sample)
    pruned_ll = sum(pruned.sentence_log_prob(s) for s in sample)
    assert full_ll > pruned_ll > 1.15 * full_ll
    path = tmp_path / "lm.arpa"
    pruned.write_arpa(path)
    back = CharNgramLM.read_arpa(path)
    assert sum(back.sentence_log_prob(s) for s in sample) == pytest.approx(pruned_ll, rel=1e-5)


def test_broad_lm_scores_unseen_english_better_than_the_grammar_lm() -> None:
    """What the broad text is for: the grammar's LM finds ordinary English improbable."""
    from models.training import lm

    grammar = CharNgramLM.train(corpus.train_sentences(), 6)
    broad = lm.train_lm(6, text_limit=5000)
    unseen = sources.eval_sentences()[:100]
    chars = sum(len(s) + 1 for s in unseen)
    grammar_bits = -sum(grammar.sentence_log_prob(s) for s in unseen) / chars / math.log(2)
    broad_bits = -sum(broad.sentence_log_prob(s) for s in unseen) / chars / math.log(2)
    assert broad_bits < 0.75 * grammar_bits


def test_the_lm_grid_prefers_a_lower_order_only_within_the_tolerance() -> None:
    from models.training import lm

    def row(order: int, mean: float) -> dict[str, float]:
        return {"order": order, "alpha": 0.5, "beta": 1.0, "whole": mean, "streamed": mean}

    tolerance = lm.SIZE_TOLERANCE
    close = [row(7, 0.30), row(6, 0.30 + tolerance / 2), row(5, 0.30 + 2 * tolerance)]
    assert lm.choose(close)["order"] == 6
    far = [row(7, 0.30), row(6, 0.30 + 2 * tolerance), row(5, 0.30 + 3 * tolerance)]
    assert lm.choose(far)["order"] == 7
