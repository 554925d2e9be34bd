"""Access checks shared by the transports: the Origin allow-list and the shared token."""

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


def same_token(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
