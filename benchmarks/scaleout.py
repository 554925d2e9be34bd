"""`python -m benchmarks.scaleout`: several front-ends on one PostgreSQL behind HAProxy, measured
on this machine in one run (a VM's speed varies by the hour: compare only within a run).

1. latency: the same live load (WebSocket, the bench's model and session settings) on
   (a) one front-end with the embedded SQLite store, direct; (b) one front-end with PostgreSQL,
   direct; (c) the same through HAProxy; (d) two front-ends with PostgreSQL through HAProxy.
   b - a is PostgreSQL's share of the latency per event, c - b the balancer's. The setups run in
   rounds, the order reversed every other round (a b c d, d c b a), so a drift of the machine's
   speed over the run falls on all of them alike.
2. writes: PostgreSQL's work per session while (b) and (d) run: transactions, rows and WAL bytes
   (`pg_stat_database`, `pg_current_wal_lsn()`) over a window in the middle of the load, when
   every session streams, divided by the session-seconds of audio in the window; and from those,
   a paper estimate for 10,000 concurrent sessions.
3. failover: one live session through the balancer to two front-ends (`--lease-seconds 2`,
   `--drain-seconds 1`); after a few seconds the front-end serving it is killed (SIGKILL: the
   other takes the session over once the lease expires) or stopped (SIGTERM: it drains, then
   hands the session over); from the signal to the client's `ready` on the other front-end and
   to the first analysis event it sends. The stopped front-end is started again between repeats.

Every front-end is a real `python -m stream serve` process, PostgreSQL a throwaway cluster
(grym/cluster/postgres.py), HAProxy the project's configuration (grym/cluster/haproxy.py).
Writes scaleout.json (every number) and scaleout.md (the tables) into --out.

    python -m benchmarks.scaleout            # the full run (about 5 minutes on 2 cores)
    python -m benchmarks.scaleout --quick    # tiny model, seconds of audio: proves the tool works
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from benchmarks.analysis_kernels import machine_info
from benchmarks.bench import progress
from benchmarks.load import (
    CONFIG,
    RATE,
    _frames,
    event_rows,
    http_base,
    lag_between,
    scrape_lag,
    speech_like,
    summarize,
)
from clients.stream_client import StreamClient, StreamResult, percentile
from grym.cluster.haproxy import Balancer
from grym.cluster.postgres import Postgres, free_port
from stream.core.audio.pcm import Encoding

ROOT = Path(__file__).resolve().parent.parent
SETUPS = {  # key: (what, store, front-ends, through the balancer)
    "a": ("1 front-end, SQLite, direct", "sqlite", 1, False),
    "b": ("1 front-end, PostgreSQL, direct", "postgresql", 1, False),
    "c": ("1 front-end, PostgreSQL, HAProxy", "postgresql", 1, True),
    "d": ("2 front-ends, PostgreSQL, HAProxy", "postgresql", 2, True),
}
ESTIMATE_SESSIONS = 10_000
START_TIMEOUT_S = 300.0  # a first start may export the model


# --- front-end processes ---------------------------------------------------------------------
class Frontend:
    """One `python -m stream serve` on a fixed port (so that it can be started again where the
    balancer expects it), its log in a file of its folder."""

    def __init__(self, name: str, folder: Path, flags: list[str]) -> None:
        self.name, self.flags = name, flags
        self.folder = folder / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = self.folder / "server.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log_from = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Frontend:
        return self.launch().wait_started()

    def launch(self) -> Frontend:
        """The process, started (wait_started: until it listens)."""
        self._log_from = self.log.stat().st_size if self.log.exists() else 0
        command = [sys.executable, "-m", "stream", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "info", "--frontend-id", self.name,
                   "--data-dir", str(self.folder), *self.flags]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
            )  # fmt: skip
        return self

    def wait_started(self) -> Frontend:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if b"Uvicorn running on" in self.log.read_bytes()[self._log_from :]:
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"front-end {self.name} did not start:\n{self.log.read_text()[-3000:]}")

    def signal(self, how: signal.Signals) -> None:
        assert self.process is not None
        os.kill(self.process.pid, how)

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def stop(self) -> None:
        """SIGTERM (it drains and exits), then SIGKILL to its process group if it lingers."""
        if self.process is None:
            return
        self.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:  # anything it started (its own session's group)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(10)


@contextmanager
def frontends(folder: Path, flags: dict[str, list[str]]) -> Iterator[list[Frontend]]:
    """Started together (each loads its model while the others do), stopped together."""
    started: list[Frontend] = []
    try:
        for name, its_flags in flags.items():
            started.append(Frontend(name, folder, its_flags).launch())
        for frontend in started:
            frontend.wait_started()
        yield started
    finally:
        for frontend in started:
            frontend.terminate()
        for frontend in started:
            frontend.stop()


# --- live load -------------------------------------------------------------------------------
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
        **extra,
    }


# --- PostgreSQL's counters -------------------------------------------------------------------
COUNTERS = (
    "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, "
    "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint "
    "FROM pg_stat_database WHERE datname = %s"
)
COUNTER_NAMES = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted",
                 "wal_bytes")  # fmt: skip


async def counters(admin_url: str, database: str) -> dict[str, float]:
    """The database's cumulative counters and the cluster's WAL position, now. Read from
    another database (`postgres`), so that reading does not count. A backend publishes its
    counters at most once a second while busy: each reading is up to ~1 s behind, which
    cancels over a window whose both ends are under the same load."""
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as db:
        row = await (await db.execute(COUNTERS, (database,))).fetchone()
    assert row is not None
    return {"t": time.monotonic(), **dict(zip(COUNTER_NAMES, map(float, row), strict=True))}


def window_of(
    admin_url: str, database: str, lead: float, length: float, sessions: int
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A `during` for live_load: counters at `lead` s into the load and `length` s later."""

    async def during() -> dict[str, Any]:
        await asyncio.sleep(lead)
        before = await counters(admin_url, database)
        await asyncio.sleep(length)
        after = await counters(admin_url, database)
        return {"db_window": {"before": before, "after": after, "sessions": sessions}}

    return during


