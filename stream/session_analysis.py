"""One chunk through a session's analysis engines: the engines run side by side, their fields
merge into one event's, a model failure is reported (not raised), and the CTC tokens become
the stitched transcript. Session (stream/session.py) decides what to do with the result."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from stream.core.chunker import Window
from stream.core.transcript import TranscriptStitcher
from stream.engines.analysis import AnalysisEngine, AnalysisFailed
from stream.protocol import ANALYSIS_SAMPLE_RATE
from stream.timing import ChunkTiming


async def analyse_chunk(
    engines: Sequence[AnalysisEngine], window: Window, timing: ChunkTiming | None
) -> tuple[dict[str, Any], list[str]]:
    """Every engine's fields for the window, merged; and a message per engine that failed on
    it (the others' fields still count). Anything but a model failure is raised."""
    results = await asyncio.gather(
        *(
            engine.analyse(window, timing.stamps_for(engine.name) if timing else None)
            for engine in engines
        ),
        return_exceptions=True,
    )
    fields: dict[str, Any] = {}
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
            fields.update(result)
    return fields, failures


def stitch_transcript(
    stitcher: TranscriptStitcher | None, fields: dict[str, Any], skipped: int, last: bool
) -> None:
    """The window's CTC tokens (`ctc`, never sent) -> the event's `transcript` field."""
    frames = fields.pop("ctc", None)
    if stitcher is None or frames is None:
        return
    if skipped:
        stitcher.gap()
    speech = fields.get("vad", {}).get("speech")
    update = stitcher.push(frames["first_frame"], frames["tokens"], speech, last)
    fields["transcript"] = update.to_event()
