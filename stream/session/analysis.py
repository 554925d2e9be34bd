"""One chunk through a session's analysis engines: the engines run side by side, their fields
merge into one event's, a model failure is reported (not raised), and the CTC frames become
the stitched transcript. Session (stream/session/session.py) decides what to do with the result."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from models.base import CtcFrames
from models.char_lm import LanguageModelFolder
from stream.core.audio.chunker import Window
from stream.core.text.ctc_beam import BeamSettings, BeamTranscriptStitcher, CtcBeamDecoder
from stream.core.text.transcript import CtcVocabulary, TranscriptStitcher
from stream.engines.analysis import AnalysisEngine, AnalysisFailed
from stream.protocol import ANALYSIS_SAMPLE_RATE
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


async def stitch_transcript(
    stitcher: Stitcher | None,
    fields: dict[str, Any],
    frames: CtcFrames | None,
    skipped: int,
    last: bool,
) -> None:
    """The window's CTC frames -> the event's `transcript` field."""
    if stitcher is None or frames is None:
        return
    if skipped:
        stitcher.gap()
    speech = fields.get("vad", {}).get("speech")
    if isinstance(stitcher, BeamTranscriptStitcher):
        log_probs = [] if frames.log_probs is None else frames.log_probs  # None: no frames
        # Beam search is Python work (a few ms per audio second): off the event loop.
        update = await asyncio.to_thread(stitcher.push, frames.first_frame, log_probs, speech, last)
    else:
        update = stitcher.push(frames.first_frame, frames.token_ids, speech, last)
    fields["transcript"] = update.to_event()
