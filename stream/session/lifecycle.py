"""A session's life in one place: its states, the moves between them, and who holds it.

    OPEN ──stop()──► STOPPING ──the last chunk analysed──► DRAINING ──`end` queued──► ENDED
      └──────────────────┴──── fail() (a fatal error) or close() ─────────────────────┘

- OPEN: audio and control messages are taken.
- STOPPING: the input is closed (by the client's `stop`, the duration limit, a shutdown, or a
  session nobody will resume); audio that still arrives is not used. What was received is
  analysed. Control messages are still read: a client may cancel generations that are finishing.
- DRAINING: analysis is done; generations finish (within the drain time), the last records are
  written, everything is acknowledged, then `end` is queued.
- ENDED: nothing more is queued; the outbox closes once its sender has taken what it holds.
  After a fatal error, generations may still be finishing until the manager `close`s the session.

Being held by a connection is a separate fact, because it can change in any state but ENDED: a
connection that breaks detaches its session (`attachment` None) for the resume grace, and a
resume attaches a new one. Each cause of an ending has one way in: the client's `stop`, the
duration limit and a shutdown call `Session.stop` (with their close codes); a session nobody
will read any more is `finalise`d (stop, cut short); a fatal error is `fail`; `close` stops
whatever work is left once the manager lets the session go.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum


class SessionState(Enum):
    OPEN = "open"
    STOPPING = "stopping"
    DRAINING = "draining"
    ENDED = "ended"


MOVES = {
    SessionState.OPEN: {SessionState.STOPPING, SessionState.ENDED},
    SessionState.STOPPING: {SessionState.DRAINING, SessionState.ENDED},
    SessionState.DRAINING: {SessionState.ENDED},
    SessionState.ENDED: set(),
}


class Lifecycle:
    def __init__(self) -> None:
        self.state = SessionState.OPEN

    def enter(self, state: SessionState) -> None:
        """Move to `state`; ENDED may be entered again (several causes can race to it)."""
        if state is self.state is SessionState.ENDED:
            return
        if state not in MOVES[self.state]:
            raise RuntimeError(f"a session cannot go from {self.state.name} to {state.name}")
        self.state = state

    @property
    def input_open(self) -> bool:
        return self.state is SessionState.OPEN

    @property
    def ended(self) -> bool:
        return self.state is SessionState.ENDED


@dataclass
class Attachment:
    """One connection's hold on a session."""

    transport: str
    client: str | None = None  # the peer's address, for the per-client limits
    taken_over: asyncio.Event = field(default_factory=asyncio.Event)  # set: let go
    released: asyncio.Event = field(default_factory=asyncio.Event)  # set: it has let go
    # How the connection is let go: None, it gets `session_resumed` (another connection has
    # the session); a close code, it is closed with that code alone (the session moves to
    # another front-end and the client should resume it, as after any broken connection).
    farewell: int | None = None
