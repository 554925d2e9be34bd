"""Who may open or resume a session now (docs/protocol.md, "Limits and abuse").

`max_sessions` counts live sessions, those a connection holds (detached ones wait in a pool of
their own, manager.py); `max_sessions_per_client` caps one address's live sessions; and an
address whose sessions were ended for flooding (`rate_limited`) STRIKES times within
STRIKE_WINDOW_S opens no session until that many are older: each new session costs the server
its set-up and a burst of messages, so a flooder that reconnects at once is stopped at `start`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from stream.protocol import CloseCode, ProtocolError
from stream.session.session import Session
from stream.settings import Settings

STRIKES = 3
STRIKE_WINDOW_S = 30.0


def live(sessions: Iterable[Session], client: str | None = None) -> list[Session]:
    """Sessions a connection holds (from `client`'s address, if given)."""
    return [
        s for s in sessions
        if s.attachment is not None and (client is None or s.attachment.client == client)
    ]  # fmt: skip


class Admission:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._strikes: dict[str, deque[float]] = {}  # address -> when its floods were refused

    def check(self, sessions: Iterable[Session], client: str | None) -> None:
        """Raise the refusal a new live session from `client` gets now, if any."""
        self._check_strikes(client)
        sessions = list(sessions)
        limit = self.settings.max_sessions
        if len(live(sessions)) >= limit:
            raise ProtocolError(
                "server_busy",
                f"the server already serves its limit of {limit} live sessions; try again later",
                CloseCode.TRY_AGAIN_LATER,
            )
        own = self.settings.max_sessions_per_client
        if own is not None and client is not None and len(live(sessions, client)) >= own:
            raise ProtocolError(
                "too_many_sessions",
                f"your address already holds {own} live sessions, the most one client may; "
                "end one first",
                CloseCode.TRY_AGAIN_LATER,
            )

    def _check_strikes(self, client: str | None) -> None:
        strikes = self._strikes.get(client or "")
        now = time.monotonic()
        while strikes and now - strikes[0] > STRIKE_WINDOW_S:
            strikes.popleft()
        if strikes is not None and not strikes:
            del self._strikes[client or ""]
        elif strikes is not None and len(strikes) >= STRIKES:
            wait = STRIKE_WINDOW_S - (now - strikes[0])
            raise ProtocolError(
                "rate_limited",
                f"sessions from your address were ended for sending too fast {len(strikes)} "
                f"times in {STRIKE_WINDOW_S:g} s; try again in {wait:.0f} s",
                CloseCode.TRY_AGAIN_LATER,
            )

    def strike(self, session: Session, client: str | None) -> None:
        """`session` let go of its connection: if it was ended for flooding, its address has
        a strike."""
        if client is not None and session.failure and session.failure.code == "rate_limited":
            self._strikes.setdefault(client, deque()).append(time.monotonic())
