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
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session"):
            record.session = current_session.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "session", None):
            entry["session"] = record.session
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        session = getattr(record, "session", None)
        return f"{line} [session {session}]" if session else line


def configure(level: str, fmt: str) -> None:
    """The root logger for the server process: every library's records in one format."""
    handler = logging.StreamHandler()
    handler.addFilter(SessionFilter())
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else TextFormatter("%(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
