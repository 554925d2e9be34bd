"""The load generator: live-paced sessions of the public protocol, over WebSocket or WebRTC.

Each session streams audio at real-time pace from its start time (20 ms frames; a frame is due
when its last sample would have been captured), asks for per-stage timings (`config.timing`), and
measures each analysis event's end-to-end latency itself: from sending the frame that held the
chunk's last sample to receiving the chunk's event. Nothing here imports server code (only the
clients and the protocol's PCM formats): pointed at another host, it measures that server.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from clients.stream_client import StreamClient, StreamResult, percentile
from clients.webrtc_client import WebRtcClient
from stream.core.audio.pcm import Encoding
from stream.protocol import ANALYSIS_SAMPLE_RATE

RATE = ANALYSIS_SAMPLE_RATE  # the load's audio, sent as is over WebSocket
FRAME = RATE // 50  # 20 ms
STAGES = (
    "decode_ms",
    "backlog_ms",
    "queue_ms",
    "batch_wait_ms",
    "inference_ms",
    "post_ms",
    "send_ms",
)  # fmt: skip  (the server's order: stream/session/timing.py)
CONFIG = {"chunk_seconds": 1.0, "left_context_seconds": 1.0, "when_behind": "skip", "timing": True}
# Economy mode (README): fewer, longer chunks with less context; each frame goes through the
# transformer 1.25 times instead of twice, for a second more wait per event.
ECONOMY = {"chunk_seconds": 2.0, "left_context_seconds": 0.5}


def session_config(args: Any) -> dict[str, Any]:
    """What the bench's sessions ask for in `start.config` (`args.economy`: economy mode)."""
    return CONFIG | ECONOMY if args.economy else dict(CONFIG)


def sustained(row: dict[str, Any], budget_ms: float) -> bool:
    """A level within budget and keeping up with real time: nothing skipped, nothing missing."""
    return row["p95_ms"] <= budget_ms and row["skipped"] == 0 and row["missing"] == 0


def progress(message: str) -> None:
    """A timestamped progress line of a long benchmark run."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Seeded noise shaped into syllable-rate bursts over a pitched tone: not silence, so VAD and
    the transcript path run as they would on speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t) ** 2
    tone = np.sin(2 * np.pi * rng.uniform(110, 220) * t)
    audio = envelope * (0.3 * tone + 0.1 * rng.standard_normal(len(t)))
    return audio.astype(np.float32)


async def _frames(audio: np.ndarray) -> AsyncIterator[np.ndarray]:
    for i in range(0, len(audio), FRAME):
        yield audio[i : i + FRAME, None]


async def websocket_session(
    url: str, audio: np.ndarray, delay: float, config: dict[str, Any]
) -> StreamResult:
    """One live session over WebSocket, starting after `delay` seconds."""
    await asyncio.sleep(delay)
    client = StreamClient(url, RATE, 1, Encoding.PCM_S16LE, dict(config), resume_seconds=0)
    return await client.run(_frames(audio), realtime=True)


async def webrtc_session(
    offer_url: str, audio: np.ndarray, delay: float, config: dict[str, Any]
) -> StreamResult:
    """One live session over WebRTC (Opus on the wire), starting after `delay` seconds."""
    await asyncio.sleep(delay)
    return await WebRtcClient(offer_url, dict(config)).run(audio, RATE)


def event_rows(results: list[StreamResult]) -> list[dict[str, Any]]:
    """Per analysis event: the client's latency, the server's stages, and what is left for
    the transport (client -> server -> client, both event loops included)."""
    rows = []
    for result in results:
        for event in result.analysis:
            latency = event.get("client_latency_ms")
            if latency is None:
                continue
            row: dict[str, Any] = {"latency_ms": latency}
            timing = event.get("timing")
            if timing and "server_ms" in timing:
                row.update({stage: timing.get(stage, 0.0) for stage in STAGES})
                row["batch"] = timing.get("batch", 0)
                row["server_ms"] = timing["server_ms"]
                row["transport_ms"] = max(0.0, latency - timing["server_ms"])
            rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Percentiles of end-to-end latency, and the mean of each stage (a stacked bar adds up
    to the mean latency)."""
    latencies = [r["latency_ms"] for r in rows]
    timed = [r for r in rows if "server_ms" in r]
    summary: dict[str, Any] = {
        "events": len(rows),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
        "mean_ms": float(np.mean(latencies)) if latencies else float("nan"),
    }
    if timed:
        keys = (*STAGES, "transport_ms", "server_ms", "batch")
        summary["stages_mean_ms"] = {k: float(np.mean([r[k] for r in timed])) for k in keys}
        summary["stages_p50_ms"] = {k: percentile([r[k] for r in timed], 50) for k in keys}
        summary["stages_p95_ms"] = {k: percentile([r[k] for r in timed], 95) for k in keys}
    return summary


