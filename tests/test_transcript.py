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
    return stitcher.push(0, frames, speech=True, last=True).final["text"]


def test_greedy_ctc_collapses_repeats_and_drops_blanks() -> None:
    assert whole_decode(ids("HH_EE_LL_L_OO__ _THE")) == "HELLO THE"


def test_a_character_held_across_a_chunk_boundary_is_not_doubled() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    a = stitcher.push(0, ids("HHEE"), speech=True)
    b = stitcher.push(4, ids("EELL_L"), speech=True)
    c = stitcher.push(10, ids("O__"), speech=False)
    assert (a.text, b.text, c.text) == ("HE", "LL", "O")
    assert b.partial == "HELL" and c.final == {"text": "HELLO", "start": 0.0, "end": 0.26}
    assert c.partial == ""


def test_sentence_markers_and_unknowns_are_silent() -> None:
    frames = [ID["<s>"], ID["H"], ID["<unk>"], ID["A"], ID["</s>"]]
    assert whole_decode(frames) == "HA"


def test_a_gap_breaks_the_repeat_collapse() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    stitcher.push(0, ids("LL"), speech=True)
    stitcher.gap()  # chunks skipped in between: the next L is a new character
    assert stitcher.push(50, ids("LL"), speech=True).partial == "LL"


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
        final = stitcher.push(a, frames[a:b], speech=True, last=i == len(bounds) - 1).final
    whole = TranscriptStitcher(VOCAB).push(0, frames, speech=True, last=True).final
    assert final == whole


def test_flush_finalises_an_open_utterance_once() -> None:
    stitcher = TranscriptStitcher(VOCAB)
    stitcher.push(0, ids("HH_A"), speech=True)
    assert stitcher.flush() == {"text": "HA", "start": 0.0, "end": 0.08}
    assert stitcher.flush() is None
