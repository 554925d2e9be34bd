"""The composition root: which analysers, generator, store and pipelines a server runs, built
complete and in order (nothing is patched into an object after it is made), and taken down in
the reverse order.

The web app (stream/web/app.py) runs `services()` as its lifespan; the CLI calls the loading
functions before it listens, so that a bad checkpoint or pipeline is a clear message and exit
status 2 rather than a traceback from the application's start-up.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.base import Analyser
from stream.engines.analysis import AnalysisEngine, start_engines
from stream.engines.generation import GenerationEngine
from stream.metrics import Metrics
from stream.pipeline import Pipeline, PipelineError, load_presets
from stream.session import SessionManager
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
    if settings.analysis_model != "none":
        analysers.append(load_wav2vec2(settings))
    analysers += [ANALYSERS[name]() for name in ANALYSERS.names()]
    return analysers


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
        max_streams=max(64, 2 * (settings.max_sessions + settings.max_detached_sessions)),
        language_model=language_model,
    )
    info = analyser.info
    if info.note or not info.trained:  # a demo or random model: say so, loudly
        advice = "" if info.trained else "; use --analysis-model base (or a checkpoint)"
        log.warning(
            "wav2vec2 model %s: %s%s", info.label, info.note or "random weights (untrained)", advice
        )
    return analyser


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
    engine = GenerationEngine(
        settings.generator,
        threads=settings.generation_threads,
        bf16=bf16,
        queue_size=settings.generation_queue,
        busy=analysis_behind,
        stall_timeout=settings.generation_stall_seconds,
        attempts=settings.generation_attempts,
        metrics=metrics,
        **({"loader": loader} if loader is not None else {}),
    )
    await engine.start()
    info = engine.info
    if info is not None and not info.trained:
        log.warning("generator %s: %s", info.model, info.note or "random weights")
    return engine


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
) -> AsyncIterator[Services]:
    """Load the models, start the engines, open the store, start the generation worker and
    the session manager; on exit, end the sessions first and stop the rest after them."""
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
        workers={"wav2vec2": settings.analysis_workers},
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
            leases=leases,
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