async def run_level(
    url: str,
    sessions: int,
    seconds: float,
    transport: str = "websocket",
    config: dict[str, Any] | None = None,
    aligned: bool = False,
) -> dict[str, Any]:
    """`sessions` live sessions of `seconds` audio each, at once; their latencies and stages,
    skipped chunks, missing events, and the server's event-loop lag over the level."""
    config = dict(CONFIG if config is None else config)
    rng = random.Random(sessions)
    http = http_base(url)
    lag_before = scrape_lag(http)
    # Staggered starts, spread evenly over one chunk period with a little jitter: live sessions
    # do not begin in lockstep (aligned: the worst case). Random offsets made some levels
    # depend on whether two sessions happened to start close together.
    period = config.get("chunk_seconds", 1.0)
    delays = [
        0.0 if aligned else period * (i + rng.uniform(0, 0.2)) / sessions for i in range(sessions)
    ]
    if transport == "websocket":
        runs = [websocket_session(url, speech_like(seconds, i), delays[i], config)
                for i in range(sessions)]  # fmt: skip
    elif transport == "webrtc":
        offer = f"{http}/v1/webrtc/offer"
        runs = [webrtc_session(offer, speech_like(seconds, i), delays[i], config)
                for i in range(sessions)]  # fmt: skip
    else:
        raise ValueError(f"unknown transport {transport!r}")
    started = time.perf_counter()
    results = await asyncio.gather(*runs)
    rows = event_rows(results)
    chunks = int(np.ceil(seconds / config.get("chunk_seconds", 1.0)))
    missing = sum(
        max(0, chunks - len(r.analysis) - (r.end or {}).get("skipped", 0)) for r in results
    )
    return {
        "transport": transport,
        "sessions": sessions,
        "seconds": seconds,
        "wall_s": round(time.perf_counter() - started, 2),
        "skipped": sum((r.end or {}).get("skipped", 0) for r in results),
        "missing": missing,
        "errors": [e for r in results for e in r.errors][:5],
        **summarize(rows),
        "loop_lag": lag_between(lag_before, scrape_lag(http)),
        "latencies_ms": sorted(r["latency_ms"] for r in rows),
    }


# --- the server's event-loop lag, from its /metrics histogram --------------------------------
_BUCKET = re.compile(r'^grym_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$', re.M)
_SUM = re.compile(r"^grym_event_loop_lag_seconds_(sum|count) ([0-9.e+]+)$", re.M)


def http_base(ws_url: str) -> str:
    """ws://host:port/v1/stream -> http://host:port."""
    scheme, rest = ws_url.split("://", 1)
    return f"{'https' if scheme == 'wss' else 'http'}://{rest.split('/', 1)[0]}"


def scrape_lag(http: str) -> dict[str, float]:
    """The lag histogram's cumulative buckets (by upper bound), sum and count, now."""
    with urllib.request.urlopen(f"{http}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {bound: float(n) for bound, n in _BUCKET.findall(text)}
    counts.update({f"_{k}": float(v) for k, v in _SUM.findall(text)})
    return counts


def lag_between(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Lag over an interval: ticks observed, mean, and p50/p99 as histogram bucket bounds
    (an upper estimate: the server's ticker fires every 100 ms)."""
    ticks = after.get("_count", 0) - before.get("_count", 0)
    if ticks <= 0:
        return {"ticks": 0}
    total = after.get("_sum", 0) - before.get("_sum", 0)
    bounds = sorted((float(b), after[b] - before.get(b, 0)) for b in after if not b.startswith("_"))

    def quantile(q: float) -> float:
        for bound, cumulative in bounds:
            if cumulative >= q * ticks:
                return bound * 1000
        return float("inf")

    return {
        "ticks": int(ticks),
        "mean_ms": round(total / ticks * 1000, 3),
        "p50_le_ms": quantile(0.5),
        "p99_le_ms": quantile(0.99),
    }
