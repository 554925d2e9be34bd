"""Part 3, failover: one live session through the balancer to two front-ends; the front-end
serving it is killed or stopped, and the time until the other one serves it is measured."""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import CONFIG, RATE, _frames, progress, speech_like
from benchmarks.scaleout.frontends import Frontend, analysis_flags, frontends, healthy
from clients.stream_client import StreamClient
from grym.cluster import free_port
from grym.cluster.haproxy import Balancer
from stream.core.audio.pcm import Encoding


class TimedClient(StreamClient):
    """Notes when each `ready` arrived (the first, and one after each resume)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.readies: list[tuple[float, dict[str, Any]]] = []

    async def _start(self, ws: Any, resume: bool) -> dict[str, Any]:
        ready = await super()._start(ws, resume)
        self.readies.append((time.monotonic(), ready))
        return ready


async def failover_once(
    balancer: Balancer, pool: dict[str, Frontend], how: signal.Signals, seconds: float,
    kill_after: float, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """One live session through the balancer; `kill_after` s in, the front-end serving it gets
    `how`; the times from the signal to the `ready` and to the first analysis event of the
    other front-end."""
    audio = speech_like(seconds, seed)
    first_analysis = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "analysis":
            first_analysis.set()

    client = TimedClient(
        balancer.url, RATE, 1, Encoding.PCM_S16LE, {**CONFIG, "when_behind": "wait"},
        on_event=on_event, resume_seconds=60,
    )  # fmt: skip
    began = time.monotonic()
    running = asyncio.create_task(client.run(_frames(audio), realtime=True))
    await asyncio.wait_for(first_analysis.wait(), 60)
    await asyncio.sleep(max(0.0, began + kill_after - time.monotonic()))
    first = client.readies[-1][1]["frontend"]
    killed_at = time.monotonic()
    pool[first].signal(how)
    result = await asyncio.wait_for(running, 120)
    after = [(t, r) for t, r in client.readies if t > killed_at]
    ready_at, ready = after[0] if after else (float("nan"), {})
    seen_before = {e["seq"] for e in result.analysis if e["client_time"] <= killed_at}
    resumed = [e for e in result.analysis if e["client_time"] > ready_at]
    fresh = [e for e in resumed if e["seq"] not in seen_before]
    return {
        "signal": how.name,
        "killed_after_s": round(killed_at - began, 3),
        "from": first,
        "to": ready.get("frontend"),
        "resumes": result.resumes,
        "to_ready_s": ready_at - killed_at,
        "to_first_event_s": resumed[0]["client_time"] - killed_at if resumed else float("nan"),
        "to_first_new_chunk_s": fresh[0]["client_time"] - killed_at if fresh else float("nan"),
        "samples_sent": len(audio),
        "samples_received": (result.end or {}).get("samples_received"),
        "whole": result.end is not None and result.end.get("samples_received") == len(audio),
        "chunks": sorted({e["seq"] for e in result.analysis}) == list(range(result.end["chunks"]))
        if result.end
        else False,
        "close_code": result.close_code,
    }


def run_failover(args: argparse.Namespace, folder: Path, store: str) -> dict[str, Any]:
    flags = [*analysis_flags(args), "--store", store, "--lease-seconds", str(args.lease_seconds),
             "--drain-seconds", str(args.drain_seconds)]  # fmt: skip
    out: dict[str, Any] = {"lease_seconds": args.lease_seconds,
                           "drain_seconds": args.drain_seconds, "check_inter": "300ms"}  # fmt: skip
    with frontends(folder, {"edge-1": flags, "edge-2": flags}) as pair:
        pool = {f.name: f for f in pair}
        with Balancer(free_port(), [(f.name, f.port) for f in pair]) as balancer:
            for how in (signal.SIGKILL, signal.SIGTERM):
                runs = []
                for i in range(args.repeats):
                    progress(f"failover: {how.name} of the serving front-end, {i + 1} of "
                             f"{args.repeats} ...")  # fmt: skip
                    run = asyncio.run(failover_once(
                        balancer, pool, how, args.failover_seconds, args.kill_after, seed=100 + i
                    ))  # fmt: skip
                    runs.append(run)
                    progress(
                        f"  {run['from']} -> {run['to']}: ready after {run['to_ready_s']:.2f} s,"
                        f" first analysis event after {run['to_first_event_s']:.2f} s"
                        f" (first new chunk {run['to_first_new_chunk_s']:.2f} s); all samples: "
                        f"{run['whole']}"
                    )
                    gone = pool[run["from"]]
                    if gone.process is not None:
                        gone.process.wait(30)  # SIGTERM: drains, hands over, exits by itself
                    if how == signal.SIGTERM and i == args.repeats - 1:
                        break  # the last: no need of it again
                    gone.start()  # again, on its port: the balancer's check finds it
                    healthy(gone.http)
                    time.sleep(1.0)  # the balancer's health check (every 300 ms) marks it up
                out[how.name.lower()] = {
                    "runs": runs,
                    **{f"median_{k}": float(np.median([r[k] for r in runs]))
                       for k in ("to_ready_s", "to_first_event_s", "to_first_new_chunk_s")},
                }  # fmt: skip
    return out
