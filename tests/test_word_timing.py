"""Word timings and end-of-speech settings, through a real server with the shipped model.

The truth: held-out sentences of the old grammar (words the model was trained on: the
timings, not the vocabulary, are under test here) spoken one word at a time by espeak-ng, each
word trimmed to its sound and joined with 250 ms pauses, so every word's start and end are
known to the sample. Streamed over our protocol, the finals' words must fall within 60 ms of it:
nearly every start, and most ends (CTC emits a letter anywhere in its sound, sometimes in the
pause after the word; the server ends words where voice activity stops, and Silero's needs
~100 ms to wake at the start of a stream). The figures are printed for the closing note.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from clients.stream_client import StreamClient
from models.training.corpus import heldout_sentences
from models.training.synth import Voice, synthesize
from tests.conftest import RunningServer, run_server
from tests.test_websocket import blocks_of

VOICE = Voice(base="en-us", variant="", speed=160, pitch=50)
RATE, PAUSE = 16000, 0.25
TOLERANCE = 0.06


@pytest.fixture(scope="module")
def trained_server() -> Iterator[RunningServer]:
    with run_server(analysis_model="tiny") as running:
        yield running


def trimmed(audio: np.ndarray) -> np.ndarray:
    """Only the sound: espeak-ng pads its speech with silence."""
    loud = np.flatnonzero(np.abs(audio) > 0.005)
    return audio[loud[0] : loud[-1] + 1]


def spoken_word_by_word(sentence: str) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """The sentence's words, each trimmed to its sound, with pauses; and (word, start, end)."""
    parts, truth, at = [np.zeros(int(0.3 * RATE), np.float32)], [], 0.3
    for word in sentence.split():
        audio = trimmed(synthesize(word, VOICE))
        truth.append((word, at, at + len(audio) / RATE))
        parts += [audio, np.zeros(int(PAUSE * RATE), np.float32)]
        at += len(audio) / RATE + PAUSE
    parts.append(np.zeros(RATE, np.float32))
    return np.concatenate(parts), truth


async def finals(server: RunningServer, audio: np.ndarray, **config: object) -> list[dict]:
    client = StreamClient(server.ws, RATE, 1, config={"when_behind": "wait", **config})
    result = await client.run(blocks_of(audio[:, None], RATE // 10), realtime=False)
    found = [e["transcript"]["final"] for e in result.analysis if e["transcript"]["final"]]
    end = result.end["transcript"]["final"]
    return found + ([end] if end else [])


async def test_words_fall_within_60_ms_of_where_they_were_spoken(
    trained_server: RunningServer,
) -> None:
    start_errors, end_errors, spoken = [], [], 0
    for sentence in heldout_sentences()[:6]:
        audio, truth = spoken_word_by_word(sentence)
        words = [w for final in await finals(trained_server, audio) for w in final["words"]]
        for word, start, end in truth:
            spoken += 1
            match = next(
                (w for w in words if w["word"] == word and abs(w["start"] - start) < 0.3), None
            )
            if match is not None:
                start_errors.append(match["start"] - start)
                end_errors.append(match["end"] - end)
    starts, ends = np.abs(start_errors), np.abs(end_errors)
    within = float(np.mean(ends <= TOLERANCE))
    print(
        f"\nword timing: {len(starts)}/{spoken} words recognised; start error mean "
        f"{np.mean(start_errors) * 1000:+.0f} ms, max {starts.max() * 1000:.0f} ms; end error "
        f"mean {np.mean(end_errors) * 1000:+.0f} ms, within 60 ms: {within:.0%}, max "
        f"{ends.max() * 1000:.0f} ms"
    )
    # Words spoken alone, with no sentence around them, are the model's hardest case: the
    # shipped model recognises two in three of these (33/49); the timings are the point here.
    assert len(starts) >= 0.6 * spoken
    # Nearly every start (measured: all but one of 33, that one at 60.5 ms: a word after a
    # misheard one, whose letters came a frame late).
    assert np.mean(starts <= TOLERANCE + 1e-9) >= 0.95 and starts.max() <= 0.08
    assert within >= 0.8 and ends.max() <= 0.35


async def test_finals_follow_the_sessions_end_of_speech_setting(
    trained_server: RunningServer,
) -> None:
    """Two sentences 0.8 s apart: one utterance each when 500 ms of silence ends a turn, one
    for both when it takes 1200 ms; the words are the same either way."""
    first, second = (trimmed(synthesize(s, VOICE)) for s in heldout_sentences()[2:4])
    audio = np.concatenate([first, np.zeros(int(0.8 * RATE), np.float32), second,
                            np.zeros(2 * RATE, np.float32)])  # fmt: skip
    # Greedy: each frame's letter is its own, so the words cannot depend on where a turn ends
    # (beam search with the LM may spell the first turn's last word differently when the
    # second follows it in the same utterance).
    greedy = {"ctc_decoder": "greedy"}
    short = await finals(trained_server, audio, turn_detection={"min_silence_ms": 500}, **greedy)
    long = await finals(trained_server, audio, turn_detection={"min_silence_ms": 1200}, **greedy)
    assert len(short) == 2 and len(long) == 1
    assert " ".join(f["text"] for f in short) == long[0]["text"]
    gap_start = len(first) / RATE
    assert short[0]["end"] == pytest.approx(gap_start, abs=0.15)  # where the silence began
    off = await finals(trained_server, audio, turn_detection={"enabled": False})
    assert len(off) == 1  # only the end of the stream ends it
