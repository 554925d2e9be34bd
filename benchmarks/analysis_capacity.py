"""How many live-paced sessions one server sustains before analysis latency breaks its budget.

A real server process is started (`python -m stream serve`), then N clients of the public
protocol stream audio at real-time pace (from a start time, in 20 ms frames), N = 1, 2, 4, ...
Each analysis event's end-to-end latency is measured by the client: from sending the frame that
held the chunk's last sample to receiving the chunk's event. A level is sustained when its p95
stays within the budget and no chunk was skipped (skipping means the server fell behind).

    python -m benchmarks.analysis_capacity                      # base-random int8
    python -m benchmarks.analysis_capacity --variant fp32-opt --batch-max 1 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fidelity import synthetic_audio
from benchmarks.server import server_process
from clients.stream_client import StreamClient, StreamResult, percentile
from stream.core.pcm import Encoding

RATE = 16000


@contextmanager
def serve(
    model: str, variant: str, batch_max: int, threads: int, workers: int, feature_cache: str
) -> Iterator[str]:
    """A server process on an ephemeral port; yields its WebSocket URL."""
    with server_process(
        "--analysis-model", model, "--analysis-variant", variant,
        "--analysis-batch-max", str(batch_max), "--analysis-threads", str(threads),
        "--analysis-workers", str(workers), "--analysis-feature-cache", feature_cache,
        "--max-sessions", "256", "--generator", "none",
    ) as url:  # fmt: skip
        yield url


async def blocks(audio: np.ndarray) -> AsyncIterator[np.ndarray]:
    for i in range(0, len(audio), 320):
        yield audio[i : i + 320, None]


async def live_session(client: StreamClient, audio: np.ndarray, delay: float) -> StreamResult:
    # Staggered starts: live sessions do not begin in lockstep, so their chunks arrive spread
    # over the chunk period (--aligned makes them arrive together: the worst case).
    await asyncio.sleep(delay)
    return await client.run(blocks(audio), realtime=True)


async def run_level(url: str, sessions: int, seconds: float, aligned: bool) -> dict[str, Any]:
    config = {"chunk_seconds": 1.0, "left_context_seconds": 1.0, "when_behind": "skip"}
    rng = random.Random(sessions)
    clients = [StreamClient(url, RATE, 1, Encoding.PCM_S16LE, config) for _ in range(sessions)]
    audios = [synthetic_audio(seconds, seed=i) for i in range(sessions)]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            live_session(c, a, 0.0 if aligned else rng.uniform(0, 1.0))
            for c, a in zip(clients, audios)
        )
    )
    latencies = [
        e["client_latency_ms"]
        for r in results
        for e in r.analysis
        if e.get("client_latency_ms") is not None
    ]
    server = [e["latency_ms"] for r in results for e in r.analysis]
    return {
        "sessions": sessions,
        "events": len(latencies),
        "skipped": sum(r.end["skipped"] for r in results if r.end),
        "errors": sum(len(r.errors) for r in results),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
        "server_p95_ms": percentile(server, 95),
        "wall_seconds": time.perf_counter() - started,
    }


def sweep(args: argparse.Namespace, batch_max: int) -> list[dict[str, Any]]:
    rows = []
    server = (args.model, args.variant, batch_max, args.threads, args.workers, args.feature_cache)
    with serve(*server) as url:
        for sessions in args.sessions:
            print(
                f"  batch_max {batch_max}: {sessions} live sessions x {args.seconds:g} s ...",
                flush=True,
            )
            row = asyncio.run(run_level(url, sessions, args.seconds, args.aligned))
            row["batch_max"] = batch_max
            row["sustained"] = row["p95_ms"] <= args.budget_ms and row["skipped"] == 0
            rows.append(row)
            print(f"    p95 {row['p95_ms']:.0f} ms, skipped {row['skipped']}", flush=True)
            if not row["sustained"]:
                break
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batch max | sessions | events | p50 ms | p95 ms | p99 ms | max ms | skipped |"
        " sustained |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_max']} | {r['sessions']} | {r['events']} | {r['p50_ms']:.0f} | "
            f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} | {r['skipped']} | "
            f"{'yes' if r['sustained'] else 'no'} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, budget: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch_max in sorted({r["batch_max"] for r in rows}):
        mine = [r for r in rows if r["batch_max"] == batch_max]
        ax.plot(
            [r["sessions"] for r in mine],
            [r["p95_ms"] for r in mine],
            "o-",
            label=f"batch max {batch_max}",
        )
    ax.axhline(budget, color="grey", linestyle="--", label=f"budget {budget:g} ms")
    ax.set_xlabel("live sessions")
    ax.set_ylabel("p95 end-to-end latency (ms)")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base-random")
    parser.add_argument("--variant", default="int8", choices=["fp32", "fp32-opt", "int8"])
    parser.add_argument("--batch-max", type=int, nargs="+", default=[16])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads per worker")
    parser.add_argument("--workers", type=int, default=1, help="parallel wav2vec2 runs")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 24, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per session")
    parser.add_argument("--budget-ms", type=float, default=500.0)
    parser.add_argument("--aligned", action="store_true", help="start all sessions together")
    parser.add_argument(
        "--feature-cache",
        choices=["auto", "on", "off"],
        default="auto",
        help="the server's analysis_feature_cache (auto: on for layer-norm checkpoints only)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny-random model, 1-2 sessions, 2 s")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.sessions, args.seconds = "tiny-random", [1, 2], 2.5

    print(
        f"capacity: {args.model} {args.variant}, {args.workers} worker(s) x {args.threads} "
        f"threads, feature cache {args.feature_cache}, budget p95 {args.budget_ms:g} ms",
        flush=True,
    )
    rows = [row for batch_max in args.batch_max for row in sweep(args, batch_max)]
    print()
    print(table(rows))
    for batch_max in args.batch_max:
        ok = [r["sessions"] for r in rows if r["batch_max"] == batch_max and r["sustained"]]
        print(f"batch max {batch_max}: largest sustained level {max(ok, default=0)} sessions")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"analysis_capacity-{args.model}-{args.variant}"
    if args.workers > 1:
        stem += f"-{args.workers}x{args.threads}"
    if args.feature_cache != "auto":
        stem += f"-cache-{args.feature_cache}"
    report = {
        "model": args.model,
        "variant": args.variant,
        "threads": args.threads,
        "workers": args.workers,
        "feature_cache": args.feature_cache,
        "budget_ms": args.budget_ms,
        "seconds_per_session": args.seconds,
        "aligned": args.aligned,
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "rows": rows,
    }
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot(rows, out / f"{stem}.png", args.budget_ms)
    print(f"wrote {out / stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
