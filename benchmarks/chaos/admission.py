"""Admission: twice max_sessions at once, then connections that vanish holding their sessions.

A server with a few live slots (`--max-sessions`) and the default minute of resume grace.

1. Twice as many sessions as slots start at once: exactly `max_sessions` get `ready`, every other
   one `server_busy` and close 1013. The admitted ones stream the same audio (`when_behind:
   "wait"`, so nothing is skipped) side by side; their events must be those of the same audio
   streamed alone on the same server before (all but the timings, numbering and session id).
2. The slot-holding attack (issue 17, finding 1): `max_sessions` connections send `start` and one
   frame and vanish without a close frame, so their sessions wait detached for a resume. New
   clients must take every slot within 2 s of the last vanishing, and each vanished session must
   still be resumable.
3. More vanished sessions from one address than its share of the detached pool
   (`--max-detached-per-client`, 8): the oldest are evicted (their resume gets
   `session_not_found`), the share stays resumable, and new clients are still admitted at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from benchmarks.chaos.outcome import Outcome, Plan
from benchmarks.chaos.target import Target
from benchmarks.load import speech_like
from stream.core.audio.pcm import Encoding, encode

NEEDS_PROCESS = True
RATE = 16000
FRAME = RATE // 10  # 100 ms frames: few messages, well inside the send-rate limits
START = {"type": "start", "sample_rate": RATE, "channels": 1, "encoding": "pcm_s16le",
         "config": {"when_behind": "wait"}}  # fmt: skip
VOLATILE = ("latency_ms", "timing", "n", "session")  # what may differ between two runs
SHARE = 8  # the server's default --max-detached-per-client
ADMIT_WITHIN_S = 2.0


async def run(plan: Plan) -> Outcome:
    outcome = Outcome("admission")
    slots = plan.size(8, 4)
    extra = plan.size(4, 2)  # vanished sessions past the address's share of the pool
    audio = pcm(speech_like(plan.size(4.0, 2.0), plan.seed))
    with Target(max_sessions=slots) as target:
        plan.progress(f"admission: {2 * slots} sessions at once on {slots} slots")
        await at_once(target, slots, audio, plan.size(3, 1), outcome)
        plan.progress(f"admission: {slots} connections vanish holding their sessions")
        await slot_holding(target, slots, outcome)
        plan.progress(f"admission: {SHARE + extra} vanish from one address (share {SHARE})")
        await past_the_share(target, slots, extra, outcome)
    f = outcome.figures
    outcome.summary = (
        f"{2 * slots} sessions at once on {slots} slots, x {f['rounds']}: admitted "
        f"{'/'.join(map(str, f['admitted']))}, {f['refused_busy_1013']} server_busy, events "
        f"identical to alone {f['identical_to_alone']}; after {slots} vanished, new clients in "
        f"{f['admit_after_vanish_s']:.2f} s; {SHARE + extra} vanished from one address: "
        f"{f['evicted']} evicted, {f['resumable_after_evictions']} resumable"
    )
    return outcome


# --- 1. twice max_sessions at once -------------------------------------------------------------


async def at_once(target: Target, slots: int, audio: bytes, rounds: int, outcome: Outcome) -> None:
    alone = comparable(await stream((await opened(target.ws))[0], audio))
    admitted, busy, same, other = [], 0, [], []
    for _ in range(rounds):
        let_in, refusals, runs = await race(target.ws, 2 * slots, audio)
        admitted.append(let_in)
        busy += refusals.count(("server_busy", 1013))
        other += [code for code in refusals if code != ("server_busy", 1013)]
        same += [comparable(events) == alone for events in runs]
    outcome.figures.update(
        sessions_at_once=2 * slots, rounds=rounds, admitted=admitted, refused_busy_1013=busy,
        refused_otherwise=other[:10], identical_to_alone=f"{sum(same)}/{len(same)}",
        analysis_events_each=len([e for e in alone if e["type"] == "analysis"]),
    )  # fmt: skip
    what = f"sessions admitted of {2 * slots} at once, x {rounds}"
    measured = "/".join(map(str, admitted))
    outcome.check(what, measured, f"= {slots} each", all(n == slots for n in admitted))
    outcome.exactly("excess refused with server_busy + 1013", busy, slots * rounds)
    identical = bool(same) and all(same)
    outcome.check("admitted sessions' events identical to one alone", identical, "True", identical)


async def race(url: str, sessions: int, audio: bytes) -> tuple[int, list[tuple], list[list]]:
    """`sessions` starts at once: how many were admitted, each refusal's (code, close code),
    and the events of the admitted ones, which stream `audio` side by side."""
    connections = await asyncio.gather(*(connect(url) for _ in range(sessions)))
    try:
        # Every start goes out before any answer is read: all of them race for the slots.
        await asyncio.gather(*(ws.send(json.dumps(START)) for ws in connections))
        answers = await asyncio.gather(*(first_event(ws) for ws in connections))
        pairs = list(zip(connections, answers, strict=True))
        admitted = [ws for ws, answer in pairs if answer["type"] == "ready"]
        refused = [(ws, answer) for ws, answer in pairs if answer["type"] != "ready"]
        closes = await asyncio.gather(*(close_code(ws) for ws, _ in refused))
        codes = [(a.get("code"), c) for (_, a), c in zip(refused, closes, strict=True)]
        # The admitted ones held their slots until every answer came; now they stream.
        runs = await asyncio.gather(*(stream(ws, audio) for ws in admitted))
    finally:
        await asyncio.gather(*(ws.close() for ws in connections))
    return len(admitted), codes, runs


def comparable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events as any run of the same audio must give them: no acks (heartbeats), and none
    of the fields that measure this run."""
    return [{k: v for k, v in e.items() if k not in VOLATILE} for e in events if e["type"] != "ack"]


