"""Close codes and protocol errors: what the server answers bad input with (a typed `error`
event, and for a fatal one a close code)."""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    ABNORMAL = 1006  # never sent: the connection broke without a close frame
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # the server is going: resume the session (another one has it)
    TRY_AGAIN_LATER = 1013


class ProtocolError(Exception):
    """Bad input from a client. `close_code` None means recoverable: the session stays open."""

    def __init__(self, code: str, message: str, close_code: CloseCode | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code

    @property
    def fatal(self) -> bool:
        return self.close_code is not None

    def to_event(self, session: str | None) -> dict[str, Any]:
        return error_event(session, self.code, self.message, self.fatal)


def error_event(session: str | None, code: str, message: str, fatal: bool) -> dict[str, Any]:
    return {"type": "error", "session": session, "code": code, "message": message, "fatal": fatal}
