"""Prometheus metrics for `/metrics`: what operators need to see the server's state and health.

Each app has its own registry (tests run several servers in one process). Two kinds of numbers:
- measured as things happen (histograms and counters the code feeds): analysis latency per stage,
  batch sizes, audio seconds in, events out by type, errors by code, skipped chunks, generation
  durations, event-loop lag;
- read from live state at scrape time (`StateCollector`): sessions, queue depths, generation
  outcomes, so that they can never drift from what the server really holds.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
LAG_TICK_S = 0.1
RECENT_ERRORS = 50  # kept for the status page


class Metrics:
    def __init__(self, frontend: str = "") -> None:
        self.started = time.time()
        self.recent_errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self.registry = CollectorRegistry()
        r = self.registry
        # Which front-end these figures are from (a constant 1 with its id as a label).
        Gauge("grym_frontend", "This server's front-end id", ["frontend"], registry=r).labels(
            frontend
        ).set(1)
        self.audio_seconds = Counter(
            "grym_audio_seconds", "Seconds of audio received", ["transport"], registry=r
        )
        self.events = Counter("grym_events", "Events sent to clients", ["type"], registry=r)
        self.errors = Counter("grym_errors", "Error events sent, by code", ["code"], registry=r)
        self.skipped = Counter("grym_skipped_chunks", "Chunks skipped behind live", registry=r)
        self.analysis_latency = Histogram(
            "grym_analysis_latency_seconds",
            "Analysis latency per stage: queue (chunk ready -> batch starts), inference (one "
            "batch), total (chunk ready -> event queued for the client)",
            ["stage", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "grym_analysis_batch_size",
            "Windows per analysis batch",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.generation_seconds = Histogram(
            "grym_generation_seconds",
            "Generation time in the worker: first audio and total",
            ["stage"],
            buckets=LATENCY_BUCKETS + (20.0, 40.0, 80.0),
            registry=r,
        )
        self.model_failures = Counter(
            "grym_model_failures",
            "Failed model calls by step, kind (error, timeout) and what followed (retried, "
            "failed: the retry policy's attempts were spent)",
            ["step", "kind", "then"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "grym_event_loop_lag_seconds",
            f"How late a {LAG_TICK_S:g} s timer fires on the event loop",
            buckets=LAG_BUCKETS,
            registry=r,
        )

    def error(self, event: dict[str, Any]) -> None:
        self.errors.labels(event["code"]).inc()
        self.recent_errors.append({"time": time.time(), **event})

    def lag_quantile(self, q: float) -> float | None:
        """An estimate of the loop lag quantile `q` from the histogram (upper bucket bound)."""
        buckets = [
            (float(s.labels["le"]), s.value)
            for metric in self.loop_lag.collect()
            for s in metric.samples
            if s.name.endswith("_bucket")
        ]
        total = buckets[-1][1] if buckets else 0
        for bound, count in buckets:
            if total and count >= q * total:
                return bound
        return None

    def attach(self, state: Callable[[], dict[str, Any]]) -> None:
        """Numbers read from live state at each scrape (see StateCollector)."""
        self.registry.register(StateCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def watch_loop_lag(self) -> None:
        """Runs for the server's life: a timer's lateness is time the loop was not free."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LAG_TICK_S
            await asyncio.sleep(LAG_TICK_S)
            self.loop_lag.observe(max(0.0, loop.time() - due))


class StateCollector(Collector):
    """Gauges and counters from `state()`: {"sessions": n, "sessions_limit": n,
    "analysis_queue": {model: n}, "generation": {"queued": n, "running": bool, "done": n,
    "restarting": bool, ...}}."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        s = self.state()
        yield GaugeMetricFamily(
            "grym_sessions", "Sessions going on (live or waiting for a resume)", value=s["sessions"]
        )
        yield GaugeMetricFamily(
            "grym_sessions_limit", "Most sessions at once (max_sessions)", value=s["sessions_limit"]
        )
        yield CounterMetricFamily(
            "grym_sessions_opened", "Sessions opened since start", value=s["sessions_opened"]
        )
        yield GaugeMetricFamily(
            "grym_sessions_detached", "Sessions waiting for a resume", value=s["sessions_detached"]
        )
        yield CounterMetricFamily(
            "grym_sessions_resumed", "Sessions resumed since start", value=s["sessions_resumed"]
        )
        queue = GaugeMetricFamily(
            "grym_analysis_queue_depth", "Windows waiting for an analysis batch", labels=["model"]
        )
        for model, depth in s["analysis_queue"].items():
            queue.add_metric([model], depth)
        yield queue
        backlog = GaugeMetricFamily(
            "grym_session_backlog_chunks", "Chunks cut and waiting, all sessions together"
        )
        backlog.add_metric([], s["backlog"])
        yield backlog
        generation = s.get("generation")
        if generation is not None:
            yield GaugeMetricFamily(
                "grym_generation_queue_depth", "Generations waiting", value=generation["queued"]
            )
            yield GaugeMetricFamily(
                "grym_generation_running", "A generation is running", value=generation["running"]
            )
            outcomes = CounterMetricFamily(
                "grym_generations", "Generations by outcome", labels=["outcome"]
            )
            for outcome in ("submitted", "done", "cancelled", "failed"):
                outcomes.add_metric([outcome], generation[outcome])
            yield outcomes
            yield CounterMetricFamily(
                "grym_generation_worker_restarts",
                "Times the generation worker was started again",
                value=generation["restarts"],
            )
            yield CounterMetricFamily(
                "grym_generation_worker_restart_failures",
                "Attempts to start a crashed generation worker again that failed (it is tried "
                "again, with a growing wait)",
                value=generation.get("restart_failures", 0),
            )
            yield GaugeMetricFamily(
                "grym_generation_worker_restarting",
                "The generation worker is down and being started again",
                value=generation.get("restarting", False),
            )