async def stream(ws: ClientConnection, audio: bytes) -> list[dict[str, Any]]:
    """Send `audio` as fast as the server takes it, then `stop`; every event until `end`."""

    async def send() -> None:
        step = FRAME * 2
        for i in range(0, len(audio), step):
            await ws.send(audio[i : i + step])
        await ws.send(json.dumps({"type": "stop"}))

    sender = asyncio.create_task(send())
    events = []
    try:
        async with asyncio.timeout(120):
            async for message in ws:
                events.append(json.loads(message))
                if events[-1]["type"] in ("end", "error"):
                    break
        await sender
    finally:
        sender.cancel()
        await ws.close()
    return events


# --- 2. connections that vanish holding their sessions --------------------------------------


async def slot_holding(target: Target, slots: int, outcome: Outcome) -> None:
    ids = await asyncio.gather(*(vanish(target.ws) for _ in range(slots)))
    vanished_at = time.monotonic()
    fresh = await asyncio.gather(*(admit(target.ws) for _ in range(slots)))
    admit_s = time.monotonic() - vanished_at
    detached = await wait_for_metric(target, "grym_sessions_detached", slots)
    await asyncio.gather(*(ws.close() for ws, _ in fresh))  # 1000: their sessions end at once
    resumed = [await resume(target.ws, session) for session in ids]
    outcome.figures.update(
        vanished=slots, admit_after_vanish_s=round(admit_s, 3), detached_after_vanish=detached,
        busy_before_admitted=sum(refused for _, refused in fresh),
        resumed_after_vanish=f"{resumed.count('ready')}/{slots}",
    )  # fmt: skip
    outcome.at_most(f"all {slots} slots taken by new clients after {slots} vanished",
                    round(admit_s, 3), ADMIT_WITHIN_S, " s", timed=True)  # fmt: skip
    outcome.exactly("vanished sessions waiting detached (/metrics)", detached, slots)
    outcome.exactly("vanished sessions resumable (ready, resumed)", resumed.count("ready"), slots)


async def vanish(url: str) -> str:
    """A session that got one frame; then the connection dies without a word (no close
    frame): a broken connection, whose session waits for a resume. Its id."""
    ws, ready = await opened(url)
    await ws.send(pcm(speech_like(0.1, 0)))
    ws.transport.abort()
    return ready["session"]


