"""SIGTERM with live sessions, and kill -9 under write load: no acknowledged audio lost, db intact.

One data folder outlives every server process. First, live-paced sessions stream and the server
gets SIGTERM: each must get `end` and a close 1001, and the process must exit by itself. Then
rounds: (re)start the server on the folder, read back through it what the previous process left,
stream fast (`when_behind: wait`, short chunks: the store's writer commits all the time) and
`kill -9` it at a seeded random moment. After each exit the database, opened read-only, must pass
`PRAGMA integrity_check`, and each session's stored timeline must run contiguously from seq 0,
no seq twice, to at least its last `ack`. Every tenth round, and after the last, a killed session
is resumed from storage and finished.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from benchmarks.chaos.outcome import Outcome, Plan
from benchmarks.chaos.target import Target
from benchmarks.load import speech_like

NEEDS_PROCESS = True
RATE = 16_000  # the clients' rate, the analysis rate too: acks and timelines count alike
# SIGTERM: live audio, half-second chunks so that acks come early.
LIVE = {"chunk_seconds": 0.5, "left_context_seconds": 0.5, "when_behind": "wait"}
# kill -9: many small entries, so that a kill lands while a batch is being written.
WRITE = {"chunk_seconds": 0.25, "left_context_seconds": 0.25, "when_behind": "wait"}
AUDIO_S = 40.0  # each session's audio: longer than it streams before the server goes
WRITERS = 4  # sessions per kill round
WRITE_SPEED = 10.0  # x real time, in 0.2 s frames: 50 messages/s, well inside the rate limits
KILL_AFTER_S = (0.5, 2.0)  # quick: (0.3, 1.0), to keep CI's run short
RESUME_EVERY = 10  # rounds; and after the last one
SHUTDOWN_GRACE_S = 10.0  # the server's --shutdown-grace-seconds (default)
# A graceful exit: uvicorn re-raises the SIGTERM once it has shut down, so the process ends by
# that signal (-15 here, 143 in a shell), as tests/test_cli.py expects; or 0.
GRACEFUL_EXIT = (0, -signal.SIGTERM)


@dataclass
class Writer:
    """One client session: its audio, and what the server told it."""

    audio: np.ndarray
    session: str | None = None
    acked: int = 0  # the highest ack, in samples
    last_event: int = 0
    end: dict[str, Any] | None = None
    close_code: int | None = None
    errors: list[str] = field(default_factory=list)


def voices(base: np.ndarray, count: int, rng: random.Random) -> list[np.ndarray]:
    """`count` different streams from one seeded recording (speech_like costs ~0.1 s a minute
    of audio: 50 sessions' worth each would cost seconds), each rotated to its own start."""
    return [np.roll(base, rng.randrange(len(base))) for _ in range(count)]


def pcm(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def start_message(**extra: Any) -> str:
    return json.dumps({"type": "start", "sample_rate": RATE, "channels": 1,
                       "encoding": "pcm_s16le", **extra})  # fmt: skip


async def read_events(ws: ClientConnection, w: Writer) -> None:
    """Until the connection closes: keep the highest ack, the last event number and `end`."""
    try:
        async for message in ws:
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            w.last_event = max(w.last_event, event.get("n", 0))
            if event["type"] == "ack":
                w.acked = max(w.acked, event["samples"])
            elif event["type"] == "end":
                w.end = event
            elif event["type"] == "error" and event["code"] != "audio_after_stop":
                w.errors.append(event["code"])  # audio in flight at a shutdown is expected
    except ConnectionClosed:
        pass  # killed: no close frame


async def send_audio(ws: ClientConnection, w: Writer, start: int, speed: float, frame_s: float):
    """w.audio from sample `start`, paced at `speed` x real time, then `stop`."""
    step, t0 = int(frame_s * RATE), time.monotonic()
    try:
        for i, at in enumerate(range(start, len(w.audio), step)):
            await asyncio.sleep(max(0.0, t0 + (i + 1) * frame_s / speed - time.monotonic()))
            await ws.send(pcm(w.audio[at : at + step]))
        await ws.send(json.dumps({"type": "stop"}))
    except ConnectionClosed:
        pass  # the server went (or ended the session): the reader says how


async def stream(url: str, w: Writer, config: dict[str, Any], speed: float, frame_s: float):
    """A new session streaming w.audio until the server ends it or dies."""
    try:
        async with connect(url, max_size=None) as ws:
            await ws.send(start_message(config=config))
            ready = json.loads(await ws.recv())
            if ready["type"] != "ready":
                w.errors.append(ready.get("code", "?"))
                return
            w.session = ready["session"]
            reader = asyncio.create_task(read_events(ws, w))
            await send_audio(ws, w, 0, speed, frame_s)
            await reader
            w.close_code = ws.close_code
    except (OSError, InvalidHandshake, ConnectionClosed) as exc:
        w.errors.append(type(exc).__name__)


async def wait_until(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def integrity(data_dir: str) -> str:
    """PRAGMA integrity_check of the server's database, opened read-only (the server is dead)."""
    path = next(Path(data_dir).glob("*.sqlite3"))
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        db.close()


def coverage(target: Target, session: str) -> tuple[int, bool]:
    """(samples the stored timeline covers contiguously from 0, whether its seqs are 0..n-1 with
    no duplicate), from the HTTP API of a running server."""
    status, entries = target.get(f"/v1/sessions/{session}/timeline")
    if status != 200 or not isinstance(entries, list):
        return 0, False
    seqs = [e["seq"] for e in entries]
    covered = 0
    for e in entries:
        if abs(e["start"] * RATE - covered) > 1:
            break  # a gap: what follows does not count
        covered = round(e["end"] * RATE)
    return covered, seqs == list(range(len(seqs)))


def check_stored(target: Target, writers: list[Writer]) -> dict[str, Any]:
    """What the last process left for `writers`' sessions, read after the restart."""
    acked = stored = lost = 0
    bad = 0  # sessions whose seqs are not 0..n-1 once each
    for w in writers:
        if w.session is None:
            continue
        covered, in_order = coverage(target, w.session)
        acked, stored, lost = acked + w.acked, stored + covered, lost + max(0, w.acked - covered)
        bad += not in_order
    return {"acked_s": round(acked / RATE, 2), "stored_s": round(stored / RATE, 2),
            "lost_s": round(lost / RATE, 3), "bad_seqs": bad}  # fmt: skip


def start_target(data_dir: str, started: list[Target]) -> Target:
    """A server on `data_dir` (again); `started` keeps it, so that a failure stops it."""
    # info: Target finds the port in uvicorn's "running on" line, which `warning` would hide.
    started.append(Target(data_dir=data_dir))
    return started[-1].start()


async def sigterm(
    plan: Plan, data_dir: str, base: np.ndarray, started: list[Target]
) -> tuple[dict[str, Any], list[Writer]]:
    """Live sessions, then SIGTERM: every one gets `end` and 1001, the process exits by itself."""
    count, acked_s = plan.size(50, 5), plan.size(3.0, 0.5)
    target = await asyncio.to_thread(start_target, data_dir, started)
    writers = [Writer(a) for a in voices(base, count, random.Random(plan.seed))]
    streams = [asyncio.create_task(stream(target.ws, w, LIVE, 1.0, 0.1)) for w in writers]
    # SIGTERM once each has something acknowledged (at most halfway through its audio).
    enough = acked_s * RATE
    all_acked = await wait_until(lambda: min(w.acked for w in writers) >= enough, AUDIO_S / 2)
    plan.progress(f"durability: {count} live sessions, SIGTERM")
    began = time.monotonic()
    target.signal(signal.SIGTERM)
    status = await asyncio.to_thread(target.wait, 60)
    shutdown_s = time.monotonic() - began
    await asyncio.wait_for(asyncio.gather(*streams), 30)
    ended = sum(w.end is not None and w.close_code == 1001 for w in writers)
    figures = {
        "sessions": count, "acked_before_sigterm": all_acked, "ended_1001": ended,
        "exit_status": status, "shutdown_s": round(shutdown_s, 2),
        "integrity": integrity(data_dir),
        "errors": sorted({e for w in writers for e in w.errors}),
    }  # fmt: skip
    return figures, writers


async def kill_round(
    target: Target, rng: random.Random, base: np.ndarray, kill_after_s: tuple[float, float]
) -> dict[str, Any]:
    """Sessions writing fast; kill -9 at a random moment; the database checked read-only."""
    writers = [Writer(a) for a in voices(base, WRITERS, rng)]
    streams = [asyncio.create_task(stream(target.ws, w, WRITE, WRITE_SPEED, 0.2)) for w in writers]
    await wait_until(lambda: all(w.session or w.errors for w in writers), 10)
    kill_after = rng.uniform(*kill_after_s)
    await asyncio.sleep(kill_after)
    target.signal(signal.SIGKILL)
    await asyncio.to_thread(target.wait, 10)
    await asyncio.wait_for(asyncio.gather(*streams), 30)
    return {"writers": writers, "kill_after_s": round(kill_after, 2),
            "sessions": sum(w.session is not None for w in writers),
            "integrity": integrity(target.data_dir)}  # fmt: skip


async def resume(target: Target, w: Writer) -> dict[str, Any]:
    """Resume a killed session from storage, send 1 s more from where the server says, stop:
    `end` counts it all and the timeline covers it contiguously."""
    found: dict[str, Any] = {"session": w.session, "acked": w.acked}
    try:
        async with connect(target.ws, max_size=None) as ws:
            await ws.send(start_message(session=w.session, resume=True, last_event=w.last_event))
            ready = json.loads(await ws.recv())
            if ready["type"] != "ready" or not ready.get("resumed"):
                return {**found, "ok": False, "refused": ready.get("code")}
            position = ready["samples_received"]
            w.audio, w.end = w.audio[: position + RATE], None
            reader = asyncio.create_task(read_events(ws, w))
            await send_audio(ws, w, position, WRITE_SPEED, 0.2)
            await asyncio.wait_for(reader, 30)
            close = ws.close_code
    except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
        return {**found, "ok": False, "error": type(exc).__name__}
    covered, in_order = coverage(target, w.session or "")
    total = len(w.audio)
    ok = (position >= found["acked"] and close == 1000 and w.end is not None
          and w.end["samples_received"] == total and covered >= total and in_order)  # fmt: skip
    return {**found, "from": position, "to": total, "close": close, "covered": covered, "ok": ok}


async def run(plan: Plan) -> Outcome:
    outcome = Outcome("durability")
    rounds, rng = plan.size(100, 3), random.Random(plan.seed)
    kill_after_s = plan.size(KILL_AFTER_S, (0.3, 1.0))
    data_dir = tempfile.mkdtemp(prefix="grym-chaos-durability-")
    started: list[Target] = []
    table: list[dict[str, Any]] = []  # one row per kill round
    resumed: list[dict[str, Any]] = []
    round_s: list[float] = []
    try:
        base = speech_like(AUDIO_S, plan.seed)
        term, pending = await sigterm(plan, data_dir, base, started)
        for i in range(rounds + 1):  # the last start only checks the last round
            began = time.monotonic()
            target = await asyncio.to_thread(start_target, data_dir, started)
            # What the previous process left, read back through the new one.
            (table[-1] if table else term).update(check_stored(target, pending))
            if table and (i == rounds or i % RESUME_EVERY == 0):
                resumed.append(await resume(target, max(pending, key=lambda w: w.acked)))
            if i == rounds:
                break
            done = await kill_round(target, rng, base, kill_after_s)
            pending = done.pop("writers")
            table.append({"round": i + 1, **done})
            round_s.append(time.monotonic() - began)
            if (i + 1) % 10 == 0 or plan.quick:
                plan.progress(f"durability: kill -9 round {i + 1}/{rounds}")
    finally:
        for target in started:
            await asyncio.to_thread(target.stop)  # the last one; any a failure left running
        shutil.rmtree(data_dir, ignore_errors=True)
    report(outcome, rounds, term, table, resumed, round_s)
    return outcome


def report(outcome: Outcome, planned: int, term: dict[str, Any], table: list[dict[str, Any]],
           resumed: list[dict[str, Any]], round_s: list[float]) -> None:  # fmt: skip
    n, rounds = term["sessions"], len(table)
    intact = sum(r["integrity"] == "ok" for r in table)
    lost = round(sum(r.get("lost_s", 0.0) for r in table), 3)
    outcome.figures = {
        "sigterm": term,
        "kill_rounds": table,
        "kill_round_mean_s": round(float(np.mean(round_s)), 2) if round_s else None,
        "resumed": resumed,
    }
    outcome.summary = (
        f"SIGTERM with {n} live sessions: {term['ended_1001']} got end + 1001, exit "
        f"{term['exit_status']} in {term['shutdown_s']} s, {term['acked_s']} s acknowledged, "
        f"{term['stored_s']} s stored; {rounds} kill -9 rounds under write load "
        f"(~{outcome.figures['kill_round_mean_s']} s each): "
        f"{sum(r.get('acked_s', 0) for r in table):.1f} s acknowledged, "
        f"{sum(r.get('stored_s', 0) for r in table):.1f} s stored, {lost} s lost; "
        f"{sum(r['ok'] for r in resumed)}/{len(resumed)} resumed from storage"
    )
    outcome.exactly("SIGTERM: sessions that got end + close 1001", f"{term['ended_1001']}/{n}",
                    f"{n}/{n}")  # fmt: skip
    status = term["exit_status"]
    outcome.check("SIGTERM: exit status", status, "0, or -15: the SIGTERM re-raised after the "
                  "graceful shutdown", status in GRACEFUL_EXIT)  # fmt: skip
    outcome.at_most("SIGTERM: time to exit", term["shutdown_s"], SHUTDOWN_GRACE_S, " s", timed=True)
    outcome.at_most("SIGTERM: acknowledged audio lost after restart", term["lost_s"], 0, " s")
    outcome.exactly("SIGTERM: timelines with a missing or duplicate seq", term["bad_seqs"], 0)
    outcome.exactly("SIGTERM: integrity_check", term["integrity"], "ok")
    outcome.exactly("kill -9: rounds", rounds, planned)
    outcome.exactly("kill -9: integrity_check ok", f"{intact}/{rounds}", f"{rounds}/{rounds}")
    outcome.at_most("kill -9: acknowledged audio lost (sum over rounds)", lost, 0, " s")
    outcome.exactly("kill -9: timelines with a missing or duplicate seq",
                    sum(r.get("bad_seqs", 0) for r in table), 0)  # fmt: skip
    ok = sum(r["ok"] for r in resumed)
    outcome.check("kill -9: killed session resumed from storage", f"{ok}/{len(resumed)}",
                  "all, at least once", ok == len(resumed) >= 1)  # fmt: skip
