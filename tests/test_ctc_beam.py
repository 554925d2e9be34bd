"""CTC prefix beam search and the character LM, with arrays and text alone."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from models.char_lm import (
    END,
    UNKNOWN,
    CharNgramLM,
    LanguageModelError,
    find_language_model,
    write_folder,
)
from stream.core.text.ctc_beam import BeamSettings, BeamTranscriptStitcher, CtcBeamDecoder
from stream.core.text.transcript import CtcVocabulary

TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "|", "A", "B", "C", "T", "Y"]
VOCAB = CtcVocabulary.from_tokens(TOKENS, blank_id=0)
ID = {t: i for i, t in enumerate(TOKENS)}
SENTENCES = ["A CAT", "THE CAT SAT", "A BAT AND A CAT", "CATS AND BATS", "THAT CAT"] * 3


def frames(*rows: dict[str, float]) -> np.ndarray:
    """Log-probabilities from {token: probability} rows; the rest share what is left (at
    least a trace each)."""
    out = np.zeros((len(rows), len(TOKENS)))
    for r, row in enumerate(rows):
        out[r] = max(1.0 - sum(row.values()), 1e-6) / (len(TOKENS) - len(row))
        for token, p in row.items():
            out[r, ID[token]] = p
    return np.log(out / out.sum(axis=1, keepdims=True))


def peaked(text_ids: list[int], rng: np.random.Generator) -> np.ndarray:
    """A frame per id with 0.9 on it: greedy and beam search must agree."""
    out = np.full((len(text_ids), len(TOKENS)), 0.1 / (len(TOKENS) - 1))
    out[np.arange(len(text_ids)), text_ids] = 0.9
    return np.log(out * rng.uniform(0.99, 1.01, out.shape))


def test_beam_sums_alignments_where_greedy_takes_the_best_path() -> None:
    # Two frames, each 0.55 blank / 0.45 "A": the best path is blank-blank (""), but "A" has
    # three alignments (AA, A-, -A): 0.2025 + 2 x 0.2475 = 0.70 against 0.30.
    log_probs = frames({"<pad>": 0.55, "A": 0.45}, {"<pad>": 0.55, "A": 0.45})
    assert VOCAB.decode(log_probs.argmax(-1)) == ""
    decoder = CtcBeamDecoder(VOCAB, BeamSettings(width=4))
    decoder.advance(log_probs)
    assert decoder.finish() == "A"


def test_peaked_frames_decode_as_greedy_does() -> None:
    rng = np.random.default_rng(0)
    decoder = CtcBeamDecoder(VOCAB, BeamSettings(width=8))
    for _ in range(50):
        ids = rng.choice([0, 0, 0, 4, 5, 6, 7, 8, 9, 1], size=int(rng.integers(1, 40))).tolist()
        log_probs = peaked(ids, rng)
        decoder.advance(log_probs)
        assert decoder.finish() == VOCAB.decode(ids), ids


def test_a_repeated_letter_needs_a_blank_between() -> None:
    decoder = CtcBeamDecoder(VOCAB)
    rng = np.random.default_rng(1)
    decoder.advance(peaked([ID["A"], ID["A"], ID["A"]], rng))
    assert decoder.finish() == "A"
    decoder.advance(peaked([ID["A"], ID["<pad>"], ID["A"]], rng))
    assert decoder.finish() == "AA"


def test_fed_in_chunks_equals_fed_at_once() -> None:
    rng = np.random.default_rng(2)
    lm = CharNgramLM.train(SENTENCES, order=4)
    for trial in range(20):
        raw = rng.dirichlet(np.full(len(TOKENS), 0.3), size=60)
        log_probs = np.log(raw)
        whole = CtcBeamDecoder(VOCAB, BeamSettings(6, 0.5, 1.0), lm)
        whole.advance(log_probs)
        pieces = CtcBeamDecoder(VOCAB, BeamSettings(6, 0.5, 1.0), lm)
        cuts = sorted(rng.choice(np.arange(1, 60), size=4, replace=False).tolist())
        for a, b in zip([0, *cuts], [*cuts, 60]):
            pieces.advance(log_probs[a:b])
        assert pieces.best() == whole.best() and pieces.finish() == whole.finish(), trial


def test_the_language_model_settles_what_the_audio_leaves_open() -> None:
    # "CAT" or "CAY": the last letter leans to Y (0.5 against 0.4); the LM knows CAT.
    log_probs = frames(
        {"C": 0.9},
        {"A": 0.9},
        {"Y": 0.5, "T": 0.4},
        {"<pad>": 0.9},
    )
    plain = CtcBeamDecoder(VOCAB, BeamSettings(width=8))
    plain.advance(log_probs)
    assert plain.finish() == "CAY"
    lm = CharNgramLM.train(SENTENCES, order=4)
    with_lm = CtcBeamDecoder(VOCAB, BeamSettings(8, alpha=0.8, beta=1.0), lm)
    with_lm.advance(log_probs)
    assert with_lm.finish() == "CAT"


def test_silent_tokens_count_as_blank() -> None:
    rng = np.random.default_rng(3)
    ids = [ID["A"], ID["<unk>"], ID["A"], ID["</s>"], ID["B"]]
    decoder = CtcBeamDecoder(VOCAB)
    decoder.advance(peaked(ids, rng))
    assert decoder.finish() == VOCAB.decode(ids) == "AAB"


def test_a_gap_breaks_a_held_letter() -> None:
    rng = np.random.default_rng(4)
    decoder = CtcBeamDecoder(VOCAB)
    decoder.advance(peaked([ID["A"]], rng))
    decoder.break_repeats()  # skipped audio between the two frames
    decoder.advance(peaked([ID["A"]], rng))
    assert decoder.finish() == "AA"


def test_no_leading_trailing_or_double_spaces() -> None:
    rng = np.random.default_rng(5)
    ids = [ID["|"], ID["A"], ID["|"], 0, ID["|"], ID["B"], ID["|"]]
    decoder = CtcBeamDecoder(VOCAB)
    decoder.advance(peaked(ids, rng))
    assert decoder.finish() == "A B"


def stitch(stitcher: BeamTranscriptStitcher, chunks: list[tuple[list[int], bool]]) -> list:
    """Chunks of frames; a chunk marked False ends the utterance at its end."""
    rng = np.random.default_rng(6)
    updates, frame = [], 0
    for ids, speech in chunks:
        ends = [] if speech else [frame + len(ids)]
        updates.append(stitcher.push(frame, peaked(ids, rng), ends))
        frame += len(ids)
    return updates


def test_stitcher_cuts_utterances_on_silence_and_its_texts_add_up() -> None:
    c, a, t, b, blank = ID["C"], ID["A"], ID["T"], ID["B"], 0
    stitcher = BeamTranscriptStitcher(CtcBeamDecoder(VOCAB))
    updates = stitch(
        stitcher,
        [([blank, c, a], True), ([t, blank, ID["|"]], True), ([blank, blank], False),
         ([b, a], True), ([t, t], True)],
    )  # fmt: skip
    assert [u.partial for u in updates] == ["CA", "CAT", "", "BA", "BAT"]
    cat = {"word": "CAT", "start": 0.02, "end": 0.08}  # C at frame 1 ... T at 3
    assert updates[2].final == {"text": "CAT", "start": 0.02, "end": 0.16, "words": [cat]}
    assert "".join(u.text for u in updates[:3]).strip() == "CAT"
    bat = {"word": "BAT", "start": 0.16, "end": 0.24}
    assert stitcher.flush() == {"text": "BAT", "start": 0.16, "end": 0.24, "words": [bat]}
    assert stitcher.flush() is None  # nothing left


def test_stitcher_text_is_the_revised_tail() -> None:
    stitcher = BeamTranscriptStitcher(CtcBeamDecoder(VOCAB))
    stitcher._shown = "CAY"  # what an earlier chunk showed
    stitcher._said = True
    update = stitcher.push(0, frames({"C": 0.9}, {"A": 0.9}, {"T": 0.9}))
    assert update.partial == "CAT" and update.text == "T"


def test_lm_probabilities_sum_to_one() -> None:
    lm = CharNgramLM.train(SENTENCES, order=5)
    alphabet = sorted({ch for s in SENTENCES for ch in s} | {END, UNKNOWN})
    for history in ["", "A", "THE C", "QQQ", "CATS AND BATS AND"]:
        total = sum(math.exp(lm.log_prob(history, ch)) for ch in alphabet)
        assert total == pytest.approx(1.0, abs=1e-9), history


def test_lm_prefers_its_language() -> None:
    lm = CharNgramLM.train(SENTENCES, order=5)
    assert lm.sentence_log_prob("THE CAT") > lm.sentence_log_prob("TEH TAC")
    assert lm.log_prob("THE C", "A") > lm.log_prob("THE C", "Y")


def test_arpa_round_trip(tmp_path: Path) -> None:
    lm = CharNgramLM.train(SENTENCES, order=4)
    lm.write_arpa(tmp_path / "lm.arpa")
    text = (tmp_path / "lm.arpa").read_text()
    assert "\\data\\" in text and "<s> T H E" in text and "| C A T" in text
    again = CharNgramLM.read_arpa(tmp_path / "lm.arpa")
    for history in ["", "T", "THE", "A BAT AN", "ZZ"]:
        for ch in "ABCT HYZ" + END:
            assert again.log_prob(history, ch) == pytest.approx(lm.log_prob(history, ch), abs=1e-5)


def test_language_model_folder(tmp_path: Path) -> None:
    assert find_language_model(tmp_path) is None  # no language_model/: greedy or plain beam
    lm = CharNgramLM.train(SENTENCES, order=3)
    write_folder(tmp_path, lm, alpha=0.7, beta=1.5)
    found = find_language_model(tmp_path)
    assert found is not None and (found.alpha, found.beta, found.lm.order) == (0.7, 1.5, 3)
    assert found.describe()["kind"] == "character 3-gram"


@pytest.mark.parametrize(
    ("attrs", "arpa", "message"),
    [
        ('{"unit": "char", "file": "missing.arpa"}', None, "No such file"),
        ('{"unit": "char", "file": "lm.arpa"}', "\\1-grams:\nnot-a-number\ta\n", "not an ARPA"),
        ('{"unit": "char", "file": "lm.arpa"}', "\\1-grams:\n-1.0\ta\n", "no <unk>"),
        ('{"unit": "char", "file": "lm.arpa", "alpha": "high"}', None, "could not convert"),
        ("[1, 2]", None, "not a character LM"),
        ("{", None, "not readable JSON"),
    ],
)
def test_a_broken_language_model_folder_is_a_clear_error(
    tmp_path: Path, attrs: str, arpa: str | None, message: str
) -> None:
    folder = tmp_path / "language_model"
    folder.mkdir()
    (folder / "attrs.json").write_text(attrs)
    if arpa is not None:
        (folder / "lm.arpa").write_text(arpa)
    elif "alpha" in attrs:  # a good ARPA file with a bad weight beside it
        CharNgramLM.train(SENTENCES, order=2).write_arpa(folder / "lm.arpa")
    with pytest.raises(LanguageModelError, match=message):
        find_language_model(tmp_path)


def test_word_level_language_models_are_refused_clearly(tmp_path: Path) -> None:
    folder = tmp_path / "language_model"
    folder.mkdir()
    # A pyctcdecode/KenLM folder, as Hugging Face's *-with-lm checkpoints ship it.
    (folder / "attrs.json").write_text('{"alpha": 0.5, "beta": 1.5, "unk_score_offset": -10}')
    with pytest.raises(LanguageModelError, match="not a character LM"):
        find_language_model(tmp_path)
    arpa = "\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0\t<unk>\n-0.5\tHELLO\n\n\\end\\\n"
    (tmp_path / "words.arpa").write_text(arpa)
    with pytest.raises(LanguageModelError, match="word-level"):
        CharNgramLM.read_arpa(tmp_path / "words.arpa")
