"""The sessions' HTTP API: what was kept of past and live sessions.

    GET    /v1/sessions                              every stored session, newest first
    GET    /v1/sessions/{id}                         one: info, summary, generations, errors
    GET    /v1/sessions/{id}/timeline?from=&to=      its analysis timeline (seconds)
    GET    /v1/sessions/{id}/generations/{n}.wav     a clip (a live session's, or a stored one)
    DELETE /v1/sessions/{id}                         forget a session that is not live
    GET    /v1/pipelines                             the named pipelines sessions may ask for

Every route is guarded (`stream.transports.access.guarded`): the Origin allow-list, then the token
when the server has one. Odd input is a 4xx with a typed error, never a 500: a session id that
cannot be one (the protocol's rule: 1-64 of A-Z a-z 0-9 _ -) or a clip number out of range is 404
`not_found`, a `from`/`to` that is not a number (NaN included) is 400 `invalid_range`.

The store's reads run in a worker thread: the event loop never waits for the disk.
"""

from __future__ import annotations

import asyncio
import io
import math
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stream.protocol import SESSION_ID  # the one rule for session ids
from stream.session import SessionManager
from stream.transports.access import guarded

# Clip numbers are 4-byte fields of the binary audio frames (protocol.md, section 9).
MAX_GENERATION_NUMBER = 2**32 - 1
_NUMBER = re.compile(r"[0-9]{1,10}")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "code": code, "message": message}, status)


def _session_id(request: Request) -> str | None:
    """The path's session id, or None where it cannot be one."""
    session = request.path_params["session"]
    return session if SESSION_ID.fullmatch(session) else None


def _no_session() -> JSONResponse:
    return _error(404, "not_found", "no such session")


def _store_or_refusal(request: Request) -> Any:
    """The store, or the response that refuses the request (nothing persisted)."""
    store = request.app.state.sessions.store
    if store is None:
        return _error(404, "not_persisted", "this server keeps no sessions (--persist false)")
    return store


async def list_sessions(request: Request) -> Response:
    store = _store_or_refusal(request)
    if isinstance(store, Response):
        return store
    manager: SessionManager = request.app.state.sessions
    found = await asyncio.to_thread(store.sessions)
    return JSONResponse([{**s, "live": manager.is_live(s["id"])} for s in found])


async def get_session(request: Request) -> Response:
    store = _store_or_refusal(request)
    if isinstance(store, Response):
        return store
    session = _session_id(request)
    if session is None:
        return _no_session()
    found = await asyncio.to_thread(store.session, session)
    if found is None:
        return _error(404, "not_found", f"no session {session!r}")
    return JSONResponse({**found, "live": request.app.state.sessions.is_live(session)})


async def get_timeline(request: Request) -> Response:
    store = _store_or_refusal(request)
    if isinstance(store, Response):
        return store
    session = _session_id(request)
    if session is None:
        return _no_session()
    try:
        start = float(request.query_params.get("from", 0.0))
        end = float(request.query_params.get("to", float("inf")))
    except ValueError:
        start = end = math.nan
    if math.isnan(start) or math.isnan(end):
        return _error(400, "invalid_range", "from and to are seconds")
    entries = await asyncio.to_thread(store.timeline, session, start, end)
    return JSONResponse(entries)


async def generation_wav(request: Request) -> Response:
    """16-bit WAV at 16 kHz: from a live session's recent clips, else from the store."""
    import soundfile as sf

    from models.generation import SAMPLE_RATE as GENERATED_RATE  # the generator's own rate

    sessions: SessionManager = request.app.state.sessions
    session_id, text = _session_id(request), request.path_params["number"]
    number = int(text) if _NUMBER.fullmatch(text) else -1
    if session_id is None or not 0 <= number <= MAX_GENERATION_NUMBER:
        return _error(404, "not_found", "no such clip")
    live = sessions.sessions.get(session_id)
    audio = None
    if live is not None and live.generation is not None:
        audio = live.generation.clips.get(number)
    if audio is None and sessions.store is not None:
        flac = await asyncio.to_thread(sessions.store.clip, session_id, number)
        if flac is not None:
            audio, _ = await asyncio.to_thread(sf.read, io.BytesIO(flac), dtype="float32")
    if audio is None:
        return _error(404, "not_found", f"no clip {number} of a session {session_id!r}")
    buffer = io.BytesIO()
    sf.write(buffer, audio, GENERATED_RATE, format="WAV", subtype="PCM_16")
    name = f"{session_id}-gen{number}.wav"
    return Response(
        buffer.getvalue(),
        media_type="audio/wav",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


async def delete_session(request: Request) -> Response:
    store = _store_or_refusal(request)
    if isinstance(store, Response):
        return store
    session = _session_id(request)
    if session is None:
        return _no_session()
    if request.app.state.sessions.is_live(session):
        return _error(409, "session_live", "the session is live: end it first")
    if not await asyncio.to_thread(store.delete, session):
        return _error(404, "not_found", f"no session {session!r}")
    return Response(status_code=204)


async def list_pipelines(request: Request) -> Response:
    manager: SessionManager = request.app.state.sessions
    return JSONResponse(
        {
            "default": manager.settings.pipeline,
            "pipelines": {name: p.describe() for name, p in sorted(manager.pipelines.items())},
        }
    )


ROUTES = [
    Route("/v1/pipelines", guarded(list_pipelines)),
    Route("/v1/sessions", guarded(list_sessions)),
    Route("/v1/sessions/{session}", guarded(get_session)),
    Route("/v1/sessions/{session}", guarded(delete_session), methods=["DELETE"]),
    Route("/v1/sessions/{session}/timeline", guarded(get_timeline)),
    # {number} as text: any clip path gets the guard, then a typed 404 when it is out of range
    Route("/v1/sessions/{session}/generations/{number}.wav", guarded(generation_wav)),
]
