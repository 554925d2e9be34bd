"""The Ray Serve deployments: wav2vec2 analysis, batched across front-ends, and AudioLDM
generation, streamed block by block. `analysis_app` and `generation_app` build the applications
from their arguments, for `serve deploy deploy/ray-serve.yaml` as for a front-end that deploys
them itself.

Replicas are stateless per call, as Serve routes each call to any replica: the only state is the
per-stream conv-feature cache (where the feature cache is on), which a cold replica simply does
not have (it computes the frames again: results are the same on layer-norm checkpoints, the
only ones where the cache is on by default).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from ray.serve import Application

from models.base import AnalyserInfo, CtcFrames
from models.generation import Callbacks, GenerationCancelled, GenerationRequest
from stream.core.audio.chunker import Window
from stream.engines.loading import load_wav2vec2
from stream.engines.ray.wire import (
    ANALYSIS_APP,
    GENERATION_APP,
    AnalyseReply,
    AnalyseRequest,
    AnalysisOptions,
    GenerationOptions,
    RemoteResult,
    ReplicaTiming,
)
from stream.engines.reports import Audio, Done, Failed, GeneratorInfo, Progress, Started

log = logging.getLogger(__name__)


@serve.deployment(name=ANALYSIS_APP, max_ongoing_requests=64)
class Wav2Vec2Analysis:
    """One replica: the analyser on its own ONNX Runtime sessions. Calls that arrive within
    `batch_wait_ms` of each other, from any front-ends, run as one batch; inside it, windows of
    equal length run together (int8 artefacts: one at a time, models/wav2vec2_runtime.py)."""

    def __init__(self, options: AnalysisOptions) -> None:
        self.options = options
        self.analyser = load_wav2vec2(
            options.model,
            options.variant,
            threads=options.threads,
            device=options.device,
            feature_cache=options.feature_cache,
            norm_seconds=options.norm_seconds,
            encoder=options.encoder,
            max_streams=options.max_streams,
            model_dir=options.model_dir,
            cache_dir=options.cache_dir,
        )
        self.replica = serve.get_replica_context().replica_id.unique_id
        # One model run at a time per replica: its threads are the replica's CPUs.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="analysis")
        self.analyse_batch.set_max_batch_size(options.max_batch)
        self.analyse_batch.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)

    def describe(self) -> AnalyserInfo:
        return self.analyser.info

    async def analyse(self, request: AnalyseRequest) -> AnalyseReply:
        return await self.analyse_batch((time.monotonic(), request))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def analyse_batch(self, calls: list[tuple[float, AnalyseRequest]]) -> list[AnalyseReply]:
        started = time.monotonic()
        windows = [window for _, request in calls for window in request.windows]
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(self._executor, self._analyse, windows)
        inference = time.monotonic() - started
        callers = len({request.caller for _, request in calls})
        replies, at = [], 0
        for arrived, request in calls:
            timing = ReplicaTiming(
                self.replica, started - arrived, inference, len(windows), len(calls), callers
            )
            mine = done[at : at + len(request.windows)]
            at += len(request.windows)
            replies.append(AnalyseReply([RemoteResult(f, ctc, timing) for f, ctc in mine]))
        return replies

    def _analyse(self, windows: list[Window]) -> list[tuple[dict[str, Any], CtcFrames | None]]:
        """The model run and its events' fields (making them is the replica's work too)."""
        return [(result.to_event(), result.ctc) for result in self.analyser.analyse(windows)]


@serve.deployment(name=GENERATION_APP, max_ongoing_requests=1)
class AudioLDMGeneration:
    """One replica: the AudioLDM pipeline, one clip at a time (Serve queues the rest). A clip
    streams back as it is made: Started, Progress per denoising step, Audio per block, then Done
    or Failed. A cancelled call (`response.cancel()`) stops the clip at its next step."""

    def __init__(self, options: GenerationOptions) -> None:
        import torch

        from stream.engines.worker import load_pipeline

        torch.set_num_threads(options.threads)
        bf16 = {"auto": None, "on": True, "off": False}[options.bf16]
        device = "cuda" if options.gpus > 0 else "cpu"  # Ray set CUDA_VISIBLE_DEVICES for us
        self.pipeline, self.info = load_pipeline(
            options.generator, bf16, device, compile_mode=options.compile,
            compile_seconds=tuple(options.compile_seconds),
        )  # fmt: skip
        # Model work runs on one thread of its own: the replica's loop stays free to take the
        # cancel of the clip that is running.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="generation")
        warm = GenerationRequest("warm-up", seconds=0.5, steps=1)
        for _ in self.pipeline.generate(warm, None):  # first-run costs now, not in a clip
            pass

    def describe(self) -> GeneratorInfo:
        return self.info

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        reports: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def put(report: Any) -> None:
            loop.call_soon_threadsafe(reports.put_nowait, report)

        def run() -> None:
            try:
                callbacks = Callbacks(lambda step, steps: put(Progress(step, steps)), stop.is_set)
                timings: dict[str, Any] = {}
                for block in self.pipeline.generate(request, callbacks):
                    put(Audio(block))
                    timings = block.timings or timings
                put(Done(timings))
            except GenerationCancelled:
                put(None)
            except Exception as exc:  # noqa: BLE001 - the clip fails, the replica goes on
                log.exception("generation failed")
                put(Failed("generation_failed", f"{type(exc).__name__}: {exc}"))

        work = loop.run_in_executor(self._executor, run)
        try:
            yield Started()
            while (report := await reports.get()) is not None:
                yield report
                if isinstance(report, Done | Failed):
                    break
        finally:  # cancelled (or finished): the clip stops at its next step boundary
            stop.set()
            await asyncio.shield(work)


def analysis_app(args: dict[str, Any]) -> Application:
    """The `wav2vec2-analysis` application (Serve config `import_path`, `args`: AnalysisOptions)."""
    return _application(Wav2Vec2Analysis, AnalysisOptions, args)


def generation_app(args: dict[str, Any]) -> Application:
    """The `audioldm-generation` application (`args`: GenerationOptions)."""
    return _application(AudioLDMGeneration, GenerationOptions, args)


def _application(deployment: Any, kind: type, args: dict[str, Any]) -> Application:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown {kind.__name__} arguments {unknown}; known: {sorted(known)}")
    options = kind(**args)
    # A Serve config's `deployments` section overrides these (replicas, resources, scaling).
    return deployment.options(
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.threads, "num_gpus": options.gpus},
    ).bind(options)
