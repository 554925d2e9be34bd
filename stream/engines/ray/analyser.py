"""The front-end's wav2vec2 analyser with `--inference ray`: an Analyser like the local one, whose
batches run on the `wav2vec2-analysis` deployment through the bridge process (bridge.py).

The analysis engine calls `analyse` from its executor threads as it does for a local model (one
thread per batch in flight: `analysis_workers`), so its batching, lanes, retries and timings are
the same for both. Each result carries its call's stay on the replica (wire.ReplicaTiming).

The bridge is started in the constructor (before the server listens: a cluster that cannot be
reached is a start-up error, ClusterUnavailable). If it exits later (the cluster stopped
answering, or it crashed), the calls it held fail, `available` goes False (/readyz: 503; new
calls fail at once, so sessions get typed errors instead of waiting), and it is started again
after RESTART_DELAY_S, doubling up to RESTART_DELAY_MAX_S, until the cluster is back.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from models.base import ANALYSIS_SAMPLE_RATE, Analyser, AnalyserInfo, AnalysisWindow
from stream.core.audio.chunker import Window
from stream.engines.ray import bridge
from stream.engines.ray.wire import (
    ANALYSIS_APP,
    AnalyseCall,
    Analysed,
    AnalysisOptions,
    BridgeFailed,
    BridgeReady,
    CallFailed,
    ClusterUnavailable,
    RemoteResult,
    StopBridge,
)

log = logging.getLogger(__name__)
RESTART_DELAY_S = 0.5
RESTART_DELAY_MAX_S = 30.0


class RemoteCallFailed(RuntimeError):
    """The deployment did not answer a call (a replica died under it, the cluster went away)."""


class RemoteAnalyser(Analyser):
    name = "wav2vec2"
    sample_rate = ANALYSIS_SAMPLE_RATE

    def __init__(
        self,
        options: AnalysisOptions,
        address: str,
        caller: str,
        start_timeout: float = 600.0,
        call_timeout: float = 120.0,
    ) -> None:
        self.options, self.address, self.caller = options, address, caller
        self.start_timeout, self.call_timeout = start_timeout, call_timeout
        self._ctx = mp.get_context("spawn")  # the server has threads: never fork it
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards the pending calls and the connection
        self._send_lock = threading.Lock()  # one writer on the pipe at a time
        self._pending: dict[int, Future[Any]] = {}
        self._conn: Connection | None = None
        self._process: Any = None
        self._closing = False
        self.restarts = 0
        self.gcs = ""
        ready = self._start()  # ClusterUnavailable: the server does not start
        self._info = ready.info

    @property
    def info(self) -> AnalyserInfo:
        return self._info

    @property
    def available(self) -> bool:
        """The bridge is up: calls go to the cluster (False while it is started again)."""
        return self._conn is not None

    def analyse(self, windows: Sequence[AnalysisWindow]) -> list[RemoteResult]:
        """Runs in an engine executor thread: one call to the deployment, waited for."""
        future: Future[Any] = Future()
        plain = [_plain(window) for window in windows]
        with self._lock:
            conn = self._conn
            if conn is None:
                raise RemoteCallFailed(
                    f"the Ray cluster at {self.address} is unreachable; reconnecting"
                )
            call_id = next(self._ids)
            self._pending[call_id] = future
        try:
            # Pickling a window is 128 KB of copying: not under the lock that replies need.
            with self._send_lock:
                conn.send(AnalyseCall(call_id, plain))
            return future.result(self.call_timeout)
        except (OSError, ValueError) as exc:
            raise RemoteCallFailed(f"the analysis bridge is gone: {exc}") from exc
        finally:
            with self._lock:
                self._pending.pop(call_id, None)

    def close(self) -> None:
        self._closing = True
        with self._lock:
            conn, process = self._conn, self._process
            self._conn = None
        if conn is not None:
            try:
                conn.send(StopBridge())
            except (OSError, ValueError):
                pass
        if process is not None:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)

    # --- the bridge process -----------------------------------------------------------------

    def _start(self) -> BridgeReady:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=bridge.serve,
            args=(child, self.options, self.address, self.caller),
            name="grym-ray-analysis",
            daemon=True,
        )
        process.start()
        child.close()
        try:
            first = (
                parent.recv()
                if parent.poll(self.start_timeout)
                else BridgeFailed(f"it did not join the cluster within {self.start_timeout:g} s")
            )
        except (EOFError, OSError) as exc:
            first = BridgeFailed(f"the analysis bridge exited while starting ({exc!r})")
        if not isinstance(first, BridgeReady):
            process.kill()
            process.join(5)
            raise ClusterUnavailable(f"Ray cluster {self.address}: {first.message}")
        self.gcs = first.gcs
        asked = f"{self.options.model}:{self.options.variant}"
        if self.options.model != "auto" and first.info.label != asked:
            log.warning(
                "the running %s application serves %s; this front-end's settings ask for %s: "
                "it uses the running one (deploy the application again to change it)",
                ANALYSIS_APP, first.info.label, asked,
            )  # fmt: skip
        with self._lock:
            self._conn, self._process = parent, process
        threading.Thread(
            target=self._read, args=(parent, process), name="ray-analysis-reader", daemon=True
        ).start()
        return first

    def _read(self, conn: Connection, process: Any) -> None:
        """Replies onto their futures; once the pipe closes, the bridge's calls fail and it is
        started again."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._pending.get(getattr(message, "call_id", -1))
            if future is None or future.done():
                continue  # a call that timed out in the meantime
            if isinstance(message, Analysed):
                future.set_result(message.reply.results)
            elif isinstance(message, CallFailed):
                future.set_exception(RemoteCallFailed(message.message))
        process.join(5)
        with self._lock:
            self._conn = None
            lost = list(self._pending.values())
        why = f"the analysis bridge exited (code {process.exitcode}): the Ray cluster went away?"
        for future in lost:
            if not future.done():
                future.set_exception(RemoteCallFailed(why))
        if not self._closing:
            log.error("%s; starting it again", why)
            self._restart()

    def _restart(self) -> None:
        delay = RESTART_DELAY_S
        while not self._closing:
            time.sleep(delay)
            try:
                self._start()
            except ClusterUnavailable as exc:
                log.warning("the Ray cluster is still unreachable (%s); next try in %g s",
                            exc, min(delay * 2, RESTART_DELAY_MAX_S))  # fmt: skip
                delay = min(delay * 2, RESTART_DELAY_MAX_S)
                continue
            self.restarts += 1
            log.warning("the analysis bridge is back on the Ray cluster at %s", self.gcs)
            return


def _plain(window: AnalysisWindow) -> Window:
    """The window as the session's own plain dataclass (what pickles small and the replica's
    analyser reads): a test's or a plugin's window type need not import on the replica."""
    if isinstance(window, Window):
        return window
    start = window.audio_start + window.chunk_start
    return Window(
        0, start, window.audio_start + window.chunk_end, window.audio, window.chunk_start,
        window.chunk_end, window.stream,
    )  # fmt: skip
