"""Malformed input: thousands of bad messages of every kind, each answered as documented.

The catalogue follows docs/protocol.md's error table. A connection either sends one bad first
message (a fatal refusal: its code, then its close code), or opens a session and sends a seeded
mix of bad messages the session must survive (one non-fatal error each, in order), then ends it:
`stop` and audio after it (`audio_after_stop` once, `end` counting exactly the audio accepted,
1000), or a frame over the limit (`frame_too_large`, 1009; some of 4-16 MiB, and one over the
WebSocket library's 16 MiB, a 1009 close with no event). While a session is live, other
connections try to take its id (`session_in_use`) and to resume it in another format
(`resume_mismatch`), and again once it has ended (an ended session is kept a few seconds, so
that a client whose connection broke before `end` arrived can have it again). A session sends
under 70 messages, within the default message rate's 1 s burst (250): no pacing is needed and
the server runs with its defaults. Sessions run the `analyse-only` pipeline, so `generate`,
`cancel` and `config` get `generation_unavailable` (no generator) or `generation_disabled`
whatever else is wrong in them: their type checks need a generating session (a worker process).
Meanwhile a well-behaved session streams again and again; its events must be those it got alone.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from benchmarks.chaos.malformed_catalogue import (
    F32_ONLY,
    FIRST,
    GEN,
    IN_SESSION,
    NORMAL,
    POLICY,
    TOO_BIG,
    partial_frame,
    pcm_frame,
    start_message,
)
from benchmarks.chaos.outcome import Outcome, Plan
from benchmarks.chaos.target import Target
from benchmarks.load import RATE, speech_like
from clients.stream_client import StreamClient
from stream.core.audio.pcm import Encoding

NEEDS_PROCESS = False
CONCURRENCY = 32  # connections at a time: with their probes, well under the 64 live sessions
TIMEOUT_S = 30.0  # a connection not answered and closed within this is a hang
SESSION_STEPS = (20, 60)  # messages in a session, besides start, stop and what follows stop
TRANSPORT_LIMIT = 16 * 1024 * 1024  # the server's WebSocket message limit (at its defaults)
VOLATILE = {"latency_ms", "timing", "n", "session", "client_time", "client_latency_ms"}


@dataclass
class Conn:
    """A connection's bad messages: (kind, the error code it gets or None, fatal)."""

    expected: list[tuple[str, str | None, bool]] = field(default_factory=list)
    close: int | None = None  # the close code it must end with
    samples_ok: bool = True  # `end` counted exactly the audio accepted (when there is an end)


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)  # messages by kind
    total: int = 0  # bad messages, each with a documented answer
    answered: int = 0  # ... answered as documented
    misses: list[str] = field(default_factory=list)  # the first few, why
    missed_by_kind: Counter[str] = field(default_factory=Counter)
    hangs: int = 0
    internal_errors: int = 0
    http_5xx: int = 0
    connections: int = 0

    def judge(self, conn: Conn, got: list[tuple[str, bool, str]], close: int | None) -> None:
        """Each code must come, in order; a message that gets none is answered when no other
        error came. The close code (and `end`'s count) count against the last message."""
        self.connections += 1
        self.internal_errors += sum(code == "internal_error" for code, _, _ in got)
        at, stray, missed, why = 0, [], set(), []
        for i, (kind, code, fatal) in enumerate(conn.expected):
            if code is None:
                continue
            k = next((k for k in range(at, len(got)) if got[k][:2] == (code, fatal)), None)
            if k is None:
                missed.add(i)
                instead = "; ".join(f"{c} ({m[:50]})" for c, _, m in got[at:]) or "nothing"
                why.append(f"{kind}: wanted {code}, got {instead}")
            else:
                stray, at = stray + got[at:k], k + 1
        last = len(conn.expected) - 1
        if last not in missed:  # else what came last was instead of the last message's answer
            stray += got[at:]
        if stray:  # errors for messages that should get none (or none at all)
            missed |= {i for i, e in enumerate(conn.expected) if e[1] is None} or {last}
            why += [f"unexpected {code} ({message[:50]})" for code, _, message in stray]
        if close != conn.close:
            missed.add(last)
            why.append(f"{conn.expected[last][0]}: close {close}, not {conn.close}")
        if not conn.samples_ok:
            missed.add(last)
            why.append("end.samples_received is not the audio accepted")
        self.count(conn, missed, why)

    def count(self, conn: Conn, missed: set[int], why: list[str]) -> None:
        self.total += len(conn.expected)
        self.answered += len(conn.expected) - len(missed)
        self.missed_by_kind.update(conn.expected[i][0] for i in missed)
        self.misses += [w for w in dict.fromkeys(why) if w not in self.misses][
            : 20 - len(self.misses)
        ]


