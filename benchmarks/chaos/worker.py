"""Kill -9 the generation worker, also while it restarts: generation comes back, nothing else dies.

The worker is the server's multiprocessing "spawn" child (its command line runs `spawn_main`; the
`resource_tracker` child is not it), found from the outside the way an operator's `kill` would.
Each round kills it with SIGKILL; every other round also kills the worker started in its place
while that one still loads (before /readyz says 200 again): the engine's restart fails and it
tries again after its backoff (stream/engines/generation.py). The round then times how long until
/readyz is 200, and makes a generation over a real WebSocket session to prove it is back, not just
said to be. Meanwhile one live-paced session streams analysis the whole time: it must not notice,
and the front end must never exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect

from benchmarks.chaos.outcome import Outcome, Plan
from benchmarks.chaos.target import Target
from benchmarks.load import speech_like
from clients.stream_client import StreamClient, StreamResult
from stream.core.audio.pcm import Encoding

NEEDS_PROCESS = True
RATE = 16_000
FRAME = RATE // 50  # 20 ms, live-paced
BACK_WITHIN_S = 30.0  # the "within seconds": the engine's backoff caps at 30 s
WAIT_S = 90.0  # give up on a worker or a readyz after this (a miss, not a hang)
GENERATION = {"seconds": 1.0, "steps": 2}  # small: it proves the worker works, fast
LOADING_KILL_S = 1.0  # the second kill lands up to this long after the new worker appears (its
# load takes seconds; a kill that comes after /readyz is 200 again is not counted as one during it)
TERMINAL = ("generation.done", "generation.failed", "generation.cancelled")


async def run(plan: Plan) -> Outcome:
    outcome = Outcome("worker")
    rounds = plan.size(20, 2)
    target = Target(generator="tiny")
    await asyncio.to_thread(target.start)
    stop = asyncio.Event()
    session = asyncio.create_task(stream_analysis(target.ws, stop, plan.seed))
    results: list[dict[str, Any]] = []
    rng = random.Random(plan.seed)
    alive_throughout = True
    try:
        for i in range(rounds):
            results.append(await kill_round(target, i % 2 == 1, rng))
            alive_throughout &= target.alive
            last = results[-1]
            plan.progress(f"worker: round {i + 1}/{rounds}: back in {last['down_s']} s, "
                          f"generation {'ok' if last['generated'] else 'FAILED'}")  # fmt: skip
        stop.set()
        analysis = await asyncio.wait_for(session, 60)
        leftover = worker_pids(target)
    finally:
        session.cancel()
        alive_throughout &= target.alive
        exit_code = await asyncio.to_thread(target.stop)
    report(outcome, results, analysis, rounds, alive_throughout, leftover)
    outcome.figures["front_end_exit_code_at_stop"] = exit_code
    return outcome


# --- the worker, from the outside ----------------------------------------------------------


def worker_pids(target: Target) -> list[int]:
    """The server's generation workers: its spawn children (not the resource tracker), zombies
    left out (a killed worker not yet reaped is no worker)."""
    found = []
    for pid in target.children():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # it exited between the listing and the reading
        if b"spawn_main" in cmdline and state != "Z":
            found.append(pid)
    return found


async def new_worker(target: Target, known: set[int]) -> int:
    """A worker not in `known`, as soon as it appears."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if fresh := [pid for pid in worker_pids(target) if pid not in known]:
            return fresh[0]
        await asyncio.sleep(0.01)
    raise TimeoutError("no new generation worker appeared")


async def restarts(target: Target) -> int:
    """How many times the server has restarted its worker (its /readyz says)."""
    _, body = await asyncio.to_thread(target.get, "/readyz")
    return int(((body or {}).get("generation") or {}).get("restarts", -1))


