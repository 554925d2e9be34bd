"""Floods beside live sessions: 10x real time, 1-sample frames, never-readers, half-open upgrades.

One server with default settings. Well-behaved live sessions (`benchmarks/load.py`: 20 ms frames
at real-time pace, end-to-end latency per analysis event) run alone first, then again during
each flood, one flood per phase:

- 10x real time: sessions sending speech-like audio 10x faster than real time, in 100 ms frames
  (the server allows up to 100x, `max_audio_speed`): they must be served to their end;
- 1-sample frames: flooders sending 1-sample frames as fast as they can, reconnecting the moment
  they are refused: every connection must end with `rate_limited` + close 1008;
- never-reading clients: sessions that stream at real time and never read a byte after the
  handshake (4 KiB receive buffer); the server must find them (`slow_consumer` after 30 s, or
  the keepalive ping after 40 s) and not grow meanwhile;
- half-open upgrades: connections that send half an HTTP upgrade (headers never finished) and as
  many that send nothing: all closed after `header_timeout_seconds`, the fds back.

Targets: the well-behaved p95 within 2x of alone and nothing of theirs skipped or missing, in each
phase; the server's RSS at the end within max(100 MiB, 25%) of its baseline (sampled all along:
figures.samples); fds back; the server alive. Quick: 1.2 s phases, 50 half-open pairs, and the
server started with `--header-timeout-seconds 1`; the never-readers are then only a load (the
server needs 30-40 s to find them).

The floods run in a process of their own at the lowest priority, standing in for a remote
attacker: what is measured is what the flood costs the server, not the CPU the attacker's own
process takes on this machine (nor the clock of the well-behaved clients' event loop).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.chaos.flood_clients import flood_in_process, raise_fd_limit
from benchmarks.chaos.outcome import Outcome, Plan
from benchmarks.chaos.target import Target
from benchmarks.load import run_level

NEEDS_PROCESS = True
WELL_BEHAVED = 3  # live sessions measured alone and beside each flood
KEEPALIVE_S = 45.0  # a never-reader is found within 20 s ping interval + 20 s timeout (+ 5 s)

# --- the scenario: alone, then beside each flood, on one server ------------------------------


async def run(plan: Plan) -> Outcome:
    outcome = Outcome("floods")
    fd_limit = raise_fd_limit()  # before the server starts: it inherits the limit
    pairs = min(plan.size(1000, 50), (fd_limit - 200) // 2)  # two sockets a pair
    header_timeout = plan.size(10.0, 1.0)
    phases = [  # (name, flood, its size, seconds of well-behaved sessions beside it)
        ("10x real time", "ten_x", plan.size(3, 2), plan.size(60, 1.2)),
        ("1-sample frames", "one_sample", plan.size(4, 2), plan.size(30, 1.2)),
        ("never-reading clients", "never_reading", plan.size(20, 5), plan.size(50, 1.2)),
        ("half-open upgrades", "half_open", pairs, plan.size(header_timeout + 5, 1.2)),
    ]
    spawn = multiprocessing.get_context("spawn")
    with Target(header_timeout_seconds=header_timeout) as target, \
            ProcessPoolExecutor(1, mp_context=spawn) as pool:  # fmt: skip
        # Before anything is timed, the flood process exists and the server has analysed:
        # first inferences are slow, and an inflated "alone" would loosen every 2x target.
        spawned = asyncio.get_running_loop().run_in_executor(pool, flood_in_process, "", "", 0, 0)
        await asyncio.gather(spawned, run_level(target.ws, WELL_BEHAVED, plan.size(5, 1)))
        sampler = Sampler(target, plan.size(1.0, 0.25))
        sampling = asyncio.create_task(sampler.run())
        plan.progress(f"floods: {WELL_BEHAVED} well-behaved sessions alone")
        alone = await _beside(target, pool, "", 0, plan.size(30, 1.2))
        base_rss, base_fds = target.rss_mib(), target.open_fds()
        results = {}
        for name, kind, size, seconds in phases:
            plan.progress(f"floods: {name} ({size}) beside {WELL_BEHAVED} sessions, {seconds} s")
            sampler.phase = name
            results[name] = await _beside(target, pool, kind, size, seconds, header_timeout)
        sampler.phase = "after"
        fds_before = results["half-open upgrades"]["fds_before"]
        back_after = await _settle(target, fds_before + 5, header_timeout + 5)
        end_rss, end_fds = target.rss_mib(), target.open_fds()
        alive = target.alive and target.get("/readyz")[0] == 200
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
    limit = base_rss + max(100.0, 0.25 * base_rss)
    outcome.figures = {
        "alone": alone,
        "phases": results,
        "rss_mib": {
            "baseline": round(base_rss, 1),
            "end": round(end_rss, 1),
            "by_phase": sampler.by_phase(2),
        },  # fmt: skip
        "fds": {
            "baseline": base_fds,
            "end": end_fds,
            "back_after_s": back_after,
            "by_phase": sampler.by_phase(3),
        },  # fmt: skip
        "fd_limit_client_and_server": fd_limit,
        "settings": "defaults (--generator none; --log-level info)"
        + ("; quick: --header-timeout-seconds 1, phases of 1.2 s" if plan.quick else ""),
        "samples": {"columns": Sampler.COLUMNS, "rows": sampler.rows},
    }
    _checks(outcome, alone, results, header_timeout, plan.quick, (fds_before, end_fds))
    outcome.at_most("server RSS after all floods (MiB)", round(end_rss, 1), round(limit, 1),
                    f" (baseline {base_rss:.0f} + max(100, 25%))", timed=True)  # fmt: skip
    outcome.exactly("server alive and ready after the floods", alive, True)
    p95 = "; ".join(f"{name} {_p95(r)}" for name, r in results.items())
    outcome.summary = (
        f"{WELL_BEHAVED} live sessions alone (p95 {_p95(alone)} ms), then beside each flood "
        f"(p95 ms: {p95}); server RSS {base_rss:.0f} -> {end_rss:.0f} MiB, fds {base_fds} -> "
        f"{end_fds}, peak {max(row[3] for row in sampler.rows)}"
    )
    return outcome


async def _beside(
    target: Target, pool: ProcessPoolExecutor, kind: str, size: int, seconds: float,
    header_timeout: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """Well-behaved sessions for `seconds` while a flood runs in the flood process, from a
    little before they start to a little after they end (none: alone)."""
    lead = (2.0 if seconds > 5 else 0.3) if kind else 0.0
    span = header_timeout + 5 if kind == "half_open" else 2 * lead + seconds
    before = await asyncio.to_thread(_metrics, target.http)
    fds_before, cpu_before, began = target.open_fds(), _cpu_s(target), time.monotonic()
    loop = asyncio.get_running_loop()
    flood = loop.run_in_executor(pool, flood_in_process, target.ws, kind, span, size)
    await asyncio.sleep(lead)
    level = await run_level(target.ws, WELL_BEHAVED, seconds)
    seen = await flood
    cpu = (_cpu_s(target) - cpu_before) / (time.monotonic() - began)
    keep = ("events", "skipped", "missing", "errors", "p50_ms", "p95_ms", "max_ms", "loop_lag",
            "stages_p50_ms")  # fmt: skip
    return {
        "well_behaved": {k: level[k] for k in keep},
        "flood": seen,
        "fds_before": fds_before,
        "server_cpu_cores": round(cpu, 2),
        "server_errors": _errors(await asyncio.to_thread(_metrics, target.http), before),
    }


def _checks(
    outcome: Outcome, alone: dict[str, Any], results: dict[str, Any], header_timeout: float,
    quick: bool, fds: tuple[int, int],
) -> None:  # fmt: skip
    """The issue's targets: for the well-behaved sessions in each phase, then each flood's."""
    alone_p95 = alone["well_behaved"]["p95_ms"]
    for name, result in results.items():
        level = result["well_behaved"]
        outcome.at_most(f"{name}: well-behaved p95 (ms)", round(level["p95_ms"], 1),
                        round(2 * alone_p95, 1), f" (2x alone, {alone_p95:.1f})",
                        timed=True)  # fmt: skip
        lost = (level["skipped"], level["missing"], len(level["errors"]))
        outcome.check(f"{name}: well-behaved skipped / missing / errors",
                      " / ".join(map(str, lost)), "0 / 0 / 0", lost == (0, 0, 0))  # fmt: skip
    fast = results["10x real time"]["flood"]["sessions"]
    served = sum(s["ended"] and not s["errors"] for s in fast)
    outcome.check("10x real time: sessions served to their end", f"{served}/{len(fast)}",
                  "all, no error", served == len(fast))  # fmt: skip
    tiny = results["1-sample frames"]["flood"]
    refused, connections = tiny["refused_rate_limited_1008"], tiny["connections"]
    door = tiny["refused_at_the_door_1013"]
    outcome.check("1-sample frames: connections refused (rate_limited: 1008 in session, "
                  "1013 at the door)", f"{refused} + {door} of {connections}", "all",
                  refused + door == connections and refused > 0)  # fmt: skip
    outcome.at_most("1-sample frames: p95 time to refusal in session (s)",
                    round(tiny["refused_after_s"]["p95"], 3), 1.0, " s", timed=True)  # fmt: skip
    if not quick:  # quick phases are far shorter than the 30-40 s the server needs
        _closed(outcome, "never-reading clients: closed by the server",
                results["never-reading clients"]["flood"], "clients", KEEPALIVE_S)  # fmt: skip
    _closed(outcome, "half-open + idle connections: closed by the server",
            results["half-open upgrades"]["flood"], "connections", header_timeout + 2)  # fmt: skip
    outcome.at_most("half-open: server fds afterwards", fds[1], fds[0] + 5,
                    f" (before the flood, {fds[0]}, + 5)")  # fmt: skip


def _closed(outcome: Outcome, what: str, seen: dict[str, Any], key: str, within: float) -> None:
    last = seen["closed_after_s"]["max"]
    ok = seen["closed_by_server"] == seen[key] and last is not None and last <= within
    measured = (
        f"{seen['closed_by_server']}/{seen[key]}, the last after {last or float('nan'):.1f} s"
    )
    outcome.check(what, measured, f"all, within {within:g} s", ok)


class Sampler:
    """The server's RSS, open fds and sessions (detached ones included) every `every` seconds,
    by phase: the figures that show whether memory stays flat."""

    COLUMNS = ["t_s", "phase", "rss_mib", "fds", "sessions", "detached"]

    def __init__(self, target: Target, every: float) -> None:
        self.target, self.every, self.phase = target, every, "alone"
        self.rows: list[list[Any]] = []
        self.began = time.monotonic()

    async def run(self) -> None:
        while True:
            metrics = await asyncio.to_thread(_metrics, self.target.http)
            sessions = [int(metrics.get(f"grym_sessions{s}", -1)) for s in ("", "_detached")]
            at = round(time.monotonic() - self.began, 1)
            rss, fds = round(self.target.rss_mib(), 1), self.target.open_fds()
            self.rows.append([at, self.phase, rss, fds, *sessions])
            await asyncio.sleep(self.every)

    def by_phase(self, column: int) -> dict[str, dict[str, float]]:
        """The first, peak and last value of a column in each phase."""
        found: dict[str, dict[str, float]] = {}
        for row in self.rows:
            seen = found.setdefault(row[1], {"first": row[column], "peak": row[column]})
            seen["peak"], seen["last"] = max(seen["peak"], row[column]), row[column]
        return found


async def _settle(target: Target, fds: int, timeout: float) -> float | None:
    """Seconds until the server holds at most `fds` open files again (None: not in time)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if target.open_fds() <= fds:
            return round(time.monotonic() - began, 2)
        await asyncio.sleep(0.1)
    return None


def _p95(result: dict[str, Any]) -> str:
    return f"{result['well_behaved']['p95_ms']:.0f}"


def _cpu_s(target: Target) -> float:
    """The server process's CPU time so far (user + system), in seconds."""
    fields = Path(f"/proc/{target.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_SAMPLE = re.compile(r"^(grym_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", re.M)


def _metrics(http: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{http}/metrics", timeout=10) as response:
        return {name: float(value) for name, value in _SAMPLE.findall(response.read().decode())}


def _errors(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    """Error events the server sent between two scrapes, by code."""
    return {
        name.split('"')[1]: int(value - before.get(name, 0))
        for name, value in after.items()
        if name.startswith("grym_errors_total{") and value > before.get(name, 0)
    }