def write_rates(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per session and second of audio, over the windows (pooled)."""
    span = sum(w["after"]["t"] - w["before"]["t"] for w in windows)
    session_s = sum((w["after"]["t"] - w["before"]["t"]) * w["sessions"] for w in windows)
    delta = {k: sum(w["after"][k] - w["before"][k] for w in windows) for k in COUNTER_NAMES}
    rows = delta["tup_inserted"] + delta["tup_updated"] + delta["tup_deleted"]
    return {
        "window_s": round(span, 2),
        "session_seconds": round(session_s, 2),
        "delta": delta,
        "per_session": {
            "transactions_per_s": delta["xact_commit"] / session_s,
            "rows_per_s": rows / session_s,
            "inserted_per_s": delta["tup_inserted"] / session_s,
            "updated_per_s": delta["tup_updated"] / session_s,
            "wal_kb_per_s": delta["wal_bytes"] / 1024 / session_s,
        },
        "total_per_s": {
            "transactions_per_s": delta["xact_commit"] / span,
            "rows_per_s": rows / span,
            "wal_kb_per_s": delta["wal_bytes"] / 1024 / span,
        },
    }


def estimate(per_session: dict[str, float], bench: dict[str, Any] | None) -> dict[str, Any]:
    """10,000 concurrent sessions on paper: the measured rates times 10,000, and the cores the
    analysis needs at the full bench's sessions per core (its committed run, if any)."""
    n = ESTIMATE_SESSIONS
    out: dict[str, Any] = {
        "sessions": n,
        "transactions_per_s": per_session["transactions_per_s"] * n,
        "rows_per_s": per_session["rows_per_s"] * n,
        "wal_mb_per_s": per_session["wal_kb_per_s"] * n / 1024,
        "wal_gb_per_hour": per_session["wal_kb_per_s"] * n * 3600 / 1024**2,
    }
    if bench:
        sessions = bench["headline"]["max_sustained_sessions"]
        cpus = bench["machine"]["usable_cpus"]
        per_core = sessions / cpus
        out.update({
            "bench_sessions": sessions, "bench_cpus": cpus, "bench_created": bench["created"],
            "bench_cpu": bench["machine"]["cpu"],
            "sessions_per_core": per_core, "cores": int(np.ceil(n / per_core)),
            "frontends_of_16_cores": int(np.ceil(n / per_core / 16)),
        })  # fmt: skip
    return out


# --- failover --------------------------------------------------------------------------------
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


def healthy(url: str, timeout: float = 30.0) -> None:
    """Until the front-end answers /readyz with 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, or 503 (HTTPError is an OSError)
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} is not ready")


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


# --- the latency setups ----------------------------------------------------------------------
def analysis_flags(args: argparse.Namespace) -> list[str]:
    """The bench's server settings (benchmarks/bench.py), generation off."""
    return ["--analysis-model", args.model, "--analysis-variant", args.variant,
            "--analysis-threads", str(args.threads), "--max-sessions", "512",
            "--generator", "none"]  # fmt: skip


async def warm(urls: list[str]) -> None:
    """One short session each, so that nothing lazy lands in the first measured events."""
    await asyncio.gather(*(live_session(url, speech_like(1.0, 999), 0.0) for url in urls))


def run_latency(args: argparse.Namespace, folder: Path, pg: Postgres) -> dict[str, Any]:
    flags = analysis_flags(args)
    admin = pg.url.rsplit("/", 1)[0] + "/postgres"
    database = pg.url.rsplit("/", 1)[1]
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
                    window_of(admin, database, lead, length, args.sessions)
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
            "setups": setups, "shares": shares(setups)}  # fmt: skip


