"""Generation with `--inference ray`: the generation worker process (stream/engines/worker.py)
runs as usual, with this loader: instead of loading AudioLDM, it joins the Ray cluster and
generates on the `audioldm-generation` deployment, clip by clip, as the blocks stream back.

So the engine's rules hold unchanged (one waiting job per session, superseding, retries, a
worker that dies is started again with backoff for as long as it takes): a worker whose cluster
goes away exits (cluster.watch), and the engine's restarts fail, quickly and honestly
(`generator_unavailable`, /readyz 503), until the cluster is back.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator
from typing import Any

from models.generation import AudioBlock, Callbacks, GenerationCancelled, GenerationRequest
from stream.engines.ray.wire import GENERATION_APP, GenerationOptions
from stream.engines.reports import Audio, Done, Failed, GeneratorInfo, Progress, Started

CANCEL_POLL_S = 0.02  # how often a clip waiting for its next report checks for a cancel
_END = object()


class RemoteGenerationFailed(RuntimeError):
    """The replica reported a failure, or the call to it broke (the replica died)."""


def load_remote(
    address: str, options: GenerationOptions, name: str, bf16: bool | None
) -> tuple[RayGenerator, GeneratorInfo]:
    """The worker's loader (bind `address` and `options` with functools.partial): join the
    cluster, find or deploy the application, and read what its replicas loaded. `name` and
    `bf16` are the application's business (`options`)."""
    from stream.engines.ray.cluster import application, join, watch
    from stream.engines.ray.deployments import generation_app

    gcs = join(address)
    watch(gcs)
    handle = application(GENERATION_APP, lambda: generation_app(dataclasses.asdict(options)))
    info: GeneratorInfo = handle.describe.remote().result()
    return RayGenerator(handle), info


class RayGenerator:
    """The Generator protocol (stream/engines/worker.py) over a streaming Serve call."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def generate(
        self, request: GenerationRequest, callbacks: Callbacks | None
    ) -> Iterator[AudioBlock]:
        callbacks = callbacks or Callbacks()
        response = self.handle.options(stream=True).generate.remote(request)
        reports: queue.Queue[Any] = queue.Queue()
        # The stream is read on a thread of its own, so that a cancel is taken within
        # CANCEL_POLL_S, not only when the replica's next report comes.
        threading.Thread(target=_pump, args=(response, reports), daemon=True).start()
        try:
            while True:
                try:
                    report = reports.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    if callbacks.cancelled():
                        raise GenerationCancelled from None
                    continue
                match report:
                    case Started():
                        pass
                    case Progress(step, steps):
                        callbacks.on_step(step, steps)
                    case Audio(block):
                        yield block
                    case Done():
                        return
                    case Failed(code, message):
                        raise RemoteGenerationFailed(f"{code}: {message}")
                    case BaseException():
                        raise RemoteGenerationFailed(
                            f"the generation replica failed: {type(report).__name__}: {report}"
                        ) from report
                    case _ if report is _END:
                        raise RemoteGenerationFailed("the generation replica ended the clip early")
        except BaseException:
            response.cancel()  # the replica stops at its next step (a no-op once it is done)
            raise


def _pump(response: Any, reports: queue.Queue[Any]) -> None:
    try:
        for report in response:
            reports.put(report)
    except Exception as exc:  # noqa: BLE001 - handed to the reading side
        reports.put(exc)
    reports.put(_END)
