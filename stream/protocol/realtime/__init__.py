"""The OpenAI Realtime API's transcription sessions (`/v1/realtime`), spoken by a translator
without I/O: config.py reads the session configuration in both of the API's forms,
translator.py turns client events into session requests and session events into the API's."""

from stream.protocol.realtime.config import RealtimeConfig, RealtimeError
from stream.protocol.realtime.translator import (
    Append,
    Clear,
    Commit,
    Configure,
    Request,
    Translator,
)

__all__ = [
    "Append", "Clear", "Commit", "Configure", "RealtimeConfig", "RealtimeError", "Request",
    "Translator",
]  # fmt: skip
