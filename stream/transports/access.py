"""Access checks shared by the transports: the Origin allow-list and the shared token, one rule
each for every transport."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from stream.protocol import CloseCode, ProtocolError
from stream.settings import Settings


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


def check_token(
    settings: Settings,
    offered: str | None,
    in_message: str | None = None,
    message: str = "the start message",
) -> None:
    """The token rule. A token offered with the request (header or query) must be the server's;
    without one, the token in the first `message` (`start`, or the WebRTC offer) must be. Raises
    ProtocolError `unauthorized` otherwise; nothing is checked when the server has no token."""
    expected = settings.token.get_secret_value() if settings.token else None
    if expected is None:
        return
    if offered is not None:
        if not _same(offered, expected):
            raise ProtocolError(
                "unauthorized", "the token is not valid", CloseCode.POLICY_VIOLATION
            )
    elif not (in_message and _same(in_message, expected)):
        raise ProtocolError(
            "unauthorized",
            "this server needs a token: an 'Authorization: Bearer' header, ?token=, or "
            f"'token' in {message}",
            CloseCode.POLICY_VIOLATION,
        )


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