async def until_back(target: Target, restarts_before: int) -> bool:
    """Wait until /readyz is 200 after the server has seen the worker die (a 200 from before it
    noticed is not "back"); False if that does not come within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status, body = await asyncio.to_thread(target.get, "/readyz")
        seen = ((body or {}).get("generation") or {}).get("restarts", -1) > restarts_before
        if status == 200 and seen:
            return True
        await asyncio.sleep(0.05)
    return False


async def kill_round(target: Target, during_restart: bool, rng: random.Random
                     ) -> dict[str, Any]:  # fmt: skip
    """Kill the worker (and, `during_restart`, its replacement while it loads); then how long
    until /readyz is 200 again and whether a generation works."""
    began = time.monotonic()
    victim = await new_worker(target, set())
    before = await restarts(target)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    result: dict[str, Any] = {"killed": [victim], "during_restart": False}
    if during_restart:
        loading = await new_worker(target, {victim})
        await asyncio.sleep(rng.uniform(0.0, LOADING_KILL_S))  # at some point of its loading
        # Only a kill before the server says ready again counts as one "during restart".
        result["during_restart"] = (await asyncio.to_thread(target.get, "/readyz"))[0] != 200
        os.kill(loading, signal.SIGKILL)
        result["killed"].append(loading)
    back = await until_back(target, before)
    result["down_s"] = round(time.monotonic() - killed_at, 2) if back else None
    result["generated"], result["generation"] = await generate_once(target.ws)
    result["round_s"] = round(time.monotonic() - began, 2)
    return result


# --- what clients see ----------------------------------------------------------------------


async def generate_once(url: str) -> tuple[bool, dict[str, Any]]:
    """One session asks for one generation: ok when it is done and its audio arrived."""
    began = time.monotonic()
    frames, outcome = 0, None
    try:
        async with asyncio.timeout(WAIT_S), connect(url) as ws:
            start = {"type": "start", "sample_rate": RATE, "channels": 1, "encoding": "pcm_s16le",
                     "config": {"generation": GENERATION}}  # fmt: skip
            await ws.send(json.dumps(start))
            await ws.recv()  # ready
            await ws.send(json.dumps({"type": "generate"}))
            async for message in ws:
                if isinstance(message, bytes):
                    frames += 1
                    continue
                event = json.loads(message)
                if event["type"] in TERMINAL or event["type"] == "error":
                    outcome = event
                    break
            await ws.send(json.dumps({"type": "stop"}))
    except Exception as exc:  # noqa: BLE001 - any failure is a miss, said how
        return False, {"error": f"{type(exc).__name__}: {exc}"}
    kind = outcome["type"] if outcome else None
    detail = {"outcome": kind, "frames": frames, "seconds": round(time.monotonic() - began, 2)}
    if outcome and kind != "generation.done":
        detail["code"] = outcome.get("code") or outcome.get("reason")
    return kind == "generation.done" and frames > 0, detail


async def stream_analysis(url: str, stop: asyncio.Event, seed: int) -> StreamResult | str:
    """One live-paced session until `stop`; any break is a failure (no resume allowed)."""
    clip = speech_like(10.0, seed)

    async def blocks() -> AsyncIterator[np.ndarray]:
        i = 0
        while not stop.is_set():
            yield clip[i : i + FRAME, None]
            i = (i + FRAME) % len(clip)

    client = StreamClient(url, RATE, 1, Encoding.PCM_S16LE, {"when_behind": "skip"},
                          resume_seconds=0)  # fmt: skip
    try:
        return await client.run(blocks(), realtime=True)
    except Exception as exc:  # noqa: BLE001 - reported as the session's failure
        return f"{type(exc).__name__}: {exc}"


# --- the report ----------------------------------------------------------------------------


def report(
    outcome: Outcome, results: list[dict[str, Any]], analysis: StreamResult | str, rounds: int,
    alive: bool, leftover: list[int],
) -> None:  # fmt: skip
    downs = [r["down_s"] for r in results if r["down_s"] is not None]
    generated = sum(r["generated"] for r in results)
    worst = max(downs) if len(downs) == len(results) and downs else float("inf")
    session = session_figures(analysis)
    outcome.figures.update(
        rounds=results,
        down_s={"max": worst, "median": round(statistics.median(downs), 2) if downs else None},
        kills=sum(len(r["killed"]) for r in results),
        kills_during_restart=sum(r["during_restart"] for r in results),
        analysis_session=session,
        workers_at_end=leftover,
    )
    kills = outcome.figures["kills"]
    outcome.summary = (
        f"{kills} SIGKILLs of the generation worker in {len(results)} rounds "
        f"({outcome.figures['kills_during_restart']} of them while its replacement loaded); "
        f"back in {outcome.figures['down_s']['median']} s median, {worst} s worst; "
        f"a live session streamed throughout"
    )
    outcome.exactly("front-end exits", 0 if alive else 1, 0)
    outcome.exactly("rounds (kill -9, every other one again during restart)", len(results), rounds)
    outcome.check("generation available again (readyz 200 + a real generation)",
                  f"{generated}/{rounds}", f"{rounds}/{rounds}", generated == rounds)  # fmt: skip
    outcome.at_most(
        "worst time from the kill to /readyz 200", worst, BACK_WITHIN_S, " s", timed=True
    )
    outcome.check("analysis session during the kills", session["verdict"], "unaffected: no error, "
                  "end, every sample", session["verdict"] == "unaffected")  # fmt: skip
    outcome.exactly("generation workers at the end (no orphan, no zombie)", len(leftover), 1)


def session_figures(analysis: StreamResult | str) -> dict[str, Any]:
    if isinstance(analysis, str):
        return {"verdict": f"broke: {analysis}"}
    end = analysis.end or {}
    figures = {
        "errors": [e.get("code") for e in analysis.errors],
        "end": analysis.end is not None,
        "close_code": analysis.close_code,
        "samples_sent": analysis.samples_sent,
        "samples_received": end.get("samples_received"),
        "chunks": len(analysis.analysis),
        "skipped": end.get("skipped"),
    }
    whole = figures["samples_received"] == analysis.samples_sent
    fine = not figures["errors"] and figures["end"] and figures["close_code"] == 1000 and whole
    figures["verdict"] = "unaffected" if fine else "affected"
    return figures