def pooled(key: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One setup over its rounds: percentiles of all its events together."""
    what, store, count, balanced = SETUPS[key]
    latencies = [x for r in rows for x in r["latencies_ms"]]
    server = [x for r in rows for x in r["server_ms"]]
    transport = [x for r in rows for x in r["transport_ms"]]
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
        "skipped": sum(r["skipped"] for r in rows),
        "missing": sum(r["missing"] for r in rows),
        "errors": [e for r in rows for e in r["errors"]][:5],
        "sessions_whole": sum(e["whole"] for r in rows for e in r["ends"]),
        "sessions_run": sum(len(r["ends"]) for r in rows),
        "writes": write_rates(windows) if windows else None,
        "rounds": [
            {k: v for k, v in r.items() if k not in ("latencies_ms", "server_ms", "transport_ms")}
            for r in rows
        ],
    }


def shares(setups: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """What each step from one setup to the next adds per event."""
    steps = {"postgresql": ("b", "a"), "balancer": ("c", "b"), "second_frontend": ("d", "c")}
    keys = ("p50_ms", "p95_ms", "mean_ms", "server_mean_ms", "transport_mean_ms")
    return {name: {k: setups[x][k] - setups[y][k] for k in keys} for name, (x, y) in steps.items()}


# --- the report ------------------------------------------------------------------------------
def headline(result: dict[str, Any]) -> dict[str, float]:
    share, fail = result["latency"]["shares"], result["failover"]
    writes = result["writes"]["per_session"]
    return {
        "postgresql_share_p50_ms": share["postgresql"]["p50_ms"],
        "balancer_share_p50_ms": share["balancer"]["p50_ms"],
        "balancer_share_transport_ms": share["balancer"]["transport_mean_ms"],
        "transactions_per_s_per_session": writes["transactions_per_s"],
        "rows_per_s_per_session": writes["rows_per_s"],
        "wal_kb_per_s_per_session": writes["wal_kb_per_s"],
        "sigkill_to_first_event_s": fail["sigkill"]["median_to_first_event_s"],
        "sigterm_to_first_event_s": fail["sigterm"]["median_to_first_event_s"],
    }


def markdown(result: dict[str, Any]) -> str:
    lat, fail, s = result["latency"], result["failover"], result["settings"]
    setups, share = lat["setups"], lat["shares"]
    quick = " (quick)" if s["quick"] else ""
    lines = [
        f"# Scale-out on one machine{quick} ({result['created']})",
        "",
        f"`{result['command']}`: {result['wall_s']:g} s. Machine: {result['machine']['cpu']}, "
        f"{result['machine']['usable_cpus']} usable CPUs. Analysis: `{s['model']}` "
        f"{s['variant']} on {s['threads']} ONNX Runtime threads per front-end; sessions: 1 s "
        f"chunks + 1 s left context, 16 kHz s16, live-paced, staggered starts.",
        "",
        f"## Latency per event: {lat['sessions']} live sessions x {lat['seconds']:g} s, "
        f"{lat['rounds']} round(s) per setup",
        "",
        "| setup | events | p50 ms | p95 ms | mean ms | server mean ms | transport mean ms "
        "| skipped | missing | sessions whole |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in setups.items():
        lines.append(
            f"| ({key}) {row['what']} | {row['events']} | {row['p50_ms']:.1f} | "
            f"{row['p95_ms']:.1f} | {row['mean_ms']:.1f} | {row['server_mean_ms']:.1f} | "
            f"{row['transport_mean_ms']:.2f} | {row['skipped']} | {row['missing']} | "
            f"{row['sessions_whole']}/{row['sessions_run']} |"
        )
    lines += [
        "",
        "| share of latency per event | p50 ms | p95 ms | server mean ms | transport mean ms |",
        "|---|---|---|---|---|",
    ]
    for name, (label, pair) in {
        "postgresql": ("PostgreSQL instead of SQLite", "b - a"),
        "balancer": ("HAProxy in front", "c - b"),
        "second_frontend": ("a second front-end on the same cores", "d - c"),
    }.items():
        d = share[name]
        lines.append(
            f"| {label} ({pair}) | {d['p50_ms']:+.1f} | {d['p95_ms']:+.1f} | "
            f"{d['server_mean_ms']:+.1f} | {d['transport_mean_ms']:+.2f} |"
        )
    lines += [
        "",
        "## PostgreSQL's work per live session",
        "",
        "| measured during | window s | session-seconds | transactions/s | rows/s "
        "| inserted/s | updated/s | WAL KB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ("b", "d"):
        w = setups[key]["writes"]
        if not w:
            continue
        p = w["per_session"]
        lines.append(
            f"| ({key}) {setups[key]['what']} | {w['window_s']:.1f} | {w['session_seconds']:.1f}"
            f" | {p['transactions_per_s']:.2f} | {p['rows_per_s']:.2f} | "
            f"{p['inserted_per_s']:.2f} | {p['updated_per_s']:.2f} | {p['wal_kb_per_s']:.2f} |"
        )
    e = result["writes"]["estimate"]
    lines += [
        "",
        f"On paper, {e['sessions']:,} concurrent sessions at these rates: "
        f"{e['transactions_per_s']:,.0f} transactions/s, {e['rows_per_s']:,.0f} rows/s, "
        f"{e['wal_mb_per_s']:.1f} MB/s of WAL ({e['wal_gb_per_hour']:.0f} GB/hour)"
        + (
            f"; analysis at the bench's {e['bench_sessions']} sessions per "
            f"{e['bench_cpus']} cores: {e['cores']:,} cores "
            f"({e['frontends_of_16_cores']} front-ends of 16 cores)."
            if "cores" in e
            else "."
        ),
        "",
        f"## Time to resume on another front-end (lease {fail['lease_seconds']:g} s, "
        f"drain {fail['drain_seconds']:g} s, balancer checks every {fail['check_inter']})",
        "",
        "| signal | run | from -> to | signal -> ready s | signal -> first analysis event s "
        "| signal -> first new chunk s | all samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for how in ("sigkill", "sigterm"):
        part = fail[how]
        for i, run in enumerate(part["runs"]):
            lines.append(
                f"| {run['signal']} | {i + 1} | {run['from']} -> {run['to']} | "
                f"{run['to_ready_s']:.2f} | {run['to_first_event_s']:.2f} | "
                f"{run['to_first_new_chunk_s']:.2f} | {'yes' if run['whole'] else 'no'} |"
            )
        lines.append(
            f"| {how.upper()} | median | | {part['median_to_ready_s']:.2f} | "
            f"{part['median_to_first_event_s']:.2f} | {part['median_to_first_new_chunk_s']:.2f} |"
            " |"
        )
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaleout",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny model, seconds of audio (tests)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scaleout"))
    p.add_argument("--model", help="analysis preset (default base-random; quick: tiny-random)")
    p.add_argument("--variant", default="int8", choices=["fp32", "fp32-opt", "int8"])
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads per front-end")
    p.add_argument("--sessions", type=int, help="live sessions per setup (4; quick: 2)")
    p.add_argument("--seconds", type=float, help="audio per session (20; quick: 4)")
    p.add_argument("--rounds", type=int, help="rounds of the setups (2; quick: 1)")
    p.add_argument("--repeats", type=int, help="failovers per signal (3; quick: 1)")
    p.add_argument("--lease-seconds", type=float, default=2.0, help="failover front-ends' lease")
    p.add_argument("--drain-seconds", type=float, default=1.0, help="and their drain")
    p.add_argument("--kill-after", type=float, help="seconds into the session (4; quick: 2.5)")
    p.add_argument("--failover-seconds", type=float, help="audio of it (12; quick: 7)")
    args = p.parse_args(argv)
    defaults = {"model": "tiny-random" if args.quick else "base-random",
                "sessions": 2 if args.quick else 4, "seconds": 4.0 if args.quick else 20.0,
                "rounds": 1 if args.quick else 2, "repeats": 1 if args.quick else 3,
                "kill_after": 2.5 if args.quick else 4.0,
                "failover_seconds": 7.0 if args.quick else 12.0}  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    bench_json = ROOT / "benchmarks" / "results" / "bench" / "bench.json"
    bench = json.loads(bench_json.read_text()) if bench_json.exists() else None
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m benchmarks.scaleout",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(args.threads),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"session_config": CONFIG},
    }  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="grym-scaleout-"))
    try:
        progress(f"scale-out: starting PostgreSQL; results in {args.out}")
        with Postgres() as pg:  # its own folder: the postgres user must reach it
            result["latency"] = run_latency(args, folder, pg)
            setups = result["latency"]["setups"]
            windows = [w for key in ("b", "d") for w in
                       (r.get("db_window") for r in setups[key]["rounds"]) if w]  # fmt: skip
            per = write_rates(windows)
            result["writes"] = {**per, "estimate": estimate(per["per_session"], bench)}
            result["failover"] = run_failover(args, folder, pg.url)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["wall_s"] = round(time.time() - began, 1)
    result["headline"] = headline(result)
    (args.out / "scaleout.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / "scaleout.md").write_text(text)
    print("\n" + text)
    print(f"wrote {args.out / 'scaleout.json'}, {args.out / 'scaleout.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
