"""What OpenTelemetry tracing (`--otel-endpoint`) costs the server, per analysis event.

Two real server processes in turn, the same in all but tracing: off, then on (exporting to a
dummy OTLP/HTTP collector run here, which counts what it receives). Each serves the same live
sessions streaming espeak-ng speech at real-time pace with `timing: true`; per mode: the
events' own `server_ms` (frame in -> event handed to the socket) p50/p95, and the server
process's CPU time (user + system, from /proc) per analysis event, with the ratios on / off.

    python -m benchmarks.otel_overhead                # 4 sessions x 15 s per mode, about 1 min
    python -m benchmarks.otel_overhead --sessions 8 --seconds 30
    python -m benchmarks.otel_overhead --baseline 4268f58   # and the server as it was at a commit

With `--baseline REV`, a third server runs first: the code of commit REV (a git worktree of it,
in the same environment), with no tracing code at all; off / before says whether the hooks cost
anything while tracing is off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import CONFIG, RATE, event_rows, speech_like, websocket_session
from benchmarks.server import running_server
from clients.stream_client import percentile

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Streaming audio analysis works from end to end, one chunk after another.",
    "Every session is a trace, and every chunk a span with its stages.",
)


def speech(seconds: float, seed: int) -> np.ndarray:
    """`seconds` of espeak-ng speech at 16 kHz (sentences in a seeded order, looped), or the
    load generator's speech-like noise where espeak-ng is missing."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return speech_like(seconds, seed)
    import soundfile as sf
    import soxr

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "speech.wav"
        text = " ".join(rng.permutation(SENTENCES))
        subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True)
        audio, rate = sf.read(path, dtype="float32")
    audio = soxr.resample(audio, rate, RATE).astype(np.float32)
    return np.resize(audio, int(seconds * RATE))  # looped to length


class Collector:
    """A dummy OTLP/HTTP collector on 127.0.0.1: answers 200 to every POST, counts the
    requests, bytes and spans (protobuf ExportTraceServiceRequest) it got, and keeps each
    request as (path, content type, body) in `received` (tests read them)."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        counts = self.counts = {"requests": 0, "bytes": 0, "spans": 0}
        received = self.received = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                spans = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                with lock:
                    received.append((self.path, self.headers.get("Content-Type"), body))
                    counts["requests"] += 1
                    counts["bytes"] += len(body)
                    counts["spans"] += spans
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, name="collector", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sessions(url: str, audio: list[np.ndarray]) -> list[Any]:
    """Live sessions at once, starts spread over one chunk period (as load.run_level)."""
    period = CONFIG["chunk_seconds"]
    runs = [websocket_session(url, a, period * i / len(audio), CONFIG) for i, a in enumerate(audio)]
    return await asyncio.gather(*runs)


def measure(
    mode: str, audio: list[np.ndarray], model: str, collector: Collector, code: Path | None = None
) -> dict:
    args = ["--analysis-model", model, "--generator", "none", "--persist", "false"]
    if mode == "on":
        args += ["--otel-endpoint", collector.url]
    with running_server(*args, code=code) as (url, pid):
        asyncio.run(sessions(url, [a[: RATE * 2] for a in audio[:1]]))  # warm-up: first runs
        before_cpu, before = cpu_seconds(pid), time.perf_counter()
        results = asyncio.run(sessions(url, audio))
        cpu, wall = cpu_seconds(pid) - before_cpu, time.perf_counter() - before
    rows = [r for r in event_rows(results) if "server_ms" in r]
    server_ms = [r["server_ms"] for r in rows]
    return {
        "tracing": mode,
        "events": len(rows),
        "errors": [e for r in results for e in r.errors][:3],
        "skipped": sum((r.end or {}).get("skipped", 0) for r in results),
        "server_ms_p50": percentile(server_ms, 50),
        "server_ms_p95": percentile(server_ms, 95),
        "latency_ms_p50": percentile([r["latency_ms"] for r in rows], 50),
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 2),
        "cpu_ms_per_event": 1000 * cpu / max(1, len(rows)),
        "exported": dict(collector.counts) if mode == "on" else None,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| tracing | events | server_ms p50 | server_ms p95 | CPU ms per event | spans exported |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        spans = r["exported"]["spans"] if r["exported"] else "-"
        lines.append(
            f"| {r['tracing']} | {r['events']} | {r['server_ms_p50']:.2f} | "
            f"{r['server_ms_p95']:.2f} | {r['cpu_ms_per_event']:.2f} | {spans} |"
        )
    modes = {r["tracing"]: r for r in rows}
    for a, b in (("off", "before"), ("on", "off")):
        if a in modes and b in modes:
            x, y = modes[a], modes[b]
            lines.append(
                f"| {a} / {b} | | {x['server_ms_p50'] / y['server_ms_p50']:.3f} | "
                f"{x['server_ms_p95'] / y['server_ms_p95']:.3f} | "
                f"{x['cpu_ms_per_event'] / y['cpu_ms_per_event']:.3f} | |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0, help="audio per session")
    parser.add_argument("--model", default="tiny", help="--analysis-model of both servers")
    parser.add_argument("--baseline", help="a commit: also run the server as it was there")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/otel_overhead.json"))
    args = parser.parse_args(argv)
    audio = [speech(args.seconds, seed) for seed in range(args.sessions)]
    collector = Collector()
    rows = []
    try:
        if args.baseline:
            with tempfile.TemporaryDirectory() as folder:
                checkout = Path(folder) / "baseline"
                git = ["git", "worktree"]
                subprocess.run([*git, "add", "--detach", str(checkout), args.baseline], check=True)
                try:
                    rows.append(measure("before", audio, args.model, collector, checkout))
                finally:
                    subprocess.run([*git, "remove", "--force", str(checkout)], check=True)
        rows += [measure(mode, audio, args.model, collector) for mode in ("off", "on")]
    finally:
        collector.close()
    result = {
        "settings": {
            "sessions": args.sessions,
            "seconds": args.seconds,
            "model": args.model,
            "config": CONFIG,
            "cpus": os.cpu_count(),
            "baseline": args.baseline,
        },  # fmt: skip
        "rows": rows,
        "ratio_on_off": {
            key: rows[-1][key] / rows[-2][key]
            for key in ("server_ms_p50", "server_ms_p95", "cpu_ms_per_event")
        },
    }
    if args.baseline:
        result["ratio_off_before"] = {
            key: rows[1][key] / rows[0][key] for key in result["ratio_on_off"]
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"\nwritten: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
