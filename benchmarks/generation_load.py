"""Does generation starve analysis? Live sessions' analysis latency with and without a session
that generates back to back, on one server process.

Phase `idle`: N clients of the public protocol stream audio at real-time pace; each analysis
event's end-to-end latency is measured by its client. Phase `generating`: the same N sessions,
plus one more session that asks for a new clip as soon as the last one is done, for the whole
phase. The generator is the AudioLDM-S architecture with random weights (the trained model's
compute) on `generation_threads` torch threads in its worker process; analysis is wav2vec2
base-random int8 on ONNX Runtime. Reports latency percentiles, skipped chunks, and the clips made
under load (time to first audio, total).

    python -m benchmarks.generation_load                  # 4 sessions x 30 s, s-random
    python -m benchmarks.generation_load --quick          # tiny models, seconds (tests)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.analysis_capacity import blocks, live_session
from benchmarks.analysis_kernels import machine_info, progress
from benchmarks.fidelity import synthetic_audio
from benchmarks.server import server_process
from clients.stream_client import StreamClient, StreamResult, percentile
from stream.core.pcm import Encoding

RATE = 16_000
CONFIG = {"chunk_seconds": 1.0, "left_context_seconds": 1.0, "when_behind": "skip"}


async def generating_session(url: str, seconds: float, clip: dict[str, Any]) -> StreamResult:
    """Streams like the others and keeps the generator busy: a new request after each end."""
    client = StreamClient(url, RATE, 1, Encoding.PCM_S16LE, dict(CONFIG))
    request = {"type": "generate", "auto_prompt": False, "prompt": "ambient pad", **clip}
    pending: set[asyncio.Task[None]] = set()

    def on_event(event: dict[str, Any]) -> None:
        starts = event["type"] == "analysis" and event["seq"] == 0
        ended = event["type"] in ("generation.done", "generation.failed")
        if starts or ended:
            task = asyncio.ensure_future(client.send_control(request))
            pending.add(task)
            task.add_done_callback(pending.discard)

    client.on_event = on_event
    result = await client.run(blocks(synthetic_audio(seconds, seed=99)), realtime=True)
    return result


async def phase(url: str, sessions: int, seconds: float, clip: dict[str, Any] | None) -> dict:
    clients = [
        StreamClient(url, RATE, 1, Encoding.PCM_S16LE, dict(CONFIG)) for _ in range(sessions)
    ]
    runs = [
        live_session(c, synthetic_audio(seconds, seed=i), delay=i / max(sessions, 1))
        for i, c in enumerate(clients)
    ]
    if clip is not None:
        runs.append(generating_session(url, seconds + 2.0, clip))
    results = await asyncio.gather(*runs)
    live = results[:sessions]
    latencies = [
        e["client_latency_ms"]
        for r in live
        for e in r.analysis
        if e.get("client_latency_ms") is not None
    ]
    row: dict[str, Any] = {
        "phase": "idle" if clip is None else "generating",
        "sessions": sessions,
        "events": len(latencies),
        "skipped": sum(r.end["skipped"] for r in live if r.end),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
    }
    if clip is not None:
        done = [e for e in results[-1].events if e["type"] == "generation.done"]
        row["clips"] = len(done)
        row["clip_first_audio_s"] = percentile(
            [e["timings"]["first_audio_after_submit_s"] for e in done], 50
        )
        row["clip_total_s"] = percentile([e["timings"]["total_s"] for e in done], 50)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| phase | live sessions | events | p50 ms | p95 ms | p99 ms | max ms | skipped | "
        "clips made | clip first audio s | clip total s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        clips = (
            f"{r['clips']} | {r['clip_first_audio_s']:.2f} | {r['clip_total_s']:.2f}"
            if "clips" in r
            else "- | - | -"
        )
        lines.append(
            f"| {r['phase']} | {r['sessions']} | {r['events']} | {r['p50_ms']:.0f} | "
            f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} | {r['skipped']} | "
            f"{clips} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per live session")
    parser.add_argument("--generator", default="s-random")
    parser.add_argument("--analysis-model", default="base-random")
    parser.add_argument("--generation-threads", type=int, default=1)
    parser.add_argument("--clip-seconds", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 sessions x 4 s")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/generation_load-...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.seconds, args.generator, args.analysis_model = 2, 4.0, "tiny", "tiny"
        args.clip_seconds, args.steps = 1.0, 2
    clip = {"seconds": args.clip_seconds, "steps": args.steps}
    serve = (
        "--analysis-model", args.analysis_model, "--generator", args.generator,
        "--generation-threads", str(args.generation_threads), "--max-sessions", "64",
    )  # fmt: skip
    progress(f"starting a server: {' '.join(serve)}")
    with server_process(*serve) as url:
        rows = []
        for name, chosen in (("idle", None), ("generating", clip)):
            progress(f"phase {name}: {args.sessions} live sessions x {args.seconds:g} s")
            rows.append(asyncio.run(phase(url, args.sessions, args.seconds, chosen)))
            progress(f"  p95 {rows[-1]['p95_ms']:.0f} ms, skipped {rows[-1]['skipped']}")
    title = (
        f"analysis latency with and without generation: {args.analysis_model} int8 analysis, "
        f"{args.generator} generator ({args.generation_threads} thread, {args.clip_seconds:g} s "
        f"clips, {args.steps} steps)"
    )
    out = Path(args.out or f"benchmarks/results/generation_load-{args.generator}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"title": title, "machine": machine_info(args.generation_threads), "rows": rows}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"## {title}\n\n{table(rows)}\n\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