def _connect(url: str) -> Any:
    return connect(url, max_size=None, compression=None, open_timeout=TIMEOUT_S)


async def _read(ws: Any) -> tuple[list[dict[str, Any]], int | None]:
    """Every event until the server closes; and its close code (1006: no close frame)."""
    events = []
    try:
        async for message in ws:
            if isinstance(message, str):
                events.append(json.loads(message))
    except ConnectionClosed:
        pass
    return events, ws.close_code


def _errors(events: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    return [(e["code"], e["fatal"], e["message"]) for e in events if e["type"] == "error"]


async def _guard(tally: Tally, conn: Conn, work: Any) -> None:
    """One connection's `work`: past TIMEOUT_S it is a hang; a refused upgrade or a broken
    connection misses each of its bad messages."""
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await work
        return
    except TimeoutError:
        tally.hangs += 1
        why = f"no answer and close within {TIMEOUT_S:g} s"
    except InvalidStatus as exc:
        tally.http_5xx += exc.response.status_code >= 500
        why = f"upgrade refused: HTTP {exc.response.status_code}"
    except (OSError, ConnectionClosed) as exc:
        why = f"{type(exc).__name__}: {exc}"
    kind = conn.expected[-1][0] if conn.expected else "a session"
    tally.count(conn, set(range(len(conn.expected))), [f"{kind}: {why}"])


async def _probe(url: str, tally: Tally, kind: str, code: str, close: int,
                 message: str | bytes) -> None:  # fmt: skip
    """One connection, one bad first message: its error, then its close code."""
    conn = Conn([("first: " + kind, code, True)], close)
    tally.sent["first: " + kind] += 1

    async def work() -> None:
        async with _connect(url) as ws:
            await ws.send(message)
            events, closed = await _read(ws)
        tally.judge(conn, _errors(events), closed)

    await _guard(tally, conn, work())


async def _session(url: str, tally: Tally, conn: Conn, rng: random.Random, ending: str) -> None:
    """A session that must survive a mix of bad messages, then ends by `ending`."""
    fmt = start_message(rng)
    kinds = IN_SESSION if fmt["encoding"] == "pcm_f32le" else IN_SESSION[:-F32_ONLY]
    steps = [rng.choice(kinds) for _ in range(rng.randint(*SESSION_STEPS))]
    async with _connect(url) as ws:
        await ws.send(json.dumps(fmt))
        tally.sent["valid: start"] += 1
        ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            conn.expected = [("valid: start", "(ready)", False)]
            return tally.judge(conn, _errors([ready]), None)
        reader = asyncio.create_task(_read(ws))
        sid, other = ready["session"], start_message(rng, sample_rate=fmt["sample_rate"] * 2)
        await _probe(url, tally, "id of a live session", "session_in_use", POLICY,
                     json.dumps(start_message(rng, session=sid)))  # fmt: skip
        await _probe(url, tally, "resume in another format", "resume_mismatch", POLICY,
                     json.dumps({**other, "session": sid, "resume": True}))  # fmt: skip
        gen = "generation_unavailable" if ready.get("generator") is None else "generation_disabled"
        accepted, frame = 0, fmt["channels"] * (4 if fmt["encoding"] == "pcm_f32le" else 2)
        try:
            for kind, code, make in steps:
                data = make(rng, fmt)
                tally.sent[kind] += 1
                if isinstance(data, bytes) and code is None:
                    accepted += len(data) // frame
                if not kind.startswith("valid"):
                    conn.expected.append((kind, gen if code == GEN else code, False))
                await ws.send(data)
            await _end(ws, rng, conn, tally, fmt, ready["max_frame_bytes"], ending)
        except ConnectionClosed:
            pass  # the judgement says what went wrong
        events, closed = await reader
    conn.samples_ok = ending != "stop" or [
        e["samples_received"] for e in events if e["type"] == "end"] == [accepted]  # fmt: skip
    tally.judge(conn, _errors(events), closed)
    if ending == "stop":  # it ended, and is kept a few seconds so that a lost `end` can be had
        other = {**fmt, "channels": 3 - fmt["channels"]}
        await _probe(url, tally, "resume of an ended session, another format", "resume_mismatch",
                     POLICY, json.dumps({**other, "session": sid, "resume": True}))  # fmt: skip


async def _end(ws: Any, rng: random.Random, conn: Conn, tally: Tally, fmt: dict[str, Any],
               max_frame: int, ending: str) -> None:  # fmt: skip
    """`stop` and audio after it, or a frame over the server's limit, or over the transport's."""
    if ending == "stop":
        conn.close = NORMAL
        tally.sent["valid: stop"] += 1
        await ws.send(json.dumps({"type": "stop"}))
        for i in range(rng.randint(1, 4)):  # any audio, whole or not: it is not even decoded
            data = rng.choice(
                (partial_frame, lambda r, f: pcm_frame(r, f, 0.02), lambda r, f: b"")
            )(rng, fmt)
            tally.sent["pcm: audio after stop"] += 1
            conn.expected.append(
                ("pcm: audio after stop", None if i else "audio_after_stop", False)
            )
            await ws.send(data)
        return
    conn.close, code = TOO_BIG, "frame_too_large"
    if ending == "transport":  # refused by the WebSocket library: a close, no event
        size, kind, code = TRANSPORT_LIMIT + 1, "pcm: frame over the transport's 16 MiB", None
    elif ending == "huge":
        size, kind = rng.randint(4 << 20, TRANSPORT_LIMIT), "pcm: oversize frame, 4-16 MiB"
    else:
        size, kind = max_frame + rng.randint(1, 3 * max_frame), "pcm: oversize frame, <= 4x limit"
    tally.sent[kind] += 1
    conn.expected.append((kind, code, True))
    await ws.send(bytes(size))


def _schedule(rng: random.Random, target: int) -> list[tuple[str, Any]]:
    """Connections until `target` bad messages: mostly one bad first message each (they are
    cheap), the rest sessions (most of the messages); one frame over the transport's limit."""
    jobs: list[tuple[str, Any]] = [("session", ("transport", random.Random(rng.random())))]
    planned = 40
    while planned < target:
        if rng.random() < 0.7:
            kind, code, close, make = rng.choice(FIRST)
            jobs.append(("first", (kind, code, close, make(rng))))
            planned += 1
        else:
            ending = rng.choices(("stop", "oversize", "huge"), (6, 3, 1))[0]
            jobs.append(("session", (ending, random.Random(rng.random()))))
            planned += 35 + 2 + 3 * (ending == "stop")  # bad steps, probes, after stop
    return jobs


async def _attack(url: str, jobs: list[tuple[str, Any]], tally: Tally, plan: Plan,
                  span: float) -> float:  # fmt: skip
    """Every job, CONCURRENCY at a time, their starts spread over at least `span` seconds (so
    that the attack lasts as long as the well-behaved session); returns how long it took."""
    began, gate = time.monotonic(), asyncio.Semaphore(CONCURRENCY)

    async def one(i: int, job: tuple[str, Any]) -> None:
        await asyncio.sleep(began + span * i / len(jobs) - time.monotonic())
        async with gate:
            if job[0] == "first":
                return await _probe(url, tally, *job[1])
            conn, (ending, rng) = Conn(), job[1]
            await _guard(tally, conn, _session(url, tally, conn, rng, ending))

    async def ticker() -> None:
        while True:
            await asyncio.sleep(10)
            plan.progress(f"malformed: {tally.connections:,} connections, "
                          f"{sum(tally.sent.values()):,} messages")  # fmt: skip

    ticking = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(one(i, job) for i, job in enumerate(jobs)))
    finally:
        ticking.cancel()
    return time.monotonic() - began


