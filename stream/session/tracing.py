"""OpenTelemetry traces of sessions, with `--otel-endpoint` (OTLP/HTTP); off by default.

Each session is a trace: a `session` span from its opening to its end (or to its close, for one
that fails or moves), the root of its trace unless the client named a parent (`traceparent` in
the start message, or the W3C `traceparent` header of the WebSocket upgrade). Under it:

- a `chunk` span per analysed chunk, from the arrival of the frame that completed the chunk to
  its event being taken by the transport (`server_ms`), whose children are the stages of
  stream/session/timing.py, back to back: `decode`, `backlog`, `queue`, `batch_wait`,
  `inference`, `post`, `send` (the queue, batch and inference stages of the engine that
  finished last, as `timing` has them), so that their durations add up to the chunk's. Then an
  `engine` span per model with its own `queue`, `batch_wait` and `inference` (as
  `timing.engines`): those overlap the stages, because the engines run side by side. A model
  that failed on the chunk (`analysis_failed`) sets the chunk's status to ERROR, with an event;
- a `generation` span per generation job, from its submission to its last report, with an
  event per report (queued, started, each denoising step, each audio block, retrying) and an
  ERROR status when it failed. The job carries the span's `traceparent` to the worker process;
- the session's `error` events, as events on its span; a fatal one sets its status to ERROR.

Nothing here slows the hot path down: the spans are made after the fact from the monotonic
stamps the server takes anyway (those of `timing`, kept for every chunk while tracing is on),
once the chunk's event is taken by the transport. When tracing is off, `opentelemetry` is never
imported, no span object exists, and a chunk costs an `if ... is not None` or three.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stream import __version__
from stream.core.audio.chunker import Window
from stream.engines.analysis import Stamps
from stream.engines.reports import (
    Audio,
    Cancelled,
    Done,
    Failed,
    Progress,
    Queued,
    Report,
    Retrying,
    Started,
)
from stream.protocol import ANALYSIS_SAMPLE_RATE, StartMessage
from stream.session.timing import ChunkTiming

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from stream.settings import Settings

NS = 1_000_000_000
INSTALL = "pip install 'grym-stream[otel]'"
OnQueued = Callable[[dict[str, Any] | None], None]


class TracingUnavailable(RuntimeError):
    """`otel_endpoint` is set, but the OpenTelemetry packages are not installed."""


def require_otel() -> None:
    """Raises TracingUnavailable unless the SDK and the OTLP/HTTP exporter can be imported."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise TracingUnavailable(
            f"--otel-endpoint needs the OpenTelemetry SDK and its OTLP/HTTP exporter ({exc}); "
            f"install them with: {INSTALL}"
        ) from None


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (`/v1/traces` added unless there)."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1/traces") else f"{base}/v1/traces"


def start_tracing(settings: Settings, provider: TracerProvider | None = None) -> Tracer | None:
    """The server's tracer, or None when tracing is off (no `otel_endpoint`, no `provider`).
    With `otel_endpoint`: a provider of its own that exports there in batches, shut down (and so
    flushed) by `Tracer.shutdown`. `provider`: one made by the caller instead (tests give one
    with an in-memory exporter), which stays the caller's to shut down."""
    if provider is None and settings.otel_endpoint is None:
        return None
    require_otel()
    owned = provider is None
    if provider is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        assert settings.otel_endpoint is not None
        resource = Resource.create(
            {
                "service.name": settings.otel_service_name,
                "service.version": __version__,
                "service.instance.id": settings.frontend_id,
            }
        )
        provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=traces_url(settings.otel_endpoint))
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracer(provider, owned)


class Tracer:
    """The SDK's tracer and the clock: spans are stamped in wall time (nanoseconds), made from
    monotonic stamps with one offset taken at start."""

    def __init__(self, provider: TracerProvider, owned: bool) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider, self.owned = provider, owned
        self.otel = provider.get_tracer("grym-stream", __version__)
        self.in_context = trace.set_span_in_context
        self.server_kind = SpanKind.SERVER
        self.error = lambda why: Status(StatusCode.ERROR, why)
        self._propagator = TraceContextTextMapPropagator()
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def wall(self, monotonic: float) -> int:
        """A `time.monotonic()` stamp as span time (ns since the epoch)."""
        return round(monotonic * NS) + self.offset_ns

    def now(self) -> int:
        return time.monotonic_ns() + self.offset_ns

    def parent(self, traceparent: str | None) -> Context | None:
        """The client's span as a parent (None: the session's trace starts here)."""
        if traceparent is None:
            return None
        return self._propagator.extract({"traceparent": traceparent})

    def session(
        self, session_id: str, start: StartMessage, transport: str, restored: bool, pipeline: str
    ) -> SessionTrace:
        return SessionTrace(self, session_id, start, transport, restored, pipeline)

    def shutdown(self) -> None:
        """At the server's stop (blocking: run it off the loop): the spans still buffered are
        exported; a provider of our own is shut down."""
        if self.owned:
            self.provider.shutdown()
        else:
            self.provider.force_flush()


