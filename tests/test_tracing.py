"""OpenTelemetry traces (stream/session/tracing.py) of real sessions on a real server: the SDK's
in-memory exporter for what the spans say, and a real OTLP/HTTP export to a collector run here."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing as mp
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from benchmarks.otel_overhead import Collector
from models.base import Analyser, AnalysisResult
from models.generation import AudioBlock, GenerationRequest
from stream.core.audio.chunker import Window
from stream.engines import worker
from stream.engines.analysis import Stamps
from stream.engines.reports import JobReport, RunJob
from stream.protocol import parse_start
from stream.session.timing import ChunkTiming
from stream.session.tracing import Tracer, traces_url
from stream.settings import Settings
from stream.wiring import TracingUnavailable, check_tracing, default_analysers
from tests.conftest import RunningServer, run_server, tone

RATE = 16_000
STAGES = ["decode", "backlog", "queue", "batch_wait", "inference", "post", "send"]
START = {"type": "start", "sample_rate": RATE, "channels": 1, "encoding": "pcm_s16le"}


@dataclass
class _Result(AnalysisResult):
    fields: dict[str, Any]

    def to_event(self) -> dict[str, Any]:
        return self.fields


class Breakable(Analyser):
    """A model that answers every window, or (`broken`) fails every batch."""

    name = "breakable"
    sample_rate = RATE

    def __init__(self) -> None:
        self.broken = False

    def analyse(self, windows: Sequence[Any]) -> list[_Result]:
        if self.broken:
            raise RuntimeError("the model broke")
        return [_Result({"breakable": {"ok": True}}) for _ in windows]

    def release(self, stream: str) -> None:
        pass


def telling_loader(name: str, bf16: bool | None) -> Any:
    """The real tiny generator, except that a prompt with "which trace" fails, saying which
    `traceparent` a log record made in the worker during the job carries."""
    pipeline, info = worker.load_pipeline(name, bf16)

    class Telling:
        def generate(self, request: Any, callbacks: Any) -> Any:
            if "which trace" in request.prompt:
                make = logging.getLogRecordFactory()
                record = make("test", logging.INFO, __file__, 0, "", (), None)
                raise RuntimeError(f"traceparent={record.traceparent}")
            return pipeline.generate(request, callbacks)

    return Telling(), info


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[RunningServer, InMemorySpanExporter, Breakable]]:
    """A server with DSP, wav2vec2 (tiny-random) and a breakable model, the tiny generator,
    and every span kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    breakable = Breakable()
    with run_server(
        analysers=lambda s: [*default_analysers(s), breakable],
        tracer_provider=provider,
        generator="tiny",
        generator_loader=telling_loader,
        resume_grace_seconds=0,  # a session's span ends as soon as its client has gone
        analysis_attempts=1,
    ) as running:
        yield running, exporter, breakable
    provider.shutdown()


