"""A session's control messages about generation (`generate`, `cancel`, `config`): what they
do, and the typed errors for those that cannot be carried out. (`stop` is the session's own.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stream.pipeline import with_message
from stream.protocol import ProtocolError, error_event
from stream.session.generation import no_generation_event

if TYPE_CHECKING:
    from stream.session.session import Session


async def generation_control(session: Session, message: dict[str, Any]) -> None:
    outbox = session.outbox
    if session.generation is None:
        has_generator = session.generator_info is not None
        outbox.put(no_generation_event(session.id, has_generator, session.pipeline.name))
        return
    if message["type"] == "generate" and not session.lifecycle.input_open:
        # It could outlive the session: `end` may already be on its way.
        why = "generate after the input ended (stop, a limit, a shutdown) is not accepted"
        outbox.put(error_event(session.id, "session_stopping", why, fatal=False))
        return
    steps = session.steps
    try:
        if message["type"] == "generate" and steps is not None:
            trigger = steps.policy.manual(steps.context.end)
            await session.generation.manual(message, trigger)
        elif message["type"] == "cancel":
            await session.generation.cancel(message["id"])
        elif message["type"] == "config" and steps is not None:
            session.pipeline = with_message(session.pipeline, message, session.all_analysers)
            steps.reconfigure(session.pipeline)
            if session.pipeline.spec.generate is not None:
                session.generation.reconfigure(session.pipeline.spec.generate)
    except ProtocolError as exc:
        outbox.put(exc.to_event(session.id))