class SessionTrace:
    """One session's span, and the spans of its chunks and generations under it."""

    def __init__(
        self,
        tracer: Tracer,
        session_id: str,
        start: StartMessage,
        transport: str,
        restored: bool,
        pipeline: str,
    ) -> None:
        self.tracer, self.session_id = tracer, session_id
        attributes = {
            "grym.session.id": session_id,
            "grym.session.transport": transport,
            "grym.session.restored": restored,
            "grym.session.pipeline": pipeline,
            "grym.audio.sample_rate": start.sample_rate,
            "grym.audio.channels": start.channels,
            "grym.audio.encoding": start.encoding.value,
        }
        self.span: Span = tracer.otel.start_span(
            "session",
            context=tracer.parent(start.traceparent),
            kind=tracer.server_kind,
            attributes=attributes,
            start_time=tracer.now(),
        )
        self.context = tracer.in_context(self.span)
        self.recording = self.span.is_recording()  # False: the client's trace is not sampled
        self.ended = False

    def watch(self, on_queued: OnQueued) -> OnQueued:
        """The outbox's `on_queued` (every item it queues), seeing the session's errors on the
        way: each `error` event becomes an event on the session's span."""

        def queued(event: dict[str, Any] | None) -> None:
            if event is not None and event.get("type") == "error":
                self.error_event(event)
            on_queued(event)

        return queued

    def error_event(self, event: dict[str, Any]) -> None:
        attributes = {
            "grym.error.code": str(event.get("code")),
            "grym.error.message": str(event.get("message")),
            "grym.error.fatal": bool(event.get("fatal")),
        }
        self.span.add_event("error", attributes, timestamp=self.tracer.now())
        if event.get("fatal"):
            self.span.set_status(self.tracer.error(f"{event.get('code')}: {event.get('message')}"))

    def exception(self, exc: BaseException) -> None:
        """A server bug ended the session: its exception, with the stack, on the span."""
        self.span.record_exception(exc, timestamp=self.tracer.now())
        self.span.set_status(self.tracer.error(f"{type(exc).__name__}: {exc}"))

    def end(self, summary: dict[str, Any]) -> None:
        """The session ended (`end` queued) or closed: its span ends, with its figures
        (Session.summary) as attributes. Only the first call counts."""
        if self.ended:
            return
        self.ended = True
        for key, value in summary.items():
            if isinstance(value, bool | int | float | str):
                self.span.set_attribute(f"grym.session.{key}", value)
        self.span.end(end_time=self.tracer.now())

    # --- chunks ---------------------------------------------------------------------------

    def chunk(
        self,
        window: Window,
        skipped: int,
        timing: ChunkTiming | None,
        queued_at: float,
        failures: list[str],
    ) -> ChunkTrace | None:
        """A chunk whose event was queued at `queued_at`: its spans are made once the transport
        takes the event (the outbox calls `ChunkTrace.sent`)."""
        if timing is None or not self.recording:
            return None
        return ChunkTrace(self, window, skipped, timing, queued_at, failures)

    def chunk_failed(
        self, window: Window, skipped: int, timing: ChunkTiming | None, failures: list[str]
    ) -> None:
        """A chunk every model failed on: no event, its spans end now."""
        trace = self.chunk(window, skipped, timing, time.monotonic(), failures)
        if trace is not None:
            trace.emit(None)

    # --- generations ----------------------------------------------------------------------

    def job(self, number: int, about: dict[str, Any]) -> JobTrace:
        return JobTrace(self, number, about)


class ChunkTrace:
    """One chunk's stamps, until its event is sent: then its spans (module docstring)."""

    __slots__ = ("session", "where", "skipped", "timing", "queued_at", "failures")

    def __init__(
        self,
        session: SessionTrace,
        window: Window,
        skipped: int,
        timing: ChunkTiming,
        queued_at: float,
        failures: list[str],
    ) -> None:
        # (index, start, end): not the window itself, whose audio can go meanwhile
        self.where = (window.index, window.start, window.end)
        self.session, self.skipped = session, skipped
        self.timing, self.queued_at, self.failures = timing, queued_at, failures

    def sent(self, at: float) -> None:
        """The transport took the chunk's event at `at` (monotonic): the send stage ends."""
        self.emit(at)

    def emit(self, sent: float | None) -> None:
        """The chunk's spans; `sent` None: no event was sent (they end when it was queued)."""
        tracer, timing = self.session.tracer, self.timing
        done = [(name, s) for name, s in timing.engines.items() if s.finished]
        last_name, last = max(done, key=lambda d: d[1].finished) if done else ("", None)
        end = self.queued_at if sent is None else sent
        index, start, stop = self.where
        chunk = tracer.otel.start_span(
            "chunk",
            context=self.session.context,
            start_time=tracer.wall(timing.received),
            attributes={
                "grym.session.id": self.session.session_id,
                "grym.chunk.index": index,
                "grym.chunk.start_s": start / ANALYSIS_SAMPLE_RATE,
                "grym.chunk.end_s": stop / ANALYSIS_SAMPLE_RATE,
                "grym.chunk.skipped": self.skipped,
                "grym.chunk.batch": last.batch if last is not None else 0,
                "grym.chunk.engine": last_name,
                "grym.chunk.sent": sent is not None,
            },
        )
        inside = tracer.in_context(chunk)
        engine = {"grym.engine": last_name}
        for name, begin, until, attributes in _stages(timing, last, self.queued_at, sent):
            span = tracer.otel.start_span(
                name, context=inside, start_time=tracer.wall(begin),
                attributes=engine if attributes and last is not None else None,
            )  # fmt: skip
            span.end(end_time=tracer.wall(until))
        for name, stamps in done:
            _engine_spans(tracer, inside, name, stamps)
        for message in self.failures:
            chunk.add_event("analysis_failed", {"message": message}, timestamp=tracer.wall(end))
        if self.failures:
            chunk.set_status(tracer.error(self.failures[0]))
        chunk.end(end_time=tracer.wall(end))