async def stream(
    server: RunningServer,
    seconds: float = 2.0,
    config: dict[str, Any] | None = None,
    start: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    extra: Sequence[bytes | str] = (),
    later: dict[str, list[dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """One session over a plain WebSocket: start, `seconds` of a tone in 100 ms frames, the
    `extra` messages, then stop; with `later` ({event type: control messages}), each event
    type's messages go when the first such event arrives, and stop after the last of them.
    Returns every JSON event until the server closes."""
    later = dict(later or {})
    stop = json.dumps({"type": "stop"})
    message = {**START, "config": {"when_behind": "wait", **(config or {})}, **(start or {})}
    audio = (tone(seconds, RATE)[:, 0] * 32767).astype("<i2").tobytes()
    frame = RATE // 10 * 2
    async with connect(server.ws, additional_headers=headers) as ws:
        await ws.send(json.dumps(message))
        events = [json.loads(await ws.recv())]
        try:
            if events[0]["type"] == "ready":
                for i in range(0, len(audio), frame):
                    await ws.send(audio[i : i + frame])
                for item in extra:
                    await ws.send(item)
                if not later:
                    await ws.send(stop)
            async for reply in ws:
                if isinstance(reply, bytes):
                    continue
                events.append(json.loads(reply))
                for control in later.pop(events[-1]["type"], None) or []:
                    await ws.send(json.dumps(control))
                    if not later:
                        await ws.send(stop)
        except ConnectionClosed:
            pass
    return events


async def trace_of(exporter: InMemorySpanExporter, session: str) -> list[ReadableSpan]:
    """The spans of the session's trace, once its session span has ended, in the order they
    ended."""
    deadline = time.monotonic() + 20
    while True:
        spans = exporter.get_finished_spans()
        found = [
            s for s in spans if s.name == "session" and s.attributes["grym.session.id"] == session
        ]
        if found:
            return [s for s in spans if s.context.trace_id == found[0].context.trace_id]
        assert time.monotonic() < deadline, f"no session span for {session}"
        await asyncio.sleep(0.05)


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def ms(span: ReadableSpan) -> float:
    return (span.end_time - span.start_time) / 1e6


def only(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


async def test_chunk_spans_nest_and_add_up_like_timing(traced: Any) -> None:
    server, exporter, _ = traced
    timed, untimed = await asyncio.gather(
        stream(server, 3.0, {"timing": True}), stream(server, 2.0)
    )
    spans = await trace_of(exporter, timed[0]["session"])
    session = only(spans, "session")
    assert session.parent is None  # the root of its own trace
    assert session.attributes["grym.session.transport"] == "websocket"
    analysis = {e["seq"]: e for e in timed if e["type"] == "analysis"}
    assert len(analysis) == 3 and session.attributes["grym.session.chunks"] == 3
    chunks = {s.attributes["grym.chunk.index"]: s for s in children(spans, session)}
    assert sorted(chunks) == sorted(analysis)
    for seq, chunk in chunks.items():
        timing = analysis[seq]["timing"]
        assert chunk.name == "chunk" and chunk.attributes["grym.chunk.batch"] == timing["batch"]
        assert chunk.attributes["grym.chunk.start_s"] == analysis[seq]["start"]
        inside = children(spans, chunk)
        for span in inside:
            assert chunk.start_time <= span.start_time <= span.end_time <= chunk.end_time
        stages = [s for s in inside if s.name != "engine"]
        assert [s.name for s in stages] == STAGES
        assert all(a.end_time == b.start_time for a, b in zip(stages, stages[1:]))  # tiled
        assert stages[0].start_time == chunk.start_time and stages[-1].end_time == chunk.end_time
        assert sum(ms(s) for s in stages) == pytest.approx(ms(chunk), abs=1.0)
        assert ms(chunk) == pytest.approx(timing["server_ms"], abs=1.0)
        for stage in stages:
            assert ms(stage) == pytest.approx(timing[f"{stage.name}_ms"], abs=1.0), stage.name
        engines = {s.attributes["grym.engine"]: s for s in inside if s.name == "engine"}
        assert set(engines) == set(timing["engines"]) == {"dsp", "wav2vec2", "breakable"}
        for name, engine in engines.items():
            parts = children(spans, engine)
            assert [p.name for p in parts] == ["queue", "batch_wait", "inference"]
            for part in parts:
                expected = timing["engines"][name][f"{part.name}_ms"]
                assert ms(part) == pytest.approx(expected, abs=1.0)
    # Without `timing: true` the events have none, and the spans are the same.
    assert all("timing" not in e for e in untimed if e["type"] == "analysis")
    spans = await trace_of(exporter, untimed[0]["session"])
    chunks = [s for s in spans if s.name == "chunk"]
    assert len(chunks) == 2 and all(
        [s.name for s in children(spans, c) if s.name != "engine"] == STAGES for c in chunks
    )


async def test_a_client_traceparent_parents_the_session(traced: Any) -> None:
    server, exporter, _ = traced
    parent = secrets.token_hex(8)
    ids = [secrets.token_hex(16) for _ in range(3)]
    other = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    runs = await asyncio.gather(
        stream(server, 1.0, start={"traceparent": f"00-{ids[0]}-{parent}-01"}),
        stream(server, 1.0, headers={"traceparent": f"00-{ids[1]}-{parent}-01"}),
        # Both: the start message wins.
        stream(
            server,
            1.0,
            start={"traceparent": f"00-{ids[2]}-{parent}-01"},
            headers={"traceparent": other},
        ),  # fmt: skip
        stream(server, 1.0, headers={"traceparent": "not-a-traceparent"}),  # ignored
    )
    for events, trace_id in zip(runs, ids):
        spans = await trace_of(exporter, events[0]["session"])
        session = only(spans, "session")
        assert f"{session.context.trace_id:032x}" == trace_id
        assert session.parent is not None and session.parent.is_remote
        assert f"{session.parent.span_id:016x}" == parent
        assert len([s for s in spans if s.name == "chunk"]) == 1
    session = only(await trace_of(exporter, runs[3][0]["session"]), "session")
    assert session.parent is None
    # A malformed one in the start message is refused, as any bad start field is.
    for bad in ("00-xyz", f"00-{'0' * 32}-{parent}-01", f"01-{ids[0]}-{parent}-01"):
        refused = await stream(server, 1.0, start={"traceparent": bad})
        assert [(e["type"], e["code"]) for e in refused] == [("error", "invalid_start")]
        assert "traceparent" in refused[0]["message"]


async def test_failures_are_recorded_on_the_spans(traced: Any) -> None:
    server, exporter, breakable = traced
    breakable.broken = True
    try:
        events = await stream(server, 2.0, extra=[b"\x00\x01\x02"])  # and a partial frame
    finally:
        breakable.broken = False
    codes = [e["code"] for e in events if e["type"] == "error"]
    assert sorted(codes) == ["analysis_failed", "analysis_failed", "partial_frame"]
    spans = await trace_of(exporter, events[0]["session"])
    chunks = [s for s in spans if s.name == "chunk"]
    assert len(chunks) == 2
    for chunk in chunks:
        assert chunk.status.status_code is StatusCode.ERROR
        assert "breakable failed" in (chunk.status.description or "")
        assert [e.name for e in chunk.events] == ["analysis_failed"]
        assert "the model broke" in chunk.events[0].attributes["message"]
    engines = {s.attributes["grym.engine"] for s in spans if s.name == "engine"}
    assert engines == {"dsp", "wav2vec2"}  # the one that failed has no span
    session = only(spans, "session")
    assert sorted(e.attributes["grym.error.code"] for e in session.events) == sorted(codes)
    assert session.status.status_code is StatusCode.UNSET  # none of them was fatal
    # A fatal error: the session's span says so.
    events = await stream(server, 0.5, extra=[b"\x00" * 40_000])
    assert events[-1]["code"] == "frame_too_large" and events[-1]["fatal"]
    session = only(await trace_of(exporter, events[0]["session"]), "session")
    assert session.status.status_code is StatusCode.ERROR
    assert (session.status.description or "").startswith("frame_too_large: ")
    assert session.events[-1].attributes["grym.error.fatal"] is True


async def test_a_generation_is_a_span_with_its_steps(traced: Any) -> None:
    server, exporter, _ = traced
    generate = {"type": "generate", "seconds": 1.0, "steps": 3, "auto_prompt": False}
    events = await stream(
        server, 2.0,
        later={"analysis": [{**generate, "prompt": "bells"}],
               "generation.done": [{**generate, "prompt": "which trace"}]},
    )  # fmt: skip
    done = [e["type"] for e in events if e["type"] in ("generation.done", "generation.failed")]
    assert done == ["generation.done", "generation.failed"], events
    spans = await trace_of(exporter, events[0]["session"])
    session = only(spans, "session")
    jobs = sorted(
        (s for s in spans if s.name == "generation"),
        key=lambda s: s.attributes["grym.generation.id"],
    )
    assert len(jobs) == 2 and all(job.parent.span_id == session.context.span_id for job in jobs)
    made, failed = jobs
    names = [e.name for e in made.events]
    assert names[:2] == ["queued", "started"] and "audio" in names
    assert [e.attributes["step"] for e in made.events if e.name == "step"] == [1, 2, 3]
    assert made.attributes["grym.generation.outcome"] == "done"
    assert made.status.status_code is StatusCode.UNSET
    assert failed.attributes["grym.generation.outcome"] == "failed"
    assert failed.status.status_code is StatusCode.ERROR
    # The job carried its span's traceparent to the worker, whose log records carry it.
    ctx = failed.context
    traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    assert f"traceparent={traceparent}" in (failed.status.description or "")


def test_the_worker_puts_the_jobs_traceparent_on_its_log_records() -> None:
    """In process: `_run` with a generator that logs, and the worker's record factory."""
    seen: list[Any] = []

    class Logging:
        def generate(self, request: Any, callbacks: Any) -> Any:
            record = logging.getLogRecordFactory()("t", logging.INFO, "", 0, "", (), None)
            seen.append(record.traceparent)
            yield AudioBlock(0, 0, np.zeros(160, np.float32), True, {"total_s": 0.0})

    theirs, ours = mp.Pipe()
    factory = logging.getLogRecordFactory()
    worker.trace_log_records()
    try:
        traceparent = f"00-{'a' * 32}-{'b' * 16}-01"
        job = RunJob(1, GenerationRequest("x", seconds=0.01, steps=1), traceparent)
        assert worker._run(ours, Logging(), job, SimpleNamespace(value=0))
        after = logging.getLogRecordFactory()("t", logging.INFO, "", 0, "", (), None)
    finally:
        logging.setLogRecordFactory(factory)
    assert seen == [traceparent] and after.traceparent is None  # only while the job runs
    reports = []
    while theirs.poll():
        reports.append(theirs.recv())
    assert all(isinstance(r, JobReport) for r in reports) and len(reports) == 3


def test_a_chunk_every_model_failed_on_ends_in_error() -> None:
    """No event to send: its spans end when the failure was known, without a send stage."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = Tracer(provider, owned=False)
    start = parse_start(json.dumps(START))
    session = tracer.session("s1", start, "websocket", False, "default")
    now = time.monotonic()
    timing = ChunkTiming(now - 0.02, now - 0.015)
    timing.engines["dsp"] = Stamps(queued=now - 0.014, picked=now - 0.013, started=now - 0.012)
    window = Window(4, 4 * RATE, 5 * RATE, np.zeros(0, np.float32), 0, 0, "s1")
    session.chunk_failed(window, 1, timing, ["dsp failed on 4.000-5.000 s: boom"])
    session.end({"chunks": 0})
    spans = list(exporter.get_finished_spans())
    chunk = only(spans, "chunk")
    assert chunk.status.status_code is StatusCode.ERROR
    assert [e.name for e in chunk.events] == ["analysis_failed"]
    assert chunk.attributes["grym.chunk.skipped"] == 1
    assert chunk.attributes["grym.chunk.sent"] is False
    stages = children(spans, chunk)
    assert [s.name for s in stages] == STAGES[:-1]  # no send
    assert sum(ms(s) for s in stages) == pytest.approx(ms(chunk), abs=1e-3)
    assert only(spans, "session").attributes["grym.session.chunks"] == 0
    provider.shutdown()


async def test_otel_endpoint_exports_over_otlp_http() -> None:
    """`--otel-endpoint`: the server's own provider posts protobuf to <endpoint>/v1/traces,
    flushed when it stops (to the benchmark's dummy collector, a plain http.server)."""
    collector = Collector()
    try:
        with run_server(
            analysis_model="none", otel_endpoint=collector.url, otel_service_name="grym-test"
        ) as server:
            events = await stream(server, 1.0)
    finally:
        collector.close()
    received = collector.received
    assert received and all(path == "/v1/traces" for path, _, _ in received)
    assert all(kind == "application/x-protobuf" for _, kind, _ in received)
    names, services, sessions = set(), set(), set()
    for _, _, body in received:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    names.add(span.name)
                    for attribute in span.attributes:
                        if attribute.key == "grym.session.id":
                            sessions.add(attribute.value.string_value)
    assert {"session", "chunk", *STAGES, "engine"} <= names
    assert services == {"grym-test"} and events[0]["session"] in sessions


def test_settings_and_urls() -> None:
    assert traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces/") == "http://c:4318/v1/traces"
    assert Settings().otel_endpoint is None and Settings().otel_service_name == "grym-stream"
    with pytest.raises(ValidationError, match="http"):
        Settings(otel_endpoint="127.0.0.1:4318")


def test_without_an_endpoint_opentelemetry_is_never_imported() -> None:
    """Off by default, and then free: the server's modules do not import it."""
    code = (
        "import sys\n"
        "import stream.web.server, stream.session.tracing, stream.cli\n"
        "found = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not found, found\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_missing_sdk_is_a_clear_error_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    check_tracing(Settings())  # off: nothing to check
    with pytest.raises(TracingUnavailable, match=r"grym-stream\[otel\]"):
        check_tracing(Settings(otel_endpoint="http://127.0.0.1:4318"))
