"""Part 1, latency: the same live load on each setup (a-d), in rounds; each setup's events
pooled over its rounds, and the share of each step from one setup to the next."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import (
    CONFIG,
    RATE,
    _frames,
    event_rows,
    http_base,
    lag_between,
    progress,
    scrape_lag,
    speech_like,
    summarize,
)
from benchmarks.scaleout.frontends import analysis_flags, frontends
from benchmarks.scaleout.writes import sizes, window_of, write_rates
from clients.stream_client import StreamClient, StreamResult, percentile
from grym.cluster import free_port
from grym.cluster.haproxy import Balancer
from grym.cluster.postgres import Postgres
from stream.core.audio.pcm import Encoding

SETUPS = {  # key: (what, store, front-ends, through the balancer)
    "a": ("1 front-end, SQLite, direct", "sqlite", 1, False),
    "b": ("1 front-end, PostgreSQL, direct", "postgresql", 1, False),
    "c": ("1 front-end, PostgreSQL, HAProxy", "postgresql", 1, True),
    "d": ("2 front-ends, PostgreSQL, HAProxy", "postgresql", 2, True),
}
LISTS = ("latencies_ms", "server_ms", "transport_ms", "beside_ms")  # per event: pooled, not kept


async def live_session(url: str, audio: np.ndarray, delay: float) -> tuple[StreamResult, int]:
    await asyncio.sleep(delay)
    client = StreamClient(url, RATE, 1, Encoding.PCM_S16LE, dict(CONFIG), resume_seconds=0)
    return await client.run(_frames(audio), realtime=True), len(audio)


async def live_load(
    url: str,
    sessions: int,
    seconds: float,
    seed: int,
    during: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """`sessions` live sessions of `seconds` each, starts spread over one chunk period (as
    benchmarks/load.py's run_level); per session, whether it ended with all its samples.
    `during` runs beside the sessions (the database's counters)."""
    rng = random.Random(seed)
    http = http_base(url)
    lag_before = scrape_lag(http)
    period = CONFIG["chunk_seconds"]
    runs = [
        live_session(url, speech_like(seconds, seed + i),
                     period * (i + rng.uniform(0, 0.2)) / sessions)
        for i in range(sessions)
    ]  # fmt: skip
    started = time.perf_counter()
    gathered = asyncio.gather(*runs)
    extra = await during() if during is not None else {}
    ran = await gathered
    results = [result for result, _ in ran]
    rows = event_rows(results)
    chunks = int(np.ceil(seconds / period))
    ends = [
        {"samples_sent": sent, "samples_received": (r.end or {}).get("samples_received"),
         "ended": r.end is not None, "close_code": r.close_code,
         "whole": r.end is not None and r.end.get("samples_received") == sent}
        for r, sent in ran
    ]  # fmt: skip
    return {
        "sessions": sessions,
        "seconds": seconds,
        "wall_s": round(time.perf_counter() - started, 2),
        "skipped": sum((r.end or {}).get("skipped", 0) for r in results),
        "missing": sum(
            max(0, chunks - len(r.analysis) - (r.end or {}).get("skipped", 0)) for r in results
        ),
        "errors": [e for r in results for e in r.errors][:5],
        "ends": ends,
        **summarize(rows),
        "loop_lag": lag_between(lag_before, scrape_lag(http)),
        "latencies_ms": sorted(r["latency_ms"] for r in rows),
        "server_ms": [r["server_ms"] for r in rows if "server_ms" in r],
        "transport_ms": [r["transport_ms"] for r in rows if "transport_ms" in r],
        # all but the model's compute: what a store or a balancer could add to, and what a
        # drift of the machine's speed over the run touches least
        "beside_ms": [r["latency_ms"] - r["inference_ms"] for r in rows if "inference_ms" in r],
        **extra,
    }


async def warm(urls: list[str]) -> None:
    """One short session each, so that nothing lazy lands in the first measured events."""
    await asyncio.gather(*(live_session(url, speech_like(1.0, 999), 0.0) for url in urls))


def run_latency(args: argparse.Namespace, folder: Path, pg: Postgres) -> dict[str, Any]:
    flags = analysis_flags(args)
    admin = pg.url.rsplit("/", 1)[0] + "/postgres"
    lead = min(2.0, args.seconds / 4)
    length = args.seconds - lead - min(1.5, args.seconds / 4)
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in SETUPS}
    with ExitStack() as stack:
        progress("starting front-ends: one on SQLite, two on PostgreSQL ...")
        shared = [*flags, "--store", pg.url]
        lite, one, two = stack.enter_context(
            frontends(folder, {"sqlite-1": flags, "pg-1": shared, "pg-2": shared})
        )
        single = stack.enter_context(Balancer(free_port(), [(one.name, one.port)]))
        both = stack.enter_context(
            Balancer(free_port(), [(one.name, one.port), (two.name, two.port)])
        )
        asyncio.run(warm([lite.url, one.url, two.url]))
        urls = {"a": lite.url, "b": one.url, "c": single.url, "d": both.url}
        for round_ in range(args.rounds):
            order = list(SETUPS) if round_ % 2 == 0 else list(reversed(SETUPS))
            for key in order:
                what, store, _, _ = SETUPS[key]
                progress(f"round {round_ + 1}: ({key}) {what}: {args.sessions} live session(s) "
                         f"x {args.seconds:g} s ...")  # fmt: skip
                during = (
                    window_of(admin, pg.url, lead, length, args.sessions)
                    if store == "postgresql" else None
                )  # fmt: skip
                row = asyncio.run(
                    live_load(urls[key], args.sessions, args.seconds, 10 * round_, during)
                )
                runs[key].append(row)
                progress(
                    f"  p50 {row['p50_ms']:.1f} / p95 {row['p95_ms']:.1f} ms, server "
                    f"{row['stages_mean_ms']['server_ms']:.1f} + transport "
                    f"{row['stages_mean_ms']['transport_ms']:.1f} ms mean; skipped "
                    f"{row['skipped']}, missing {row['missing']}, all samples: "
                    f"{all(e['whole'] for e in row['ends'])}"
                )
    setups = {key: pooled(key, rows) for key, rows in runs.items()}
    return {"sessions": args.sessions, "seconds": args.seconds, "rounds": args.rounds,
            "setups": setups, "shares": shares(setups), "store_after": sizes(pg.url)}  # fmt: skip


def pooled(key: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One setup over its rounds: percentiles of all its events together."""
    what, store, count, balanced = SETUPS[key]
    latencies = [x for r in rows for x in r["latencies_ms"]]
    server = [x for r in rows for x in r["server_ms"]]
    transport = [x for r in rows for x in r["transport_ms"]]
    beside = [x for r in rows for x in r["beside_ms"]]
    windows = [r["db_window"] for r in rows if "db_window" in r]
    return {
        "what": what,
        "store": store,
        "frontends": count,
        "balancer": balanced,
        "events": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": float(np.mean(latencies)) if latencies else float("nan"),
        "server_mean_ms": float(np.mean(server)) if server else float("nan"),
        "server_p50_ms": percentile(server, 50),
        "transport_mean_ms": float(np.mean(transport)) if transport else float("nan"),
        "transport_p50_ms": percentile(transport, 50),
        "beside_p50_ms": percentile(beside, 50),
        "beside_mean_ms": float(np.mean(beside)) if beside else float("nan"),
        "skipped": sum(r["skipped"] for r in rows),
        "missing": sum(r["missing"] for r in rows),
        "errors": [e for r in rows for e in r["errors"]][:5],
        "sessions_whole": sum(e["whole"] for r in rows for e in r["ends"]),
        "sessions_run": sum(len(r["ends"]) for r in rows),
        "writes": write_rates(windows) if windows else None,
        "rounds": [{k: v for k, v in r.items() if k not in LISTS} for r in rows],
    }


def shares(setups: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """What each step from one setup to the next adds per event."""
    steps = {"postgresql": ("b", "a"), "balancer": ("c", "b"), "second_frontend": ("d", "c")}
    keys = ("p50_ms", "p95_ms", "mean_ms", "server_mean_ms", "transport_mean_ms",
            "beside_p50_ms", "beside_mean_ms")  # fmt: skip
    return {name: {k: setups[x][k] - setups[y][k] for k in keys} for name, (x, y) in steps.items()}