def _stages(
    timing: ChunkTiming, last: Stamps | None, queued_at: float, sent: float | None
) -> list[tuple[str, float, float, bool]]:
    """The stages back to back: (name, from, to, of the last engine), as ChunkTiming adds them
    up (with no engine answering, the whole wait after the chunk was cut counts as `post`)."""
    ready = timing.ready
    engine = (ready, ready, ready, ready) if last is None else (
        last.queued, last.picked, last.started, last.finished
    )  # fmt: skip
    queued, picked, started, finished = engine
    stages = [
        ("decode", timing.received, ready, False),
        ("backlog", ready, queued, False),
        ("queue", queued, picked, True),
        ("batch_wait", picked, started, True),
        ("inference", started, finished, True),
        ("post", finished, queued_at, False),
    ]
    if sent is not None:
        stages.append(("send", queued_at, sent, False))
    return stages


def _engine_spans(tracer: Tracer, context: Context, name: str, s: Stamps) -> None:
    """One model's way through its engine, as `timing.engines` has it."""
    attributes: dict[str, Any] = {"grym.engine": name, "grym.batch": s.batch}
    span = tracer.otel.start_span(
        "engine", context=context, start_time=tracer.wall(s.queued), attributes=attributes
    )
    inside = tracer.in_context(span)
    for stage, begin, until in (
        ("queue", s.queued, s.picked),
        ("batch_wait", s.picked, s.started),
        ("inference", s.started, s.finished),
    ):
        extra = attributes
        if stage == "inference" and s.remote is not None:  # a Ray replica's share of the call
            remote = s.remote.fields(s.finished - s.started)
            extra = {**attributes, **{f"grym.remote.{k}": v for k, v in remote.items()}}
        child = tracer.otel.start_span(
            stage, context=inside, start_time=tracer.wall(begin), attributes=extra
        )
        child.end(end_time=tracer.wall(until))
    span.end(end_time=tracer.wall(s.finished))


class JobTrace:
    """One generation job's span: from its submission to its last report."""

    def __init__(self, session: SessionTrace, number: int, about: dict[str, Any]) -> None:
        self.tracer = tracer = session.tracer
        trigger = about.get("trigger") or {}
        attributes = {
            "grym.session.id": session.session_id,
            "grym.generation.id": number,
            "grym.generation.trigger": str(trigger.get("reason", "")),
            "grym.generation.mode": str(about.get("mode", "")),
            "grym.generation.seconds": float(about.get("seconds", 0.0)),
            "grym.generation.steps": int(about.get("steps", 0)),
            "grym.generation.seed": int(about.get("seed", 0)),
        }
        self.span: Span = tracer.otel.start_span(
            "generation", context=session.context, attributes=attributes, start_time=tracer.now()
        )
        ctx = self.span.get_span_context()
        # What the job carries to the generation worker (W3C trace context, version 00).
        self.traceparent = (
            f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
            if ctx.is_valid
            else None
        )

    def report(self, report: Report) -> None:
        """Each report of the job's sink (stream/engines/reports.py), as it comes."""
        span, now = self.span, self.tracer.now()
        match report:
            case Queued(position):
                span.add_event("queued", {"position": position}, timestamp=now)
            case Started():
                span.add_event("started", timestamp=now)
            case Progress(step, steps):
                span.add_event("step", {"step": step, "steps": steps}, timestamp=now)
            case Audio(block):
                about = {"index": block.index, "samples": len(block.audio), "last": block.last}
                span.add_event("audio", about, timestamp=now)
            case Retrying(attempt, code, message):
                about = {"attempt": attempt, "code": code, "message": message}
                span.add_event("retrying", about, timestamp=now)
            case Done(timings):
                span.set_attribute("grym.generation.outcome", "done")
                for key, value in timings.items():
                    if isinstance(value, int | float):
                        span.set_attribute(f"grym.generation.{key}", value)
                span.end(end_time=now)
            case Cancelled(reason):
                span.set_attribute("grym.generation.outcome", "cancelled")
                span.set_attribute("grym.generation.reason", reason)
                span.end(end_time=now)
            case Failed(code, message):
                span.set_attribute("grym.generation.outcome", "failed")
                span.add_event("error", {"code": code, "message": message}, timestamp=now)
                span.set_status(self.tracer.error(f"{code}: {message}"))
                span.end(end_time=now)
