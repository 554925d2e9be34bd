"""The Starlette application: routes, and a lifespan that loads models and starts the engine."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from models.base import Analyser
from stream import __version__, api
from stream.engines.analysis import start_engines
from stream.engines.generation import GenerationEngine
from stream.metrics import Metrics
from stream.pipeline import Pipeline, PipelineError, load_presets
from stream.sessions import SessionManager
from stream.settings import Settings
from stream.store import SqliteStore
from stream.transports.webrtc import offer_endpoint
from stream.transports.websocket import stream_endpoint

log = logging.getLogger(__name__)


def default_analysers(settings: Settings) -> list[Analyser]:
    """DSP features and voice activity always; wav2vec2 unless analysis_model is `none`; then
    every analyser the `--plugins` modules registered."""
    from models.dsp import DspAnalyser
    from stream.plugins import ANALYSERS

    analysers: list[Analyser] = [DspAnalyser()]
    if settings.analysis_model != "none":
        analysers.append(load_wav2vec2(settings))
    analysers += [ANALYSERS[name]() for name in ANALYSERS.names()]
    return analysers


def load_plugins(settings: Settings) -> None:
    """Import the `--plugins` modules: their steps register as they are imported (once)."""
    for module in settings.plugins:
        importlib.import_module(module)


def named_pipelines(settings: Settings, analysers: Sequence[str]) -> dict[str, Pipeline]:
    """The presets and the `--pipelines-dir` files, checked; PipelineError if one is wrong
    or the default pipeline is not among them."""
    pipelines = load_presets(settings.pipelines_dir, analysers)
    if settings.pipeline not in pipelines:
        raise PipelineError(
            f"the default pipeline {settings.pipeline!r} is not one of {sorted(pipelines)}"
        )
    return pipelines


def load_wav2vec2(settings: Settings) -> Analyser:
    """Resolve the model, export it to ONNX once (cached), and open an ORT session on it."""
    from models.char_lm import LanguageModelError, find_language_model
    from models.export import ensure_artifact
    from models.wav2vec2_runtime import Wav2Vec2Analyser

    artifact = ensure_artifact(
        settings.analysis_model,
        settings.analysis_variant,
        model_dir=settings.model_dir,
        cache_dir=settings.cache_dir,
    )
    layer_norm = artifact.meta.get("feat_extract_norm") == "layer"
    feature_cache = settings.analysis_feature_cache == "on" or (
        settings.analysis_feature_cache == "auto" and layer_norm
    )
    if feature_cache and not layer_norm:
        log.warning(
            "analysis_feature_cache=on with a group-norm checkpoint: reused conv features were "
            "normalised over an earlier window, so results differ from computing each window "
            "whole (docs/fidelity.md measures by how much)"
        )
    language_model = None
    # Loaded even when the default is greedy: a session may ask for beam search.
    if artifact.spec.path is not None:
        try:
            language_model = find_language_model(Path(artifact.spec.path))
        except LanguageModelError as exc:  # usable without it: beam search alone, or greedy
            log.warning("language model not used: %s", exc)
    analyser = Wav2Vec2Analyser(
        artifact.folder,
        settings.analysis_threads,
        settings.analysis_device,
        feature_cache=feature_cache,
        max_streams=max(64, 2 * settings.max_sessions),
        language_model=language_model,
    )
    if analyser.note or not analyser.trained:  # a demo or random model: say so, loudly
        advice = "" if analyser.trained else "; use --analysis-model base (or a checkpoint)"
        log.warning(
            "wav2vec2 model %s: %s%s",
            analyser.model_label,
            analyser.note or "random weights (untrained)",
            advice,
        )
    return analyser


async def start_generator(
    settings: Settings,
    analysis_behind: Callable[[], bool],
    loader: Callable[..., Any] | None = None,
) -> GenerationEngine | None:
    """The generation worker, loaded and warmed up; None when `generator` is `none`. `loader`
    replaces the AudioLDM loader in the worker (a picklable function: tests inject faults)."""
    if settings.generator == "none":
        return None
    bf16 = {"auto": None, "on": True, "off": False}[settings.generation_bf16]
    engine = GenerationEngine(
        settings.generator,
        threads=settings.generation_threads,
        bf16=bf16,
        queue_size=settings.generation_queue,
        busy=analysis_behind,
        stall_timeout=settings.generation_stall_seconds,
        attempts=settings.generation_attempts,
        **({"loader": loader} if loader is not None else {}),
    )
    await engine.start()
    info = engine.describe()
    if not info.get("trained", False):
        log.warning("generator %s: %s", info.get("model"), info.get("note") or "random weights")
    return engine


def create_app(
    settings: Settings | None = None,
    analysers: Callable[[Settings], Sequence[Analyser]] = default_analysers,
    generator_loader: Callable[..., Any] | None = None,
) -> Starlette:
    settings = settings or Settings()
    load_plugins(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Model loading is blocking work: keep it off the loop even at start-up.
        loaded = await asyncio.to_thread(analysers, settings)
        # So is importing aiortc (1-3 s): done here, the first WebRTC offer does not stall
        # every live session's loop (the bench saw a >1 s lag when it was imported on demand).
        await asyncio.to_thread(importlib.import_module, "aiortc")
        pipelines = named_pipelines(settings, [a.name for a in loaded])
        engines = await start_engines(
            loaded,
            settings.analysis_batch_max,
            settings.analysis_max_wait_ms,
            workers={"wav2vec2": settings.analysis_workers},
            retry=settings.analysis_retry,
        )
        app.state.settings = settings
        metrics = app.state.metrics = Metrics()
        store = open_store(settings)
        sessions = app.state.sessions = SessionManager(
            settings, engines, metrics=metrics, store=store, pipelines=pipelines
        )
        metrics.attach(sessions.state)
        await sessions.adopt_stored()
        for engine in engines:
            engine.metrics = metrics
        app.state.ready = False
        lag = asyncio.create_task(metrics.watch_loop_lag(), name="loop-lag")
        retention = asyncio.create_task(enforce_retention(store, settings), name="retention")
        try:  # a generator that cannot load stops the start-up, engines included
            sessions.generator = await start_generator(
                settings, sessions.analysis_behind, generator_loader
            )
            if sessions.generator is not None:
                sessions.generator.metrics = metrics
            app.state.ready = True  # models loaded and warmed up
            yield
        finally:
            app.state.ready = False
            lag.cancel()
            retention.cancel()
            await sessions.close_all()
            if store is not None:  # after the sessions: their last records go in too
                await asyncio.to_thread(store.close)
            if sessions.generator is not None:
                await sessions.generator.stop()
            for engine in engines:
                await engine.stop()

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            Route("/v1/status", status),
            WebSocketRoute("/v1/stream", stream_endpoint),
            Route("/v1/webrtc/offer", offer_endpoint, methods=["POST"]),
            *api.ROUTES,
            # The browser client: plain files, no build step; index.html at /.
            Mount("/", StaticFiles(directory=str(files("clients") / "browser"), html=True)),
        ],
        lifespan=lifespan,
    )


async def healthz(request: Request) -> JSONResponse:
    sessions: SessionManager = request.app.state.sessions
    return JSONResponse(
        {
            "status": "ok",
            "version": __version__,
            "sessions": len(sessions.sessions),
            "max_sessions": sessions.settings.max_sessions,
            "analysers": [engine.name for engine in sessions.engines],
            "trained": all(engine.trained for engine in sessions.engines),
            "models": {engine.name: engine.describe() for engine in sessions.engines},
            "analysis": {engine.name: engine.stats() for engine in sessions.engines},
            "generator": sessions.generator.describe() if sessions.generator else None,
            "generation": sessions.generator.stats() if sessions.generator else None,
        }
    )


def open_store(settings: Settings) -> SqliteStore | None:
    """The session store in data_dir, with the retention limits applied once at start."""
    if not settings.persist:
        return None
    store = SqliteStore(settings.data_dir, settings.store_batch_seconds)
    _log_retention(store.apply_retention(settings.retention_days, settings.retention_gb), settings)
    return store


async def enforce_retention(store: SqliteStore | None, settings: Settings) -> None:
    """The retention limits again every `retention_interval_seconds`, off the loop."""
    while store is not None:
        await asyncio.sleep(settings.retention_interval_seconds)
        try:
            removed = await asyncio.to_thread(
                store.apply_retention, settings.retention_days, settings.retention_gb
            )
        except Exception:  # a full disk or a locked file: try again next time
            log.exception("retention failed")
            continue
        _log_retention(removed, settings)


def _log_retention(removed: int, settings: Settings) -> None:
    if removed:
        log.info("retention: removed %d old session(s) from %s", removed, settings.data_dir)


async def readyz(request: Request) -> JSONResponse:
    """200 when the models are loaded and warmed up and the generator (if any) is up; 503 while
    starting, shutting down, or restarting a crashed generation worker."""
    sessions: SessionManager = request.app.state.sessions
    generator = sessions.generator
    checks = {
        "started": bool(getattr(request.app.state, "ready", False)),
        "generator": generator is None or (generator.available and generator.running),
    }
    ready = all(checks.values())
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)


async def status(request: Request) -> JSONResponse:
    """What the status page shows: live sessions, load, recent errors."""
    sessions: SessionManager = request.app.state.sessions
    metrics: Metrics = request.app.state.metrics
    live = [
        {
            "id": s.id,
            "transport": s.transport,
            "seconds": round(s.input.samples_received / s.format.sample_rate, 2),
            "chunks": s.chunks_analysed,
            "skipped": s.skipped,
            "backlog": s.backlog,
            "generations": len(s.generation.clips) if s.generation else 0,
        }
        for s in sessions.sessions.values()
    ]
    state = sessions.state()
    return JSONResponse(
        {
            "uptime_s": round(time.time() - metrics.started, 1),
            "sessions": live,
            "load": {
                "sessions": state["sessions"],
                "sessions_limit": state["sessions_limit"],
                "backlog_chunks": state["backlog"],
                "analysis_queue": state["analysis_queue"],
                "generation": state["generation"],
                "loop_lag_p95_s": metrics.lag_quantile(0.95),
            },
            "recent_errors": list(metrics.recent_errors)[::-1],
        }
    )


async def metrics_endpoint(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


class Server(uvicorn.Server):
    """uvicorn's server, with a gentler shutdown: it stops accepting, then lets live sessions
    finish (`end`, close 1001) within `shutdown_grace_seconds`, then shuts down as uvicorn does
    (which would otherwise close every WebSocket at once with 1012). `interrupted`: Ctrl-C
    (SIGINT) stopped it."""

    interrupted = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn re-raises the signal after its shutdown to make Ctrl-C a KeyboardInterrupt,
        # but asyncio's runner turns that into a cancel of a task that may already be ending;
        # the CLI's exit status goes by what was received instead.
        self.interrupted = self.interrupted or sig == signal.SIGINT
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        for server in self.servers:
            server.close()
        app = self.config.app
        sessions = getattr(getattr(app, "state", None), "sessions", None)
        if sessions is not None:
            await sessions.finish_all(sessions.settings.shutdown_grace_seconds)
        await super().shutdown(sockets)


def server_config(
    settings: Settings,
    analysers: Callable[[Settings], Sequence[Analyser]] = default_analysers,
    generator_loader: Callable[..., Any] | None = None,
    **overrides: object,
) -> uvicorn.Config:
    """uvicorn's configuration for this app; the CLI and the tests both serve through it."""
    # Frames up to the largest format's limit must reach the session, which answers an
    # oversize frame with a typed error; only beyond this does the library itself close (1009).
    ws_max_size = max(16 * 1024 * 1024, int(settings.max_frame_seconds * 192000 * 2 * 4 * 2))
    options: dict[str, object] = dict(
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",  # the `websockets` library's sans-I/O protocol
        ws_max_size=ws_max_size,
        log_level=settings.log_level,
        lifespan="on",
    )
    if settings.log_format == "json":
        options["log_config"] = None  # uvicorn's records go to the root handler, as JSON
    options.update(tls_options(settings))
    options.update(overrides)
    return uvicorn.Config(create_app(settings, analysers, generator_loader), **options)


def tls_options(settings: Settings) -> dict[str, object]:
    """uvicorn's certificate options for `tls_cert`/`tls_key` or `tls self-signed`."""
    if settings.tls_cert and settings.tls_key:
        return {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
    if settings.tls == "self-signed":
        from pathlib import Path

        from models.export import default_cache_dir
        from stream.tls import self_signed

        root = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
        cert, key, fingerprint = self_signed(root / "tls", settings.host)
        log.warning(
            "serving HTTPS with a self-signed certificate (%s); browsers warn once: check that "
            "its SHA-256 fingerprint is %s",
            cert,
            fingerprint,
        )
        return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    return {}
