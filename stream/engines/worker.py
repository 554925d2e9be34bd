"""The generation worker process: loads the generator once, then runs one job at a time.

It talks to the engine (generation.py) over one duplex pipe, in tuples:

    engine -> worker: ("job", job_id, GenerationRequest) | ("cancel", job_id) | ("stop",)
    worker -> engine: ("ready", info) | ("load_failed", message)
                      ("started", job_id) | ("progress", job_id, step, steps)
                      ("audio", job_id, AudioBlock) | ("done", job_id, timings)
                      ("cancelled", job_id) | ("failed", job_id, code, message)

Between denoising steps (and vocoder blocks) it reads the pipe for a cancel, and, while the
shared `analysis_busy` flag is up, waits (up to MAX_YIELD_S per step) so that analysis, which has
priority, gets the cores. A separate process: a hung or crashed generator cannot take the
server's event loop or analysis with it, and torch's thread settings stay its own.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from typing import Any, Protocol

log = logging.getLogger(__name__)
MAX_YIELD_S = 2.0  # longest pause per step while analysis is behind: generation still ends
YIELD_POLL_S = 0.01


class Generator(Protocol):
    def generate(self, request: Any, callbacks: Any) -> Any: ...


def load_pipeline(name: str, bf16: bool | None) -> tuple[Generator, dict[str, Any]]:
    """The real loader: an AudioLDM pipeline for preset/folder/hub id `name`, and its labels."""
    from models.audioldm import AudioLDM
    from models.audioldm_components import load_generator

    components = load_generator(name)
    pipeline = AudioLDM(components, bf16=bf16)
    info = {
        "model": components.name,
        "trained": components.trained,
        "note": components.note,
        "bf16": pipeline.bf16,
    }
    return pipeline, info


def serve(
    conn: Connection,
    name: str,
    threads: int,
    bf16: bool | None,
    analysis_busy: Synchronized,
    loader: Callable[[str, bool | None], tuple[Generator, dict[str, Any]]] = load_pipeline,
) -> None:
    """The worker's main: load, warm up, answer jobs until told to stop or the pipe closes."""
    # torch's OpenMP threads spin while idle; next to ONNX Runtime's analysis threads on the
    # same cores that spinning starves both (measured: 20x slower steps with 2 + 2 threads on 2
    # cores). Passive waiting costs a little latency per parallel region, nothing more.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from models.generation import GenerationRequest

    torch.set_num_threads(threads)
    try:
        pipeline, info = loader(name, bf16)
        warm = GenerationRequest("warm-up", seconds=0.5, steps=1)
        for _ in pipeline.generate(warm, None):  # first-run costs (allocations, kernels) now
            pass
    except Exception as exc:  # noqa: BLE001 - reported to the engine, which refuses to start
        conn.send(("load_failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", info))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the server went away
        if message[0] == "stop":
            return
        if message[0] == "job":
            if not _run(conn, pipeline, message[1], message[2], analysis_busy):
                return


def _run(
    conn: Connection, pipeline: Generator, job_id: int, request: Any, busy: Synchronized
) -> bool:
    """One job, start to end; False when a stop arrived during it."""
    from models.generation import Callbacks, GenerationCancelled

    state = {"cancelled": False, "stop": False, "paused": 0.0}

    def cancelled() -> bool:
        while conn.poll():
            message = conn.recv()
            if message[0] == "cancel" and message[1] == job_id:
                state["cancelled"] = True
            elif message[0] == "stop":
                state["cancelled"] = state["stop"] = True
        waited = 0.0
        while busy.value and waited < MAX_YIELD_S and not state["cancelled"]:
            time.sleep(YIELD_POLL_S)  # analysis is behind: give it the cores
            waited += YIELD_POLL_S
        state["paused"] += waited
        return state["cancelled"]

    def progress(step: int, steps: int) -> None:
        conn.send(("progress", job_id, step, steps))

    conn.send(("started", job_id))
    try:
        timings: dict[str, Any] = {}
        for block in pipeline.generate(request, Callbacks(progress, cancelled)):
            conn.send(("audio", job_id, block))
            timings = block.timings or timings
        conn.send(("done", job_id, {**timings, "paused_for_analysis_s": state["paused"]}))
    except GenerationCancelled:
        conn.send(("cancelled", job_id))
    except Exception as exc:  # noqa: BLE001 - one job's failure is reported, the worker goes on
        log.exception("generation %s failed", job_id)
        conn.send(("failed", job_id, "generation_failed", f"{type(exc).__name__}: {exc}"))
    return not state["stop"]
