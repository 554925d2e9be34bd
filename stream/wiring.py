"""The composition root: which analysers, generator, store and pipelines a server runs, built
complete and in order (nothing is patched into an object after it is made), and taken down in
the reverse order.

The web app (stream/web/app.py) runs `services()` as its lifespan; the CLI calls the loading
functions before it listens, so that a bad checkpoint or pipeline is a clear message and exit
status 2 rather than a traceback from the application's start-up.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from models.base import Analyser
from stream.engines.analysis import AnalysisEngine, start_engines
from stream.engines.generation import GenerationEngine
from stream.engines.loading import load_wav2vec2
from stream.engines.ray.analyser import RemoteAnalyser
from stream.engines.ray.wire import AnalysisOptions, GenerationOptions
from stream.engines.ray.wire import ClusterUnavailable as ClusterUnavailable  # for the CLI
from stream.metrics import Metrics
from stream.pipeline import Pipeline, PipelineError, load_presets
from stream.session import SessionManager
from stream.session.tracing import TracingUnavailable as TracingUnavailable  # for the CLI
from stream.session.tracing import require_otel, start_tracing
from stream.settings import Settings
from stream.store import PostgresStore, SqliteStore, Store, apply_retention
from stream.store.leases import Leases

log = logging.getLogger(__name__)


def load_plugins(settings: Settings) -> None:
    """Import the `--plugins` modules: their steps register as they are imported (once)."""
    for module in settings.plugins:
        importlib.import_module(module)


def default_analysers(settings: Settings) -> list[Analyser]:
    """DSP features and voice activity always; wav2vec2 unless analysis_model is `none`; then
    every analyser the `--plugins` modules registered."""
    from models.dsp import DspAnalyser
    from stream.plugins import ANALYSERS

    analysers: list[Analyser] = [DspAnalyser()]
    if settings.analysis_model != "none" and settings.inference == "ray":
        analysers.append(RemoteAnalyser(analysis_options(settings), settings.ray_address,
                                        settings.frontend_id))  # fmt: skip
    elif settings.analysis_model != "none":
        analysers.append(
            load_wav2vec2(
                settings.analysis_model,
                settings.analysis_variant,
                threads=settings.analysis_threads,
                device=settings.analysis_device,
                feature_cache=settings.analysis_feature_cache,
                norm_seconds=settings.analysis_norm_seconds,
                encoder=settings.analysis_encoder,
                max_streams=max(64, 2 * (settings.max_sessions + settings.max_detached_sessions)),
                model_dir=settings.model_dir,
                cache_dir=settings.cache_dir,
            )
        )
    analysers += [ANALYSERS[name]() for name in ANALYSERS.names()]
    return analysers


def analysis_workers(settings: Settings) -> int:
    """`analysis_workers`, with 0 resolved: one per usable core; 2 where the model runs on a
    GPU (one run on the device while the next is prepared) and for calls in flight with Ray."""
    if settings.analysis_workers:
        return settings.analysis_workers
    if settings.inference == "ray" or analysis_on_gpu(settings):
        return 2
    return usable_cores()


def analysis_on_gpu(settings: Settings) -> bool:
    """Whether wav2vec2 will run on CUDA here (models/wav2vec2_runtime.py `providers`)."""
    if settings.analysis_model == "none" or settings.analysis_device == "cpu":
        return False
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    return settings.analysis_device == "cuda" or cuda


def analysis_options(settings: Settings) -> AnalysisOptions:
    """What the Ray analysis replicas load, from this front-end's settings (used when it
    deploys the application itself)."""
    return AnalysisOptions(
        model=settings.analysis_model,
        variant=settings.analysis_variant,
        device=settings.analysis_device,
        threads=settings.analysis_threads,
        feature_cache=settings.analysis_feature_cache,
        norm_seconds=settings.analysis_norm_seconds,
        encoder=settings.analysis_encoder,
        model_dir=settings.model_dir,
        cache_dir=settings.cache_dir,
        max_batch=settings.analysis_batch_max,
        batch_wait_ms=settings.ray_batch_wait_ms,
        replicas=settings.ray_analysis_replicas,
        gpus=settings.ray_analysis_gpus,
    )


def generation_threads(settings: Settings) -> int:
    """`generation_threads`, with 0 resolved: every usable core for a worker at idle priority
    (analysis takes a core back the moment it wants one), else 1."""
    if settings.generation_threads:
        return settings.generation_threads
    return usable_cores() if settings.generation_priority == "idle" else 1


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def generation_options(settings: Settings) -> GenerationOptions:
    return GenerationOptions(
        generator=settings.generator,
        threads=settings.generation_threads or 1,  # what each replica reserves: not the cores here
        bf16=settings.generation_bf16,
        replicas=settings.ray_generation_replicas,
        gpus=settings.ray_generation_gpus,
        compile=settings.generation_compile,
        compile_seconds=tuple(settings.generation_compile_seconds),
    )


def named_pipelines(settings: Settings, analysers: Sequence[str]) -> dict[str, Pipeline]:
    """The presets and the `--pipelines-dir` files, checked; PipelineError if one is wrong
    or the default pipeline is not among them."""
    pipelines = load_presets(settings.pipelines_dir, analysers)
    if settings.pipeline not in pipelines:
        raise PipelineError(
            f"the default pipeline {settings.pipeline!r} is not one of {sorted(pipelines)}"
        )
    return pipelines


async def start_generator(
    settings: Settings,
    analysis_behind: Callable[[], bool],
    loader: Callable[..., Any] | None = None,
    metrics: Metrics | None = None,
) -> GenerationEngine | None:
    """The generation worker, loaded and warmed up; None when `generator` is `none`. `loader`
    replaces the AudioLDM loader in the worker (a picklable function: tests inject faults)."""
    if settings.generator == "none":
        return None
    bf16 = {"auto": None, "on": True, "off": False}[settings.generation_bf16]
    threads: int | None = generation_threads(settings)
    if settings.inference == "ray" and loader is None:
        from stream.engines.ray.generator import load_remote

        # The worker becomes the Ray driver of generation; the replicas have cores of their
        # own, so it need not pause for this front-end's analysis.
        loader = functools.partial(load_remote, settings.ray_address, generation_options(settings))
        threads, analysis_behind = None, lambda: False
    elif loader is None:
        from stream.engines.worker import load_pipeline

        loader = functools.partial(
            load_pipeline,
            compile_mode=settings.generation_compile,
            compile_seconds=tuple(settings.generation_compile_seconds),
            cache_dir=settings.cache_dir,
        )
    engine = GenerationEngine(
        settings.generator,
        threads=threads,
        bf16=bf16,
        queue_size=settings.generation_queue,
        busy=analysis_behind,
        stall_timeout=settings.generation_stall_seconds,
        attempts=settings.generation_attempts,
        metrics=metrics,
        priority=settings.generation_priority,
        loader=loader,
    )
    await engine.start()
    info = engine.info
    if info is not None and not info.trained:
        log.warning("generator %s: %s", info.model, info.note or "random weights")
    return engine


def check_tracing(settings: Settings) -> None:
    """TracingUnavailable when --otel-endpoint is set but its packages are missing (the CLI
    says so before the server listens)."""
    if settings.otel_endpoint is not None:
        require_otel()


def open_store(settings: Settings) -> Store | None:
    """The session store (SQLite in data_dir, or the shared PostgreSQL of --store), with the
    retention limits applied once at start."""
    if not settings.persist:
        return None
    store: Store
    if settings.store is not None:
        store = PostgresStore(settings.store, settings.store_batch_seconds, settings.frontend_id)
    else:
        store = SqliteStore(settings.data_dir, settings.store_batch_seconds)
    _log_retention(apply_retention(store, settings.retention_days, settings.retention_gb), store)
    return store


async def enforce_retention(store: Store | None, settings: Settings) -> None:
    """The retention limits again every `retention_interval_seconds`, off the loop."""
    while store is not None:
        await asyncio.sleep(settings.retention_interval_seconds)
        try:
            removed = await asyncio.to_thread(
                apply_retention, store, settings.retention_days, settings.retention_gb
            )
        except Exception:  # a full disk or a locked file: try again next time
            log.exception("retention failed")
            continue
        _log_retention(removed, store)


def _log_retention(removed: int, store: Store) -> None:
    if removed:
        log.info("retention: removed %d old session(s) from %s", removed, store.where)


async def open_leases(
    settings: Settings, store: Store | None, manager: Callable[[], SessionManager | None]
) -> Leases | None:
    """With a shared store: this front-end's leases, their renewal and hand-over requests
    routed to the session manager (`manager()`, made after them), and the store's fencing."""
    if not isinstance(store, PostgresStore):
        return None
    loop = asyncio.get_running_loop()

    def call(method: str) -> Callable[[str], None]:
        def on(session: str) -> None:
            found = manager()
            if found is not None:
                getattr(found, method)(session)

        return on

    leases = Leases(
        store.url, settings.frontend_id, settings.lease_seconds, settings.resume_grace_seconds,
        on_handover=call("hand_over"), on_lost=call("lost"),
    )  # fmt: skip
    lost = call("lost")
    store.on_fenced = lambda session: loop.call_soon_threadsafe(lost, session)  # writer thread
    await leases.start()
    return leases


