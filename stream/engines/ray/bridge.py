"""The analysis bridge: a child process of the front-end that is its Ray driver for analysis.

It joins the cluster, finds (or deploys) the `wav2vec2-analysis` application, answers its start
with BridgeReady (the deployed analyser's info) or BridgeFailed, then forwards each AnalyseCall
from the pipe to the deployment and each reply back, many calls in flight at once (the replicas
batch them with other front-ends' calls). It exits when the pipe closes, on StopBridge, or when
the cluster stops answering (cluster.watch); the front-end (analyser.py) starts another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from stream.engines.ray.wire import (
    ANALYSIS_APP,
    AnalyseCall,
    Analysed,
    AnalyseRequest,
    AnalysisOptions,
    BridgeFailed,
    BridgeReady,
    CallFailed,
    FromBridge,
    StopBridge,
)

log = logging.getLogger(__name__)


def serve(conn: Connection, options: AnalysisOptions, address: str, caller: str) -> None:
    """The bridge's main: join, then forward calls until told to stop."""
    send_lock = threading.Lock()

    def send(message: FromBridge) -> None:
        with send_lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                pass  # the front-end is gone: the reader sees the pipe close and ends us

    try:
        from stream.engines.ray.cluster import application, join, watch
        from stream.engines.ray.deployments import analysis_app

        gcs = join(address)
        handle = application(ANALYSIS_APP, lambda: analysis_app(dataclasses.asdict(options)))
        info = handle.describe.remote().result()
    except Exception as exc:  # noqa: BLE001 - reported: the front-end says why it cannot start
        send(BridgeFailed(f"{type(exc).__name__}: {exc}"))
        return
    watch(gcs)
    send(BridgeReady(info, gcs))
    asyncio.run(_forward(conn, handle, caller, send))


async def _forward(
    conn: Connection, handle: Any, caller: str, send: Callable[[FromBridge], None]
) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    threading.Thread(
        target=_read, args=(conn, loop, inbox), name="bridge-reader", daemon=True
    ).start()

    async def call(message: AnalyseCall) -> None:
        try:
            reply = await handle.analyse.remote(AnalyseRequest(caller, message.windows))
        except Exception as exc:  # noqa: BLE001 - the engine's retry policy decides
            send(CallFailed(message.call_id, f"{type(exc).__name__}: {exc}"))
            return
        # Off the loop: a reply with CTC log-probabilities is tens of KB to pickle and write.
        await asyncio.to_thread(send, Analysed(message.call_id, reply))

    calls: set[asyncio.Task[None]] = set()
    while not isinstance(message := await inbox.get(), StopBridge):
        task = asyncio.create_task(call(message))
        calls.add(task)
        task.add_done_callback(calls.discard)
    for task in calls:
        task.cancel()


def _read(conn: Connection, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue[Any]) -> None:
    """Every message from the front-end onto the loop; StopBridge once the pipe closes."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = StopBridge()
        loop.call_soon_threadsafe(inbox.put_nowait, message)
        if isinstance(message, StopBridge):
            return
