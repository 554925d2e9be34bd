"""Logging: plain text by default, or one JSON object per line (`--log-format json`) for log
collectors; either way each record made while a session is current carries its id."""

from __future__ import annotations

import contextvars
import datetime
import json
import logging

# The session the running code works for: set when a session starts; tasks started after that
# (its analysis loop, its finishing) inherit it.
current_session: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_session", default=None
)


class SessionFilter(logging.Filter):
    """Adds the current session's id, and this server's front-end id, to each record."""

    def __init__(self, frontend: str | None = None) -> None:
        super().__init__()
        self.frontend = frontend

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session"):
            record.session = current_session.get()
        record.frontend = self.frontend
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "frontend", None):
            entry["frontend"] = record.frontend
        if getattr(record, "session", None):
            entry["session"] = record.session
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        frontend = getattr(record, "frontend", None)
        session = getattr(record, "session", None)
        line = f"[{frontend}] {line}" if frontend else line
        return f"{line} [session {session}]" if session else line


def configure(level: str, fmt: str, frontend: str | None = None) -> None:
    """The root logger for the server process: every library's records in one format, each
    with `frontend` (this server's id among several; None: not shown)."""
    handler = logging.StreamHandler()
    handler.addFilter(SessionFilter(frontend))
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter("%(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
