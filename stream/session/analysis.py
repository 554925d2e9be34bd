"""One chunk through a session's analysis engines: the engines run side by side, their fields
merge into one event's, a model failure is reported (not raised), and the CTC frames become
the stitched transcript. Session (stream/session/session.py) decides what to do with the result."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from models.base import CtcFrames
from models.char_lm import LanguageModelFolder
from models.frames import STRIDE as FRAME_SAMPLES
from stream.core.audio.chunker import Window
from stream.core.audio.turns import TurnDetector
from stream.core.text.ctc_beam import BeamSettings, BeamTranscriptStitcher, CtcBeamDecoder
from stream.core.text.transcript import CtcVocabulary, TranscriptStitcher
from stream.engines.analysis import AnalysisEngine, AnalysisFailed
from stream.protocol import ANALYSIS_SAMPLE_RATE, commit_event
from stream.session.timing import ChunkTiming


async def analyse_chunk(
    engines: Sequence[AnalysisEngine], window: Window, timing: ChunkTiming | None, live: bool
) -> tuple[dict[str, Any], CtcFrames | None, list[str]]:
    """Every engine's fields for the window, merged; the CTC frames of the first engine that
    gives them; and a message per engine that failed on it (the others' fields still count).
    `live`: the session sends at about real time. Anything but a model failure is raised."""
    results = await asyncio.gather(
        *(
            engine.analyse(window, timing.stamps_for(engine.name) if timing else None, live)
            for engine in engines
        ),
        return_exceptions=True,
    )
    fields: dict[str, Any] = {}
    ctc: CtcFrames | None = None
    failures = []
    for engine, result in zip(engines, results):
        if isinstance(result, AnalysisFailed):
            failures.append(
                f"{engine.name} failed on {window.start / ANALYSIS_SAMPLE_RATE:.3f}-"
                f"{window.end / ANALYSIS_SAMPLE_RATE:.3f} s: {result}"
            )
        elif isinstance(result, BaseException):
            raise result
        else:
            fields.update(result.fields)
            if ctc is None:  # the first CTC engine's, as transcript_stitcher takes
                ctc = result.ctc
    return fields, ctc, failures


Stitcher = TranscriptStitcher | BeamTranscriptStitcher
# A word ends where speech stops: Silero's probability falls slowly after a word, so a frame
# counts as voiced for this only well above the turn threshold. Measured on single words with
# pauses (tests/test_word_timing.py): ends within 60 ms of the truth for 74% of the words at
# 0.5, 85% at 0.8, 87% at 0.9.
WORD_VOICING = 0.8


def fields_to_send(
    fields: dict[str, Any], kept: Sequence[str] | None, embeddings: bool
) -> dict[str, Any]:
    """What the client asked to receive of a chunk's fields (`fields` is left whole): those
    its pipeline `kept` (None: all), embeddings only if it asked for them (they are large)."""
    sent = {k: v for k, v in fields.items() if kept is None or k in kept}
    if not embeddings:
        sent = {
            k: {f: x for f, x in v.items() if f != "embedding"} if isinstance(v, dict) else v
            for k, v in sent.items()
        }
    return sent


def detect_turns(detector: TurnDetector, window: Window, fields: dict[str, Any]) -> list[int]:
    """The chunk's voice activity (per 20 ms, from the DSP analyser) through the session's
    turn detection: the turns found go into the event (`turns`); returns the frames where
    turns ended, where the transcript cuts its utterances."""
    vad = fields.get("vad")
    if not isinstance(vad, dict):
        return []
    turns = detector.push(window.start // FRAME_SAMPLES, vad.get("frames", ()))
    if turns:
        fields["turns"] = [turn.to_event() for turn in turns]
    return [turn.frame for turn in turns if turn.kind == "stopped"]


def beam_decoder(
    vocabulary: CtcVocabulary, decoder: str, width: int, language_model: LanguageModelFolder | None
) -> CtcBeamDecoder | None:
    """The beam search `decoder` asks for (the --ctc-decoder setting); None: greedy. beam: with
    the model's character LM if it has one; auto: beam search only with an LM."""
    lm = language_model
    if decoder == "greedy" or (decoder == "auto" and lm is None):
        return None
    settings = BeamSettings(width, lm.alpha, lm.beta) if lm else BeamSettings(width)
    return CtcBeamDecoder(vocabulary, settings, lm.lm if lm else None)


def transcript_stitcher(
    engines: Sequence[AnalysisEngine], decoder: str, beam_width: int
) -> Stitcher | None:
    """The session's CTC decoding, from the first CTC engine; None without one."""
    for engine in engines:
        tokens = engine.info.ctc_vocabulary
        if tokens is None:
            continue
        vocabulary = CtcVocabulary.from_tokens(*tokens)
        # Beam search reads each frame's log-probabilities: an analyser that gives argmax tokens
        # only is decoded greedily whatever was asked.
        if not engine.info.ctc_log_probs:
            return TranscriptStitcher(vocabulary)
        beam = beam_decoder(vocabulary, decoder, beam_width, engine.info.language_model)
        return TranscriptStitcher(vocabulary) if beam is None else BeamTranscriptStitcher(beam)
    return None


async def commit_transcript(
    session: str, stitcher: Stitcher | None, detector: TurnDetector, at: int
) -> dict[str, Any]:
    """The client committed its turn at timeline sample `at`, after the chunks analysed so
    far: the turn under way (if any) and the utterance end there. Returns the `commit` event,
    with the utterance's transcript (as in an analysis event; none without a CTC model)."""
    frame = at // FRAME_SAMPLES
    turn = detector.cut(frame)
    turns = [turn.to_event()] if turn is not None else []
    if stitcher is None:
        return commit_event(session, at, None, turns)
    if isinstance(stitcher, BeamTranscriptStitcher):  # finishing a beam is Python work
        update = await asyncio.to_thread(stitcher.push, frame, [], [frame])
    else:
        update = stitcher.push(frame, [], [frame])
    return commit_event(session, at, update.to_event(), turns)


async def stitch_transcript(
    stitcher: Stitcher | None,
    fields: dict[str, Any],
    frames: CtcFrames | None,
    skipped: int,
    ends: Sequence[int],
    last: bool,
) -> None:
    """The window's CTC frames -> the event's `transcript` field; an utterance ends at each
    frame of `ends` (where turns ended) and at the `last` chunk. The chunk's voice activity
    places the ends of words (WORD_VOICING)."""
    if stitcher is None or frames is None:
        return
    if skipped:
        stitcher.gap()
    vad = fields.get("vad")
    voiced = [p >= WORD_VOICING for p in vad.get("frames", ())] if isinstance(vad, dict) else None
    if isinstance(stitcher, BeamTranscriptStitcher):
        log_probs = [] if frames.log_probs is None else frames.log_probs  # None: no frames
        # Beam search is Python work (a few ms per audio second): off the event loop.
        update = await asyncio.to_thread(
            stitcher.push, frames.first_frame, log_probs, ends, last, voiced or None
        )
    else:
        update = stitcher.push(frames.first_frame, frames.token_ids, ends, last, voiced or None)
    fields["transcript"] = update.to_event()
