"""What both stores' reads give: the session list's query (the same SQL in both dialects) and
the shape of its rows."""

from __future__ import annotations

from typing import Any

SESSION_LIST = (
    "SELECT s.id, s.started, s.ended, s.info, s.summary,"
    " (SELECT COUNT(*) FROM timeline t WHERE t.session = s.id),"
    " (SELECT COUNT(*) FROM generations g WHERE g.session = s.id)"
    " FROM sessions s ORDER BY s.started DESC"
)


def listed(
    id_: str, started: float, ended: float | None, info: Any, summary: Any, chunks: int, gens: int
) -> dict[str, Any]:
    """A line of the session list (`info` and `summary` decoded)."""
    return {
        "id": id_, "started": started, "ended": ended, "info": info, "summary": summary,
        "chunks": chunks, "generations": gens,
    }  # fmt: skip