async def _well_behaved(url: str, audio: np.ndarray) -> list[dict[str, Any]]:
    """A file-like session (nothing skipped) at real time: its events less what varies."""

    async def blocks() -> Any:
        for at in range(0, len(audio), RATE // 50):
            yield audio[at : at + RATE // 50, None]

    client = StreamClient(url, RATE, 1, Encoding.PCM_S16LE, {"when_behind": "wait"},
                          resume_seconds=0)  # fmt: skip
    result = await client.run(blocks(), realtime=True)
    events = [{k: v for k, v in e.items() if k not in VOLATILE} for e in result.events]
    return [*events, {"close": result.close_code}]


def _healthz(url: str) -> int:
    base = url.replace("ws", "http", 1).split("/v1/")[0]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(base + "/healthz", timeout=10) as response:
            return response.status
    except OSError as exc:
        return getattr(exc, "code", 0)


def _difference(alone: list[dict[str, Any]], other: list[dict[str, Any]]) -> str:
    for i, (a, b) in enumerate(zip(alone, other, strict=False)):
        if a != b:
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            return f"event {i} ({a.get('type')}) differs in {keys}"
    return f"{len(other)} events, not {len(alone)}"


async def run(plan: Plan) -> Outcome:
    if plan.url:
        return await _scenario(plan, plan.url, None)
    with Target() as target:
        return await _scenario(plan, target.ws, target)


async def _scenario(plan: Plan, url: str, target: Any) -> Outcome:
    # Half a chunk at the end: the last chunk is then cut by the client's `stop`, so the
    # utterance's final always comes with it. A whole number of chunks would race `stop`
    # against the last chunk's analysis (final in that chunk's event or in `end`).
    outcome, audio = Outcome("malformed"), speech_like(plan.size(10.5, 2.5), plan.seed)
    span = plan.size(30.0, 2.0)  # the attack's least length: the well-behaved session 3x, 1x
    alone = await _well_behaved(url, audio)
    wanted = plan.size(10_000, 300)
    jobs, tally = _schedule(random.Random(plan.seed), wanted), Tally()
    plan.progress(f"malformed: {len(jobs):,} connections, {CONCURRENCY} at a time, and a "
                  "well-behaved session alongside")  # fmt: skip
    attack = asyncio.create_task(_attack(url, jobs, tally, plan, span))
    runs = []
    while not attack.done():  # the well-behaved session, again and again while it lasts
        runs.append(await _well_behaved(url, audio))
    seconds = await attack
    alive, health = target.alive if target else True, _healthz(url)

    bad_kinds = {kind: n for kind, n in tally.sent.items() if not kind.startswith("valid")}
    bad = sum(bad_kinds.values())
    crashes = (not alive) + (health != 200) + tally.internal_errors + tally.http_5xx
    same = sum(events == alone for events in runs)
    outcome.figures = {
        "bad_messages": bad, "messages": sum(tally.sent.values()), "kinds": len(bad_kinds),
        "sent_by_kind": dict(sorted(tally.sent.items())), "connections": tally.connections,
        "attack_seconds": round(seconds, 1), "messages_per_second": round(bad / seconds),
        "answered": tally.answered, "expected_answers": tally.total,
        "mismatches": tally.misses, "missed_by_kind": dict(tally.missed_by_kind),
        "hangs": tally.hangs, "internal_errors": tally.internal_errors,
        "http_5xx": tally.http_5xx, "server_alive": alive, "healthz": health,
        "well_behaved_runs": len(runs), "well_behaved_identical": same,
        "well_behaved_events": len(alone) - 1,
        "well_behaved_difference": next((_difference(alone, r) for r in runs if r != alone), None),
    }  # fmt: skip
    outcome.summary = (
        f"{bad:,} bad messages of {len(bad_kinds)} kinds over {tally.connections:,} connections "
        f"({CONCURRENCY} at a time) in {seconds:.0f} s; {tally.answered:,}/{tally.total:,} "
        f"answered as documented; a well-behaved session ran {len(runs)}x alongside"
    )
    outcome.check("bad messages sent", bad, f">= {wanted:,}", bad >= wanted)
    outcome.exactly("crashes (server gone, /healthz not 200, internal_error, HTTP 5xx)",
                    crashes, 0)  # fmt: skip
    outcome.exactly(f"connections left hanging ({TIMEOUT_S:g} s)", tally.hangs, 0)
    share = 100 * tally.answered / max(1, tally.total)
    answered = f"{tally.answered:,}/{tally.total:,} ({share:.2f} %)"
    if tally.misses:
        answered += "; e.g. " + "; ".join(tally.misses[:3])
    outcome.check("answered with the documented error and close code", answered, "100 %",
                  tally.answered == tally.total and not tally.misses)  # fmt: skip
    outcome.check("well-behaved session's events identical to a run alone",
                  f"{bool(runs) and same == len(runs)} ({same}/{len(runs)} runs)", "True",
                  bool(runs) and same == len(runs))  # fmt: skip
    return outcome
