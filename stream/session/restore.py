"""Reading a session back from the store, for a front-end that goes on with it (after a
restart, or when it moves from another front-end).

It goes on after its last kept timeline entry, with its options and pipeline as they were (the
server's defaults may have changed since), its events numbered on, the events the store kept
after the client's `last_event` sent again first, and the rolling context it had if it moved on
purpose (a hand-over, a drain, a shutdown: stream/session/steps.py `KeptContext`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from stream.engines.analysis import AnalysisEngine
from stream.engines.generation import GenerationEngine
from stream.metrics import Metrics
from stream.pipeline import PipelineError, PipelineSpec, check
from stream.protocol import (
    ANALYSIS_SAMPLE_RATE,
    CloseCode,
    ProtocolError,
    SessionConfig,
    StartMessage,
)
from stream.session.options import Restored
from stream.session.session import Session
from stream.session.steps import KeptContext, timeline_entry
from stream.session.tracing import Tracer
from stream.settings import Settings
from stream.store import Store


async def read_back(
    store: Store,
    start: StartMessage,
    settings: Settings,
    engines: Sequence[AnalysisEngine],
    generator: GenerationEngine | None,
    metrics: Metrics | None,
    tracer: Tracer | None = None,
) -> Session:
    """The session `start` resumes, as the store has it (not yet attached to anything)."""
    assert start.session is not None
    point = await asyncio.to_thread(store.resume_point, start.session, max(start.last_event, 0))
    if point is None:
        raise ProtocolError(
            "session_not_found", f"no session {start.session!r} to resume",
            CloseCode.POLICY_VIOLATION,
        )  # fmt: skip
    info = point["info"]
    if info.get("resumable") is False:
        raise ProtocolError(
            "session_not_found",
            f"session {start.session!r} came over {info.get('transport')}, which has no resume",
            CloseCode.POLICY_VIOLATION,
        )
    kept = (info["sample_rate"], info["channels"], info["encoding"])
    if (start.sample_rate, start.channels, start.encoding.value) != kept:
        raise mismatch(*kept)
    # Its options as they were (the server's defaults may have changed), and its pipeline.
    config = {k: v for k, v in info["config"].items() if k not in ("pipeline", "generation")}
    config.update(info["options"])
    try:
        pipeline = check(PipelineSpec.model_validate(info["pipeline"]), [e.name for e in engines])
    except (PipelineError, ValueError) as exc:
        raise ProtocolError(
            "session_not_found", f"session {start.session!r} cannot go on here: {exc}",
            CloseCode.POLICY_VIOLATION,
        ) from None  # fmt: skip
    original = start.model_copy(update={"config": SessionConfig.model_validate(config)})
    last = point["last_seq"]
    restored = Restored(
        next_chunk=0 if last is None else last + 1, chunks=point["entries"],
        last_event=max(start.last_event, point["last_n"]), generations=point["generations"],
        replay=tuple(point["events"]), context=await kept_context(store, start.session, point),
    )  # fmt: skip
    return Session(
        start.session, original, settings, engines, pipeline, generator, metrics, "websocket",
        store, restored, tracer,
    )  # fmt: skip


async def kept_context(store: Store, session_id: str, point: dict[str, Any]) -> KeptContext | None:
    """The rolling context the session had when it moved, with its timeline entries."""
    kept = point.get("context")
    if kept is None or point["last_end"] is None:
        return None
    rate, start = ANALYSIS_SAMPLE_RATE, kept["start"]
    rows = await asyncio.to_thread(store.timeline, session_id, start / rate, point["last_end"])
    entries = tuple(
        timeline_entry(round(r["start"] * rate), round(r["end"] * rate), r) for r in rows
    )
    return KeptContext.from_pcm(start, kept["pcm"], entries)


def mismatch(rate: int, channels: int, encoding: str) -> ProtocolError:
    """A resume in another format than the session's (live, or kept in the store)."""
    return ProtocolError(
        "resume_mismatch",
        f"the session streams {rate} Hz, {channels} channel(s), {encoding}; resume with the "
        "same sample_rate, channels and encoding",
        CloseCode.POLICY_VIOLATION,
    )
