"""Persisted session context: what a store offers, and its two backends.

What a session leaves behind: its metadata and settings, its analysis timeline (per chunk: time
range, every analyser's fields, the event that reported it), the other events it sent (for a
client that resumes after `last_event`), its generations (record and clip) and its errors. The
server calls the `record_*` methods from the event loop; they only enqueue (writer.py) and a
writer thread commits them in batches; `committed` counts what is durably in, for acks.

- `SqliteStore` (sqlite.py): one file in `--data-dir`, the embedded default, one server.
- `PostgresStore` (postgres.py): `--store postgresql://...`, shared by several front-ends, with
  leases (leases.py) deciding which one serves a session.

Both apply their versioned migrations (migrations.py, sql/) when opened.
"""

from __future__ import annotations

import time
from typing import Any, Protocol


class Store(Protocol):
    """What the server needs of a store (both backends; tests run against each)."""

    where: str  # the database, for logs and /healthz
    enqueued: int  # writes accepted by record_*
    committed: int  # of those, durably written: acks wait for them
    failing: bool  # the database cannot be reached just now: writes wait

    def record_session(self, session: str, info: dict[str, Any]) -> None: ...
    def record_analysis(
        self, session: str, seq: int, start: float, end: float, fields: dict[str, Any],
        event: dict[str, Any],
    ) -> None: ...  # fmt: skip
    def record_event(self, session: str, event: dict[str, Any]) -> None: ...
    def record_generation(
        self, session: str, number: int, record: dict[str, Any], audio: str | None
    ) -> None: ...
    def record_patterns(self, session: str, seq: int, findings: dict[str, Any]) -> None: ...
    def record_error(self, session: str, event: dict[str, Any]) -> None: ...
    def record_end(self, session: str, summary: dict[str, Any]) -> None: ...
    def record_context(self, session: str, start: int, pcm: bytes) -> None: ...
    def release(self, session: str) -> None: ...
    def flush(self, timeout: float = 30.0) -> bool: ...
    def keep_clip(self, session: str, number: int, flac: bytes) -> str: ...
    def clip(self, session: str, number: int) -> bytes | None: ...
    def unended(self) -> list[str]: ...
    def resume_point(self, session: str, after_n: int = 0) -> dict[str, Any] | None: ...
    def sessions(self) -> list[dict[str, Any]]: ...
    def session(self, session: str) -> dict[str, Any] | None: ...
    def timeline(self, session: str, start: float, end: float) -> list[dict[str, Any]]: ...
    def ended_sessions(self) -> list[tuple[str, float]]: ...
    def audio_bytes(self, session: str | None = None) -> int: ...
    def delete(self, session: str) -> bool: ...
    def close(self) -> None: ...


def apply_retention(store: Store, max_days: float, max_gb: float) -> int:
    """Delete ended sessions older than `max_days`, then the oldest ended ones while the
    generated audio exceeds `max_gb`. Returns how many sessions went. Blocking."""
    removed = 0
    cutoff = time.time() - max_days * 86400
    ended = store.ended_sessions()
    for session, started in ended:
        if started < cutoff and store.delete(session):
            removed += 1
    # One sum of the audio; each deleted session's clips come off the total.
    total, limit = store.audio_bytes(), max_gb * 1e9
    for session, _ in ended:
        if total <= limit:
            break
        size = store.audio_bytes(session)
        if store.delete(session):
            removed += 1
            total -= size
    return removed


from stream.store.postgres import PostgresStore  # noqa: E402
from stream.store.sqlite import SqliteStore  # noqa: E402
from stream.store.writer import StoreUnavailable  # noqa: E402

__all__ = ["PostgresStore", "SqliteStore", "Store", "StoreUnavailable", "apply_retention"]
