"""Access checks shared by the transports: the Origin allow-list and the shared token, one rule
each for every transport, and `guarded`, the one guard of every protected HTTP route.

HTTP routes, and what guards them (docs/protocol.md, "Access"):

- open: `/` and the browser's other static files, `/healthz`, `/readyz` (load balancers; neither
  shows a session id);
- guarded (`guarded`: Origin, then the token, before the endpoint runs and so before any body is
  read): `/v1/status`, `/metrics`, `/v1/pipelines`, `/v1/sessions...`;
- `POST /v1/webrtc/offer` guards itself with the same pieces (`http_refusal`), since its token
  may also come in its body.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stream.protocol import CloseCode, ProtocolError
from stream.settings import Settings

# HTTP status of refusals over HTTP (typed JSON errors, `error_event`'s shape); others are 400.
HTTP_STATUS = {
    "unauthorized": 401,
    "origin_not_allowed": 403,
    "session_in_use": 409,
    "offer_too_large": 413,
    "server_busy": 503,
}


def check_origin(origin: str | None, settings: Settings) -> None:
    """Browsers send Origin; other clients need not. Raises ProtocolError when not allowed."""
    if settings.allowed_origins and origin is not None and origin not in settings.allowed_origins:
        raise ProtocolError(
            "origin_not_allowed", f"origin {origin!r} is not allowed", CloseCode.POLICY_VIOLATION
        )


def offered_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The token from `Authorization: Bearer ...` or `?token=`, if any."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return query.get("token")


def check_upgrade(
    headers: Mapping[str, str], query: Mapping[str, str], settings: Settings
) -> str | None:
    """A WebSocket upgrade: its Origin, then a token it offers (header or query), refused at
    once when wrong. Returns that token; None: the first message may bring one."""
    check_origin(headers.get("origin"), settings)
    offered = offered_token(headers, query)
    if offered is not None:
        check_token(settings, offered)
    return offered


def check_token(
    settings: Settings,
    offered: str | None,
    in_message: object = None,
    message: str = "the start message",
) -> None:
    """The token rule. A token offered with the request (header or query) must be the server's;
    without one, the token in the first `message` (`start`, or the WebRTC offer; "" where there
    is none, as for the HTTP API) must be. Raises ProtocolError `unauthorized` otherwise; nothing
    is checked when the server has no token."""
    expected = settings.token.get_secret_value() if settings.token else None
    if expected is None:
        return
    if offered is not None:
        if not _same(offered, expected):
            raise ProtocolError(
                "unauthorized", "the token is not valid", CloseCode.POLICY_VIOLATION
            )
    elif not (isinstance(in_message, str) and in_message and _same(in_message, expected)):
        ways = (
            f"an 'Authorization: Bearer' header, ?token=, or 'token' in {message}"
            if message
            else "an 'Authorization: Bearer' header or ?token="
        )
        raise ProtocolError(
            "unauthorized", f"this server needs a token: {ways}", CloseCode.POLICY_VIOLATION
        )


def http_refusal(request: Request, settings: Settings, token: bool = True) -> JSONResponse | None:
    """The response refusing `request`, or None: its Origin first, then (with `token`) the token
    of its header or query. Looks at the request line and headers only, never the body."""
    try:
        check_origin(request.headers.get("origin"), settings)
        if token:
            check_token(settings, offered_token(request.headers, request.query_params), None, "")
    except ProtocolError as error:
        return refusal(error)
    return None


def refusal(error: ProtocolError, status: int | None = None) -> JSONResponse:
    """A refusal as HTTP: the `error` event as JSON, with its status (400 when unknown)."""
    status = status or HTTP_STATUS.get(error.code, 400)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error.to_event(None), status, headers=headers)


Endpoint = Callable[[Request], Awaitable[Response]]


def guarded(endpoint: Endpoint) -> Endpoint:
    """`endpoint`, run only for a request that `http_refusal` lets through."""

    @functools.wraps(endpoint)
    async def guard(request: Request) -> Response:
        refused = http_refusal(request, request.app.state.settings)
        return refused if refused is not None else await endpoint(request)

    return guard


def _same(a: str, b: str) -> bool:
    # surrogatepass: a JSON string may hold a lone surrogate; it is simply not the token
    return hmac.compare_digest(_utf8(a), _utf8(b))


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")
