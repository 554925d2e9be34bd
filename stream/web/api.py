"""The sessions' HTTP API: what was kept of past and live sessions.

    GET    /v1/sessions                              every stored session, newest first
    GET    /v1/sessions/{id}                         one: info, summary, generations, errors
    GET    /v1/sessions/{id}/timeline?from=&to=      its analysis timeline (seconds)
    GET    /v1/sessions/{id}/generations/{n}.wav     a clip (a live session's, or a stored one)
    DELETE /v1/sessions/{id}                         forget a session that is not live
    GET    /v1/pipelines                             the named pipelines sessions may ask for

The store's reads run in a worker thread: the event loop never waits for the disk.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stream.protocol import ProtocolError
from stream.session import SessionManager
from stream.transports.access import check_token, offered_token


def _refused(request: Request) -> JSONResponse | None:
    try:  # the transports' token rule, with nowhere else for the token to be
        offered = offered_token(request.headers, request.query_params)
        check_token(request.app.state.sessions.settings, offered)
    except ProtocolError as exc:
        return _error(401, exc.code, "a token is needed")
    return None


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "code": code, "message": message}, status)


def _store_or_refusal(request: Request) -> Any:
    """The store, or the response that refuses the request (no token, nothing persisted)."""
    if refused := _refused(request):
        return refused
    store = request.app.state.sessions.store
    if store is None:
        return _error(404, "not_persisted", "this server keeps no sessions (--persist false)")
    return store


async def list_sessions(request: Request) -> Response:
    store = _store_or_refusal(request)
    if isinstance(store, Response):
        return store
    live = request.app.state.sessions.sessions
    found = await asyncio.to_thread(store.sessions)
    return JSONResponse([{**s, "live": s["id"] in live} for s in found])


async def get_session(request: Request) -> Response:
    store = _store_or_refusal(request)
    if isinstance(store, Response):
        return store
    session = request.path_params["session"]
    found = await asyncio.to_thread(store.session, session)
    if found is None:
        return _error(404, "not_found", f"no session {session!r}")
    return JSONResponse({**found, "live": session in request.app.state.sessions.sessions})


async def get_timeline(request: Request) -> Response:
    store = _store_or_refusal(request)
    if isinstance(store, Response):
        return store
    try:
        start = float(request.query_params.get("from", 0.0))
        end = float(request.query_params.get("to", float("inf")))
    except ValueError:
        return _error(400, "invalid_range", "from and to are seconds")
    entries = await asyncio.to_thread(store.timeline, request.path_params["session"], start, end)
    return JSONResponse(entries)


async def generation_wav(request: Request) -> Response:
    """16-bit WAV at 16 kHz: from a live session's recent clips, else from the store."""
    import soundfile as sf

    from models.generation import SAMPLE_RATE as GENERATED_RATE  # the generator's own rate

    if refused := _refused(request):
        return refused
    sessions: SessionManager = request.app.state.sessions
    session_id, number = request.path_params["session"], request.path_params["number"]
    live = sessions.sessions.get(session_id)
    audio = None
    if live is not None and live.generation is not None:
        audio = live.generation.clips.get(number)
    if audio is None and sessions.store is not None:
        path = await asyncio.to_thread(sessions.store.generation_audio, session_id, number)
        if path is not None and path.is_file():
            audio, _ = await asyncio.to_thread(sf.read, path, dtype="float32")
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
    session = request.path_params["session"]
    if session in request.app.state.sessions.sessions:
        return _error(409, "session_live", "the session is live: end it first")
    if not await asyncio.to_thread(store.delete, session):
        return _error(404, "not_found", f"no session {session!r}")
    return Response(status_code=204)


async def list_pipelines(request: Request) -> Response:
    if refused := _refused(request):
        return refused
    manager: SessionManager = request.app.state.sessions
    return JSONResponse(
        {
            "default": manager.settings.pipeline,
            "pipelines": {name: p.describe() for name, p in sorted(manager.pipelines.items())},
        }
    )


ROUTES = [
    Route("/v1/pipelines", list_pipelines),
    Route("/v1/sessions", list_sessions),
    Route("/v1/sessions/{session}", get_session),
    Route("/v1/sessions/{session}", delete_session, methods=["DELETE"]),
    Route("/v1/sessions/{session}/timeline", get_timeline),
    Route("/v1/sessions/{session}/generations/{number:int}.wav", generation_wav),
]
