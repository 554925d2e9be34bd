"""CTC stitching across chunks and utterance cuts, with token ids alone."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stream.core.text.transcript import CtcVocabulary, TranscriptStitcher

TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A", "H", "L", "O"]
VOCAB = CtcVocabulary.from_tokens(TOKENS, blank_id=0)
ID = {t: i for i, t in enumerate(TOKENS)}


def ids(spec: str) -> list[int]:
    """'HH_E_LL_L' -> token ids; '_' is the blank, ' ' the word delimiter."""
    return [0 if c == "_" else ID["|" if c == " " else c] for c in spec]


def whole_decode(frames: list[int]) -> str:
    stitcher = TranscriptStitcher(VOCAB)
    return stitcher.push(0, frames, last=True).final["text"]


def test_greedy_ctc_collapses_repeats_and_drops_blanks() -> None:
    assert whole_decode(ids("HH_EE_LL_L_OO__ _THE")) == "HELLO THE"


def test_a_character_held_across_a_chunk_boundary_is_not_doubled() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    a = stitcher.push(0, ids("HHEE"))
    b = stitcher.push(4, ids("EELL_L"))
    c = stitcher.push(10, ids("O__"), ends=[13])
    assert (a.text, b.text, c.text) == ("HE", "LL", "O")
    word = {"word": "HELLO", "start": 0.0, "end": 0.22}  # H at frame 0 ... O at frame 10
    assert b.partial == "HELL"
    assert c.final == {"text": "HELLO", "start": 0.0, "end": 0.26, "words": [word]}
    assert c.partial == ""


def test_sentence_markers_and_unknowns_are_silent() -> None:
    frames = [ID["<s>"], ID["H"], ID["<unk>"], ID["A"], ID["</s>"]]
    assert whole_decode(frames) == "HA"


def test_a_gap_breaks_the_repeat_collapse() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    stitcher.push(0, ids("LL"))
    stitcher.gap()  # chunks skipped in between: the next L is a new character
    assert stitcher.push(50, ids("LL")).partial == "LL"


@settings(max_examples=150, deadline=None)
@given(
    frames=st.lists(st.integers(0, len(TOKENS) - 1), min_size=1, max_size=200),
    cuts=st.lists(st.integers(1, 40), max_size=20),
)
def test_stitched_chunks_equal_the_whole_decode(frames: list[int], cuts: list[int]) -> None:
    stitcher, pos, final = TranscriptStitcher(VOCAB), 0, None
    bounds = []
    for size in cuts:
        bounds.append((pos, min(pos + size, len(frames))))
        pos = min(pos + size, len(frames))
    bounds.append((pos, len(frames)))
    for i, (a, b) in enumerate(bounds):
        final = stitcher.push(a, frames[a:b], last=i == len(bounds) - 1).final
    whole = TranscriptStitcher(VOCAB).push(0, frames, last=True).final
    assert final == whole


def test_flush_finalises_an_open_utterance_once() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    stitcher.push(0, ids("HH_A"))
    words = [{"word": "HA", "start": 0.0, "end": 0.08}]
    assert stitcher.flush() == {"text": "HA", "start": 0.0, "end": 0.08, "words": words}
    assert stitcher.flush() is None


def test_words_carry_the_frames_of_their_characters() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    update = stitcher.push(0, ids("__HH_E__ _TT_A__"), last=True)
    assert update.final["words"] == [
        {"word": "HE", "start": 0.04, "end": 0.12},  # H at frames 2-3, E at 5
        {"word": "TA", "start": 0.2, "end": 0.28},  # T at 10-11, A at 13
    ]


GAP = "_" * 12  # longer than LATE_FRAMES: what the model emits late still counts


def test_a_turn_end_cuts_the_utterance_inside_a_chunk() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    update = stitcher.push(0, ids("HE" + GAP + "TA__"), ends=[4])
    assert update.final["text"] == "HE" and update.final["end"] == 0.08  # where silence began
    assert update.partial == "TA"
    assert stitcher.flush()["text"] == "TA"


def test_letters_emitted_late_stay_with_their_utterance() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    update = stitcher.push(0, ids("HE___A" + GAP + "TA"), ends=[3])  # A: 60 ms after the end
    assert update.final["text"] == "HEA" and update.partial == "TA"


def test_turns_that_end_in_one_chunk_give_a_final_each() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    update = stitcher.push(0, ids("HE" + GAP + "TA" + GAP + "LO"), ends=[3, 17])
    assert [f["text"] for f in update.finals] == ["HE", "TA"]
    event = update.to_event()
    assert event["finals"] == update.finals  # and, for clients that read one, both as one:
    assert event["final"]["text"] == "HE TA" and event["final"]["end"] == 0.34
    assert update.partial == "LO" and stitcher.flush()["text"] == "LO"


def test_a_turn_that_ended_before_the_chunk_ends_at_its_frame() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    stitcher.push(0, ids("HE__"))
    update = stitcher.push(4, ids(GAP + "TA"), ends=[2])  # known late: the silence began at 2
    assert update.final == {
        "text": "HE", "start": 0.0, "end": 0.04,
        "words": [{"word": "HE", "start": 0.0, "end": 0.04}],
    }  # fmt: skip
    assert update.partial == "TA"


def test_a_pause_between_characters_breaks_a_word() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    voiced = [True] * 3 + [False] * 10 + [True] * 3
    update = stitcher.push(0, ids("HE" + "_" * 11 + "TA_"), last=True, voiced=voiced)
    assert update.final["text"] == "HE TA"
    assert update.final["words"] == [
        {"word": "HE", "start": 0.0, "end": 0.06},  # voiced until frame 3
        {"word": "TA", "start": 0.26, "end": 0.32},
    ]
    short = TranscriptStitcher(VOCAB)
    voiced = [True] * 3 + [False] * 9 + [True] * 3  # 180 ms: not a pause
    assert (
        short.push(0, ids("HE" + "_" * 10 + "TA_"), last=True, voiced=voiced).final["text"]
        == "HETA"
    )


def test_greedy_gives_each_word_once_the_next_has_begun() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    first = stitcher.push(0, ids("HE_ _T"))
    assert first.words == [{"word": "HE", "start": 0.0, "end": 0.04}]  # TA has begun
    second = stitcher.push(6, ids("A_ LO_"))
    assert second.words == [{"word": "TA", "start": 0.1, "end": 0.14}]
    assert [w["word"] for w in stitcher.flush()["words"]] == ["HE", "TA", "LO"]  # all again
    assert "words" not in TranscriptStitcher(VOCAB).push(0, ids("HE")).to_event()


def test_a_last_letter_emitted_in_the_pause_does_not_stretch_its_word() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    voiced = [True] * 4 + [False] * 8
    update = stitcher.push(0, ids("HE______A___"), last=True, voiced=voiced)  # A at frame 8
    assert update.final["words"] == [{"word": "HEA", "start": 0.0, "end": 0.08}]  # voice: 0-3
