"""Server -> client: the JSON events and how they are encoded (non-finite numbers as null)."""

from __future__ import annotations

import json
import math
from typing import Any

from models.base import ANALYSIS_SAMPLE_RATE
from stream.protocol.messages import PROTOCOL_VERSION


def encode_event(event: dict[str, Any]) -> str:
    """An event as JSON text, which never fails on a number: a non-finite float (no analyser
    should make one, and input is clipped to full scale) is sent as null, so one odd value
    costs a field, not the session."""
    try:
        return json.dumps(event, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(event), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def ready_event(session: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "ready",
        "session": session,
        "protocol": PROTOCOL_VERSION,
        "analysis_sample_rate": ANALYSIS_SAMPLE_RATE,
        **fields,
    }


def analysis_event(
    session: str, seq: int, start: int, end: int, skipped: int, results: dict[str, Any]
) -> dict[str, Any]:
    """`start`/`end` arrive as analysis-rate sample positions and leave as seconds."""
    return {
        "type": "analysis",
        "session": session,
        "seq": seq,
        "start": start / ANALYSIS_SAMPLE_RATE,
        "end": end / ANALYSIS_SAMPLE_RATE,
        "skipped": skipped,
        **results,
    }


def commit_event(
    session: str, at: int, transcript: dict[str, Any] | None, turns: list[dict[str, Any]]
) -> dict[str, Any]:
    """The client's commit (/v1/realtime) reached analysis: the utterance ends at `at` (an
    analysis-rate sample position, sent as seconds); `transcript` as in `analysis`."""
    event: dict[str, Any] = {
        "type": "commit", "session": session, "at": at / ANALYSIS_SAMPLE_RATE, "turns": turns,
    }  # fmt: skip
    if transcript is not None:
        event["transcript"] = transcript
    return event


def ack_event(session: str, samples: int) -> dict[str, Any]:
    """The client's audio up to `samples` (its own rate) is safe here: analysed, and committed
    to storage when the server keeps context; the client may forget it."""
    return {"type": "ack", "session": session, "samples": samples}


def patterns_event(
    session: str, seq: int, window: dict[str, float], findings: dict[str, Any]
) -> dict[str, Any]:
    """What the pipeline's detectors found in the context `window` after chunk `seq`."""
    return {"type": "patterns", "session": session, "seq": seq, "window": window, **findings}


def end_event(
    session: str, samples_received: int, sample_rate: int, chunks: int, skipped: int
) -> dict[str, Any]:
    return {
        "type": "end",
        "session": session,
        "samples_received": samples_received,
        "seconds": samples_received / sample_rate,
        "chunks": chunks,
        "skipped": skipped,
    }


def generation_event(session: str, kind: str, generation: int, **fields: Any) -> dict[str, Any]:
    """`generation.queued|started|progress|done|cancelled|failed` of generation `generation`."""
    return {"type": f"generation.{kind}", "session": session, "id": generation, **fields}