@dataclass(frozen=True)
class Services:
    """What a running server is made of; the web layer reads it, never rebuilds it."""

    settings: Settings
    metrics: Metrics
    engines: list[AnalysisEngine]
    generator: GenerationEngine | None
    store: Store | None
    sessions: SessionManager


@asynccontextmanager
async def services(
    settings: Settings,
    analysers: Callable[[Settings], Sequence[Analyser]] = default_analysers,
    generator_loader: Callable[..., Any] | None = None,
    tracer_provider: Any = None,
) -> AsyncIterator[Services]:
    """Load the models, start the engines, open the store, start the generation worker and
    the session manager; on exit, end the sessions first and stop the rest after them.
    `tracer_provider`: an OpenTelemetry TracerProvider to trace sessions with (tests give one
    with an in-memory exporter); else one of our own when `otel_endpoint` is set."""
    # First: a missing package is an error before seconds of model loading.
    tracer = start_tracing(settings, tracer_provider)
    # Model loading is blocking work: keep it off the loop even at start-up.
    loaded = await asyncio.to_thread(analysers, settings)
    # So is importing aiortc (1-3 s): done here, the first WebRTC offer does not stall
    # every live session's loop (the bench saw a >1 s lag when it was imported on demand).
    await asyncio.to_thread(importlib.import_module, "aiortc")
    pipelines = named_pipelines(settings, [a.name for a in loaded])
    metrics = Metrics(settings.frontend_id)
    engines = await start_engines(
        loaded,
        settings.analysis_batch_max,
        settings.analysis_max_wait_ms,
        workers={"wav2vec2": analysis_workers(settings)},
        retry=settings.analysis_retry,
        metrics=metrics,
    )
    store = open_store(settings)
    generator: GenerationEngine | None = None
    manager: SessionManager | None = None
    lag = asyncio.create_task(metrics.watch_loop_lag(), name="loop-lag")
    retention = asyncio.create_task(enforce_retention(store, settings), name="retention")
    try:  # a generator that cannot load stops the start-up, engines included
        # Generation yields while analysis is behind; the manager that knows is made next
        # (no session exists before it, so the worker has nothing to ask about until then).
        generator = await start_generator(
            settings,
            lambda: manager is not None and manager.analysis_behind(),
            generator_loader,
            metrics,
        )
        leases = await open_leases(settings, store, lambda: manager)
        manager = SessionManager(
            settings, engines, generator, metrics=metrics, store=store, pipelines=pipelines,
            leases=leases, tracer=tracer,
        )  # fmt: skip
        metrics.attach(manager.state)
        if leases is None:  # one server: what the store holds open is its own to resume
            await manager.adopt_stored()
        yield Services(settings, metrics, engines, generator, store, manager)
    finally:
        lag.cancel()
        retention.cancel()
        if manager is not None:
            await manager.close_all()
        if manager is not None and manager.leases is not None:
            await manager.leases.close()
        if store is not None:  # after the sessions: their last records go in too
            await asyncio.to_thread(store.close)
        if generator is not None:
            await generator.stop()
        for engine in engines:
            await engine.stop()
        if tracer is not None:  # last: the sessions' and generations' spans are ended
            await asyncio.to_thread(tracer.shutdown)
