"""Session policy without a socket: backlog skip and wait, the end handshake, resume and replay,
acks against committed records, what is kept, and the slow-consumer policy. The harness
(tests/session_harness.py) drives real Sessions over a real analysis engine whose model waits at
a gate the test opens; the socket tests (test_websocket.py, test_resume.py, ...) stay as well."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stream.engines.jobs import GenerationJob
from stream.protocol import CloseCode, ProtocolError
from stream.session import Attachment, Session, SessionState
from stream.session.acks import TICK_S
from stream.session.continuous import FAST_SEGMENTS
from stream.session.lifecycle import Lifecycle
from tests.session_harness import (
    RATE,
    HeldGenerator,
    events_until,
    frames,
    harness,
    queued,
    settle,
    start,
    take,
)


def analysis(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "analysis"]


async def test_behind_with_skip_the_oldest_waiting_chunks_are_dropped_and_reported() -> None:
    async with harness(max_backlog_chunks=2) as (manager, gate):
        session = await manager.open(start())
        await frames(session, 1.0)
        await settle(lambda: gate.waiting == 1)  # chunk 0 is with the model, held there
        await frames(session, 4.0)  # chunks 1-4 arrive while it is
        assert session.backlog == 2 and session.skipped == 2  # 1 and 2 went, 3 and 4 wait
        gate.open()
        await session.receive_text('{"type": "stop"}')
        events = await events_until(session, "end")
    chunks = analysis(events)
    assert [e["seq"] for e in chunks] == [0, 3, 4]
    assert [e["skipped"] for e in chunks] == [0, 2, 0]  # reported on the next event
    assert events[-1]["chunks"] == 3 and events[-1]["skipped"] == 2
    assert events[-1]["samples_received"] == 5 * RATE  # skipped audio was received all the same


async def test_behind_with_wait_the_transport_is_held_and_nothing_is_lost() -> None:
    async with harness(max_backlog_chunks=2) as (manager, gate):
        session = await manager.open(start(config={"when_behind": "wait"}))
        await frames(session, 1.0)
        await settle(lambda: gate.waiting == 1)
        feeding = asyncio.create_task(frames(session, 4.0))
        await settle(lambda: session.backlog == 3)  # one over the limit: the producer waits
        await asyncio.sleep(0.1)
        assert not feeding.done() and session.input.samples_received < 5 * RATE
        gate.allow(1)  # chunk 0 done: chunk 1 goes to the model, room for one more
        await settle(lambda: session.input.samples_received == 5 * RATE)
        # Never more than the limit and the one chunk that made the producer wait.
        assert session.backlog <= 3 and session.skipped == 0
        gate.open()
        await asyncio.wait_for(feeding, 10)
        await session.receive_text('{"type": "stop"}')
        events = await events_until(session, "end")
    assert [e["seq"] for e in analysis(events)] == [0, 1, 2, 3, 4]
    assert all(e["skipped"] == 0 for e in analysis(events)) and events[-1]["skipped"] == 0


async def test_stop_analyses_everything_acknowledges_it_then_ends_and_closes() -> None:
    async with harness() as (manager, gate):
        gate.open()
        session = await manager.open(start(config={"when_behind": "wait"}))  # nothing skipped
        await frames(session, 2.5)
        await session.receive_text('{"type": "stop"}')
        await session.receive_bytes(b"\0" * 400)  # audio after stop: reported once, not used
        await session.receive_bytes(b"\0" * 400)
        events = await events_until(session, "end")
        assert await take(session) is None  # closed, nothing after `end`
    chunks = analysis(events)
    assert [(e["start"], e["end"]) for e in chunks[:2]] == [(0.0, 1.0), (1.0, 2.0)]
    assert chunks[2]["start"] == 2.0 and chunks[2]["end"] >= 2.5  # the rest, padded to the grid
    late = [e for e in events if e["type"] == "error"]
    assert [(e["code"], e["fatal"]) for e in late] == [("audio_after_stop", False)]
    assert events[-2] == {"type": "ack", "session": session.id, "samples": int(2.5 * RATE),
                          "n": events[-2]["n"]}  # fmt: skip
    assert events[-1]["samples_received"] == int(2.5 * RATE)  # the late frames were not used
    assert [e["n"] for e in events] == list(range(1, len(events) + 1))
    assert session.outbox.close_code == CloseCode.NORMAL and not session.accepting


async def test_a_resumed_session_sends_again_what_the_broken_connection_swallowed() -> None:
    async with harness(resume_grace_seconds=30) as (manager, gate):
        gate.open()
        session = await manager.open(start(session="s-resume", config={"when_behind": "wait"}))
        await frames(session, 3.2)  # chunk 2 is cut once a little of the next has come
        await settle(lambda: session.chunks_analysed == 3)
        sent = []  # what the old connection's sender took; the client got the first two only
        while len(session.outbox):
            sent.append((await take(session)).event)
        received = [e for e in sent if e["type"] == "analysis"][1]["n"]
        await manager.disconnected(session, session.attachment, resumable=True)
        assert session.attachment is None and manager.sessions["s-resume"] is session
        await frames(session, 1.0)  # detached, it still takes audio and analyses it
        resumed, lost = await manager.resume(start(session="s-resume", resume=True,
                                                   last_event=received))  # fmt: skip
        assert resumed is session and lost == 0 and session.attachment is not None
        await session.receive_text('{"type": "stop"}')
        again = await events_until(session, "end")
    # Everything after the client's last event, once, in order and numbered as before.
    assert again[: len(sent) - received] == [e for e in sent if e["n"] > received]
    numbers = [e["n"] for e in again]
    assert numbers == list(range(received + 1, received + 1 + len(numbers)))
    seqs = [e["seq"] for e in analysis(again)]
    assert seqs == [2, 3, 4]  # 0 and 1 had arrived; 2 was swallowed; 3 and 4 came after


class HeldStore:
    """A store whose writer commits only when the test says, or at once with `auto` (the
    `record_*` and counters of the Store protocol)."""

    def __init__(self, auto: bool = False) -> None:
        self.enqueued = self.committed = 0
        self.auto = auto
        self.records: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("record_"):
            raise AttributeError(name)

        def record(*args: Any) -> None:
            self.enqueued += 1
            self.records.append((name, args))
            if self.auto:
                self.commit()

        return record

    def commit(self) -> None:
        self.committed = self.enqueued


async def test_acks_cover_only_what_the_store_has_committed() -> None:
    store = HeldStore()
    async with harness(store=store) as (manager, gate):
        gate.open()
        session = await manager.open(start(config={"when_behind": "wait"}))
        await frames(session, 3.2)
        await settle(lambda: session.chunks_analysed == 3)
        await asyncio.sleep(3 * TICK_S)  # the acks loop has looked since: nothing committed
        assert session.acks.acked == 0
        acks = [e for e in await events_until(session, "ack") if e["type"] == "ack"]
        assert {ack["samples"] for ack in acks} == {0}  # analysed, not written: keep it all
        store.commit()
        while (ack := (await events_until(session, "ack"))[-1])["samples"] == 0:
            pass
        # All three chunks are in; the last one's left context (1 s) is still needed.
        assert ack["samples"] == 2 * RATE


async def test_everything_analysed_is_kept_whatever_the_client_receives() -> None:
    store = HeldStore(auto=True)
    pipeline = {"analyse": ["dsp"], "send": {"analysis": ["vad"]}}
    config = {"pipeline": pipeline, "when_behind": "wait"}
    async with harness(store=store) as (manager, gate):
        gate.open()
        session = await manager.open(start(config=config))
        await frames(session, 2.0)
        await session.receive_text('{"type": "stop"}')
        events = await events_until(session, "end")
    sent = analysis(events)
    entries = [args[:5] for name, args in store.records if name == "record_analysis"]
    assert [set(e) - {"type", "session", "seq", "start", "end", "skipped", "n"} for e in sent] == [
        {"vad"}, {"vad"},
    ]  # fmt: skip
    assert [seq for _, seq, *_ in entries] == [0, 1]
    for (_, _, start_s, end_s, kept), event in zip(entries, sent):
        assert (start_s, end_s) == (event["start"], event["end"])
        assert kept["vad"] == event["vad"] and "features" in kept  # kept though not sent
        assert kept["n"] == event["n"] and "timing" not in kept
    kinds = [name for name, _ in store.records]
    assert kinds[0] == "record_session" and kinds[-1] == "record_end"


async def test_a_client_that_does_not_read_is_failed_as_a_slow_consumer() -> None:
    config = {"chunk_seconds": 0.1, "left_context_seconds": 0, "when_behind": "wait"}
    async with harness(outbound_queue=8) as (manager, gate):
        gate.open()
        session = await manager.open(start(config=config))
        await frames(session, 1.5)  # 15 analysis events, nobody reading
        await settle(lambda: not session.accepting)
        only = await queued(session)
    assert [(e["type"], e["code"], e["fatal"]) for e in only] == [
        ("error", "slow_consumer", True)
    ]  # the unread events were dropped: a slow reader costs bounded memory
    assert session.outbox.close_code == CloseCode.POLICY_VIOLATION


async def test_a_fatal_error_while_stopping_is_the_last_word() -> None:
    async with harness() as (manager, gate):
        session = await manager.open(start())
        await frames(session, 2.0)
        await settle(lambda: gate.waiting == 1)  # analysis is behind: stopping takes a while
        ending = session.stop()
        assert session.state is SessionState.STOPPING
        session.fail(ProtocolError("internal_error", "injected", CloseCode.INTERNAL_ERROR))
        assert session.state is SessionState.ENDED and not session.accepting
        await asyncio.wait_for(ending, 10)  # the end gives way: no `end` after the error
        events = []
        while (item := await take(session)) is not None:
            events.append(item.event)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "internal_error"
    assert "end" not in [e["type"] for e in events]
    assert session.outbox.close_code == CloseCode.INTERNAL_ERROR


async def test_closing_a_stopping_session_leaves_no_work_behind() -> None:
    async with harness() as (manager, gate):
        session = await manager.open(start())
        await frames(session, 2.0)
        await settle(lambda: gate.waiting == 1)
        ending = session.stop()
        await manager.release(session)  # the connection ended for good
        assert ending.done() and session.state is SessionState.ENDED
        assert session.stop() is ending  # a late stop starts nothing new
        assert not manager.sessions


async def test_shutdown_ends_attached_sessions_and_leaves_detached_ones_open() -> None:
    async with harness(resume_grace_seconds=30) as (manager, gate):
        gate.open()
        attached = await manager.open(start(session="here"))
        detached = await manager.open(start(session="gone"))
        await frames(attached, 1.0)
        await manager.disconnected(detached, detached.attachment, resumable=True)
        finishing = asyncio.create_task(manager.finish_all(5.0))
        events = await events_until(attached, "end")
        assert await take(attached) is None
        await finishing
        assert detached.state is SessionState.OPEN  # kept for a resume after the restart
    assert attached.outbox.close_code == CloseCode.GOING_AWAY
    assert events[-1]["samples_received"] == RATE


async def test_a_resume_takes_the_session_over_from_a_half_open_connection() -> None:
    async with harness(resume_grace_seconds=30) as (manager, gate):
        gate.open()
        session = await manager.open(start(session="taken"))
        old = session.attachment
        assert old is not None

        async def old_transport() -> None:  # what websocket.py does when taken over
            await old.taken_over.wait()
            await manager.disconnected(session, old, resumable=True)

        letting_go = asyncio.create_task(old_transport())
        resumed, lost = await manager.resume(start(session="taken", resume=True))
        await letting_go
        assert resumed is session and lost == 0
        assert isinstance(session.attachment, Attachment) and session.attachment is not old
        assert session.state is SessionState.OPEN and "taken" in manager.sessions


def test_the_lifecycle_moves_only_forward() -> None:
    life = Lifecycle()
    assert life.input_open and not life.ended
    life.enter(SessionState.STOPPING)
    with pytest.raises(RuntimeError, match="STOPPING to OPEN"):
        life.enter(SessionState.OPEN)
    life.enter(SessionState.DRAINING)
    with pytest.raises(RuntimeError, match="DRAINING to STOPPING"):
        life.enter(SessionState.STOPPING)
    life.enter(SessionState.ENDED)
    life.enter(SessionState.ENDED)  # several causes may race to the end
    assert life.ended and not life.input_open
    with pytest.raises(RuntimeError):
        Lifecycle().enter(SessionState.DRAINING)  # never without stopping first


async def asked_to_generate(session: Session, held: HeldGenerator) -> None:
    await session.receive_text('{"type": "generate", "prompt": "rain"}')
    await settle(lambda: len(held.waiting) == 1)


async def test_stop_lets_a_generation_finish_before_end() -> None:
    held = HeldGenerator()
    async with harness(generator=held) as (manager, gate):
        gate.open()
        session = await manager.open(start(config={"when_behind": "wait"}))
        await frames(session, 2.0)
        await asked_to_generate(session, held)
        await session.receive_text('{"type": "stop"}')
        await settle(lambda: session.state is SessionState.DRAINING)  # analysis is done
        await asyncio.sleep(0.3)
        assert "end" not in [e["type"] for e in await queued(session)]  # it waits for the clip
        held.run(held.jobs[0])
        events = await events_until(session, "end")
    kinds = [e["type"] for e in events]
    assert kinds.index("generation.done") < kinds.index("end")
    assert session.outbox.close_code == CloseCode.NORMAL


async def test_a_session_nobody_reads_cuts_its_generations_short() -> None:
    held, store = HeldGenerator(), HeldStore(auto=True)
    async with harness(store=store, generator=held) as (manager, gate):
        gate.open()
        session = await manager.open(start(config={"when_behind": "wait"}))
        await frames(session, 2.0)
        await asked_to_generate(session, held)
        await session.receive_text('{"type": "stop"}')  # the drain would wait up to 60 s
        await settle(lambda: session.state is SessionState.DRAINING)
        gone = manager.disconnected(session, session.attachment, resumable=False)  # for good
        await asyncio.wait_for(gone, 5)  # not the 60 s drain
        assert session.state is SessionState.ENDED and not manager.sessions
    cancelled = [e for e in await queued(session) if e["type"] == "generation.cancelled"]
    assert [e["reason"] for e in cancelled] == ["session_end"]
    kept = {name: args for name, args in store.records}
    assert kept["record_generation"][2]["outcome"] == "cancelled" and "record_end" in kept


async def test_the_drain_time_bounds_how_long_stop_waits_for_generations() -> None:
    held = HeldGenerator()
    async with harness(generator=held, generation_drain_seconds=0.2) as (manager, gate):
        gate.open()
        session = await manager.open(start(config={"when_behind": "wait"}))
        await frames(session, 2.0)
        await asked_to_generate(session, held)
        await session.receive_text('{"type": "stop"}')
        events = await events_until(session, "end")  # never run: cut at the drain time
    cancelled = [e for e in events if e["type"] == "generation.cancelled"]
    assert [e["reason"] for e in cancelled] == ["session_end"]
    assert [e["type"] for e in events].index("generation.cancelled") < len(events) - 1


async def test_a_continuous_stream_that_fell_behind_goes_back_once_it_can() -> None:
    """A stream whose client ran dry lowers its steps (`generation.behind`); once segments come
    far faster than real time again it takes them back up (`generation.recovered`), no further
    than asked."""
    held = HeldGenerator()
    generation = {"mode": "continuous", "seconds": 1.0, "hop_seconds": 0.5, "steps": 9}
    async with harness(generator=held) as (manager, gate):
        gate.open()
        session = await manager.open(start(config={"generation": generation}))
        await frames(session, 1.0)  # the stream starts at the first analysed chunk

        async def next_segment() -> GenerationJob:
            await settle(lambda: len(held.waiting) == 1)
            return held.waiting[0]

        held.run(await next_segment())  # 0.5 s of audio: the client's playback starts
        late = await next_segment()
        await asyncio.sleep(0.8)  # ... and runs dry before the next segment's audio
        held.run(late)
        behind = (await events_until(session, "generation.behind"))[-1]
        steps = []
        for _ in range(FAST_SEGMENTS):  # then segments come at once: far ahead of real time
            job = await next_segment()
            steps.append(job.request.steps)
            held.run(job)
        recovered = (await events_until(session, "generation.recovered"))[-1]
        after = (await next_segment()).request.steps
    assert behind["late"] and (behind["change"], behind["steps"]) == ("steps", 6)
    assert steps == [6] * FAST_SEGMENTS
    assert (recovered["change"], recovered["steps"], after) == ("steps", 9, 9)