async def admit(url: str, timeout: float = 10.0) -> tuple[ClientConnection, int]:
    """A new session, trying again while the server is busy: its open connection, and how
    many times it was refused first."""
    deadline = time.monotonic() + timeout
    refused = 0
    while True:
        ws = await connect(url)
        await ws.send(json.dumps(START))
        answer = await first_event(ws)
        if answer["type"] == "ready" or time.monotonic() > deadline:
            return ws, refused
        refused += 1
        await ws.close()
        await asyncio.sleep(0.02)


async def resume(url: str, session: str, timeout: float = 5.0) -> str:
    """`ready` (with resumed true) or the refusal's code; a busy server is asked again (the
    documented answer: the session keeps waiting). The resumed session is then ended."""
    deadline = time.monotonic() + timeout
    while True:
        async with connect(url) as ws:
            await ws.send(json.dumps({**START, "session": session, "resume": True}))
            answer = await first_event(ws)
        if answer["type"] == "ready":
            return "ready" if answer.get("resumed") else "ready, not resumed"
        if answer.get("code") != "server_busy" or time.monotonic() > deadline:
            return answer.get("code", "?")
        await asyncio.sleep(0.05)


# --- 3. past one address's share of the detached pool ---------------------------------------


async def past_the_share(target: Target, slots: int, extra: int, outcome: Outcome) -> None:
    ids = []
    for i in range(SHARE + extra):  # one by one: the oldest is well defined
        ids.append(await vanish(target.ws))
        await wait_for_metric(target, "grym_sessions_detached", min(i + 1, SHARE))
    vanished_at = time.monotonic()
    fresh = await asyncio.gather(*(admit(target.ws) for _ in range(slots)))
    admit_s = time.monotonic() - vanished_at
    await asyncio.gather(*(ws.close() for ws, _ in fresh))
    detached = await wait_for_metric(target, "grym_sessions_detached", SHARE)
    answers = [await resume(target.ws, session) for session in ids]
    evicted = answers[:extra].count("session_not_found")
    kept = answers[extra:].count("ready")
    outcome.figures.update(
        vanished_one_address=SHARE + extra, detached_at_most_share=detached, evicted=evicted,
        resumable_after_evictions=f"{kept}/{SHARE}", admit_after_evictions_s=round(admit_s, 3),
        resume_answers=answers,
    )  # fmt: skip
    outcome.exactly("sessions waiting detached past the share (/metrics)", detached, SHARE)
    outcome.exactly(f"oldest evicted (resume: session_not_found) of {SHARE + extra}", evicted,
                    extra)  # fmt: skip
    outcome.exactly("the newest share still resumable", kept, SHARE)
    outcome.at_most(f"all {slots} slots taken by new clients after the evictions",
                    round(admit_s, 3), ADMIT_WITHIN_S, " s", timed=True)  # fmt: skip


# --- small pieces -----------------------------------------------------------------------------


def pcm(audio: np.ndarray) -> bytes:
    return encode(audio[:, None], Encoding.PCM_S16LE)


async def opened(url: str) -> tuple[ClientConnection, dict[str, Any]]:
    """A connection whose session is `ready`, and the `ready` event."""
    ws = await connect(url)
    await ws.send(json.dumps(START))
    ready = await first_event(ws)
    if ready["type"] != "ready":
        raise RuntimeError(f"a session was refused: {ready}")
    return ws, ready


async def first_event(ws: ClientConnection) -> dict[str, Any]:
    try:
        async with asyncio.timeout(10):
            return json.loads(await ws.recv())
    except (ConnectionClosed, TimeoutError) as exc:
        return {"type": "nothing", "code": type(exc).__name__}


async def close_code(ws: ClientConnection) -> int | None:
    try:
        async with asyncio.timeout(5):
            await ws.wait_closed()
    except TimeoutError:
        return None
    return ws.close_code


async def wait_for_metric(target: Target, name: str, value: int, timeout: float = 5.0) -> int:
    """`name` from /metrics once it equals `value` (or what it is after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        found = await asyncio.to_thread(metric, target, name)
        if found == value or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


def metric(target: Target, name: str) -> int:
    with urllib.request.urlopen(target.http + "/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return round(float(match.group(1))) if match else -1
