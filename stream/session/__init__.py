"""The session layer: the one API every transport drives.

`Session` is one client's stream (input stage, backlog, analysis, steps, generation, acks, end
handshake); `SessionManager` is the registry (limits, resume, expiry, shutdown, moves between
front-ends). The other modules are their collaborators: admission (limits), lifecycle (states,
and the connection's hold), options, outbox (what goes to the client), recorder (what goes to
the store), restore (what comes back from it), acks, timing, and the analysis / steps /
generation parts of a session.
"""

from stream.session.lifecycle import Attachment, SessionState
from stream.session.manager import SessionManager
from stream.session.session import Session

__all__ = ["Attachment", "Session", "SessionManager", "SessionState"]
