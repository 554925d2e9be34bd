"""What OpenTelemetry tracing (`--otel-endpoint`) costs the server, per analysis event.

Two real server processes in turn, the same in all but tracing: off, then on (exporting to a
dummy OTLP/HTTP collector run here, which counts what it receives). Each serves the same live
sessions streaming espeak-ng speech at real-time pace with `timing: true`; per mode: the
events' own `server_ms` (frame in -> event handed to the socket) p50/p95, and the server
process's CPU time (user + system, from /proc) per analysis event, with the ratios on / off.

    python -m benchmarks.otel_overhead                # 4 sessions x 15 s per mode, about 1 min
    python -m benchmarks.otel_overhead --sessions 8 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import CONFIG, RATE, event_rows, speech_like, websocket_session
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
    """A dummy OTLP/HTTP collector on 127.0.0.1: answers 200 to every POST and counts the
    requests, bytes and spans (protobuf ExportTraceServiceRequest) it got."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        counts = self.counts = {"requests": 0, "bytes": 0, "spans": 0}
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                spans = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                with lock:
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


@contextmanager
def server(*args: str) -> Iterator[tuple[str, int]]:
    """`python -m stream serve` on an ephemeral port: its WebSocket URL and pid; stopped with
    SIGTERM on exit (a graceful stop: the tracer's last batch is flushed)."""
    command = [sys.executable, "-m", "stream", "serve", "--port", "0", "--log-level", "info"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    output = []
    try:
        for line in proc.stdout:
            output.append(line)
            if match := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                yield f"ws://127.0.0.1:{match.group(1)}/v1/stream", proc.pid
                break
        else:
            raise RuntimeError("the server did not start:\n" + "".join(output))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sessions(url: str, audio: list[np.ndarray]) -> list[Any]:
    """Live sessions at once, starts spread over one chunk period (as load.run_level)."""
    period = CONFIG["chunk_seconds"]
    runs = [websocket_session(url, a, period * i / len(audio), CONFIG) for i, a in enumerate(audio)]
    return await asyncio.gather(*runs)


def measure(mode: str, audio: list[np.ndarray], model: str, collector: Collector) -> dict:
    args = ["--analysis-model", model, "--generator", "none", "--persist", "false"]
    if mode == "on":
        args += ["--otel-endpoint", collector.url]
    with server(*args) as (url, pid):
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
    off, on = rows
    lines.append(
        f"| on / off | | {on['server_ms_p50'] / off['server_ms_p50']:.3f} | "
        f"{on['server_ms_p95'] / off['server_ms_p95']:.3f} | "
        f"{on['cpu_ms_per_event'] / off['cpu_ms_per_event']:.3f} | |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0, help="audio per session")
    parser.add_argument("--model", default="tiny", help="--analysis-model of both servers")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/otel_overhead.json"))
    args = parser.parse_args(argv)
    audio = [speech(args.seconds, seed) for seed in range(args.sessions)]
    collector = Collector()
    try:
        rows = [measure(mode, audio, args.model, collector) for mode in ("off", "on")]
    finally:
        collector.close()
    result = {
        "settings": {
            "sessions": args.sessions,
            "seconds": args.seconds,
            "model": args.model,
            "config": CONFIG,
            "cpus": os.cpu_count(),
        },  # fmt: skip
        "rows": rows,
        "ratio_on_off": {
            key: rows[1][key] / rows[0][key]
            for key in ("server_ms_p50", "server_ms_p95", "cpu_ms_per_event")
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"\nwritten: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
