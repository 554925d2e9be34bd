"""One streaming session: the API every transport drives.

A transport calls `receive_bytes` / `receive_frames` / `receive_text` with what arrived and sends
whatever `outbox` yields; it stops reading once `accepting` is False. Everything else lives here:
the core input stage, the per-session backlog in front of the shared analysis engine (skip or
wait when behind), errors as typed events, and the end-of-stream handshake.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream.core.audio_input import AudioInput
from stream.core.chunker import Chunker, Window
from stream.core.pcm import PcmError
from stream.engines.analysis import AnalysisEngine, AnalysisFailed
from stream.outbox import Outbox
from stream.protocol import (
    ANALYSIS_SAMPLE_RATE,
    CloseCode,
    ProtocolError,
    StartMessage,
    analysis_event,
    end_event,
    error_event,
    parse_control,
    ready_event,
)
from stream.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    window: Window
    ready_at: float  # monotonic time the chunk's last sample arrived


class Session:
    def __init__(
        self, session_id: str, start: StartMessage, settings: Settings, engine: AnalysisEngine
    ) -> None:
        self.id = session_id
        self.format = start.format
        # The client's per-session config where given, else the server's defaults.
        chosen = start.config.model_dump(exclude_none=True)
        self.chunk_seconds = chosen.get("chunk_seconds", settings.chunk_seconds)
        self.left_context_seconds = chosen.get(
            "left_context_seconds", settings.left_context_seconds
        )
        self.lookahead_seconds = chosen.get("lookahead_seconds", settings.lookahead_seconds)
        self.when_behind = chosen.get("when_behind", settings.when_behind)
        rate = ANALYSIS_SAMPLE_RATE
        chunker = Chunker(
            chunk=round(self.chunk_seconds * rate),
            left_context=round(self.left_context_seconds * rate),
            lookahead=round(self.lookahead_seconds * rate),
        )
        self.input = AudioInput(self.format, rate, chunker)
        self.outbox = Outbox(session_id, settings.outbound_queue)
        self.max_frame_bytes = self.format.bytes_for(settings.max_frame_seconds)
        self._max_samples = round(settings.max_session_seconds * self.format.sample_rate)
        self._max_backlog = settings.max_backlog_chunks
        self._engine = engine
        self._analysers = engine.names

        self._backlog: deque[_Pending] = deque()
        self._backlog_changed = asyncio.Event()
        self._input_done = False
        self._skipped_pending = 0  # skipped since the last chunk taken for analysis
        self.skipped = 0
        self.chunks_analysed = 0
        self._stopping = False
        self._analysis = asyncio.create_task(self._analyse_loop(), name=f"analysis-{session_id}")

    # --- what transports call -------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """False once stopping or failed: the transport should stop reading input."""
        return not (self._stopping or self.outbox.closed)

    def ready_event(self) -> dict[str, Any]:
        return ready_event(
            self.id,
            sample_rate=self.format.sample_rate,
            channels=self.format.channels,
            encoding=self.format.encoding.value,
            chunk_seconds=self.chunk_seconds,
            left_context_seconds=self.left_context_seconds,
            lookahead_seconds=self.lookahead_seconds,
            when_behind=self.when_behind,
            max_frame_bytes=self.max_frame_bytes,
            analysers=self._analysers,
            resumed=False,
            samples_received=self.input.samples_received,
        )

    async def receive_bytes(self, data: bytes) -> None:
        """One binary frame of PCM in the session's declared format."""
        if not self.accepting:
            return
        if len(data) > self.max_frame_bytes:
            self.fail(
                ProtocolError(
                    "frame_too_large",
                    f"binary frame of {len(data)} bytes exceeds the limit of "
                    f"{self.max_frame_bytes} bytes; send smaller frames (e.g. 20-100 ms)",
                    CloseCode.MESSAGE_TOO_BIG,
                )
            )
            return
        if not await self._within_duration(len(data) // self.format.frame_bytes):
            return
        try:
            windows = self.input.feed_pcm(data)
        except PcmError as exc:
            self.outbox.put(error_event(self.id, exc.code, str(exc), fatal=False))
            return
        await self._enqueue(windows, time.monotonic())

    async def receive_frames(self, frames: np.ndarray) -> None:
        """Already-decoded float32 (n, channels) frames, for transports that decode themselves."""
        if self.accepting and await self._within_duration(len(frames)):
            await self._enqueue(self.input.feed_frames(frames), time.monotonic())

    async def receive_text(self, text: str) -> None:
        if not self.accepting:
            return
        try:
            message = parse_control(text)
        except ProtocolError as exc:
            self.outbox.put(exc.to_event(self.id))
            return
        if message["type"] == "stop":
            await self.finish()

    async def finish(self, close_code: CloseCode = CloseCode.NORMAL) -> None:
        """End of input: analyse what remains, send `end`, then close with `close_code`."""
        if self._stopping or self.outbox.closed:
            return
        self._stopping = True
        await self._enqueue(self.input.finish(), time.monotonic(), wait=False)
        self._input_done = True
        self._backlog_changed.set()
        await asyncio.gather(self._analysis, return_exceptions=True)
        self.outbox.put(
            end_event(
                self.id,
                self.input.samples_received,
                self.format.sample_rate,
                self.chunks_analysed,
                self.skipped,
            )
        )
        self.outbox.close(close_code)

    def fail(self, error: ProtocolError) -> None:
        """A fatal error: send it and close; pending analysis is abandoned."""
        self._analysis.cancel()
        self.outbox.fail(error)
        self._backlog_changed.set()  # releases a producer waiting for room

    async def abort(self) -> None:
        """The connection is gone: stop all work for this session."""
        self._analysis.cancel()
        await asyncio.gather(self._analysis, return_exceptions=True)
        self.outbox.close(CloseCode.GOING_AWAY)
        self._backlog_changed.set()

    # --- internals ------------------------------------------------------------------------

    async def _within_duration(self, frames: int) -> bool:
        if self.input.samples_received + frames <= self._max_samples:
            return True
        limit = self._max_samples / self.format.sample_rate
        self.outbox.put(
            error_event(
                self.id,
                "session_too_long",
                f"the session reached the server's limit of {limit:g} s of audio; the frame "
                "that crossed it was not used; start a new session to go on",
                fatal=True,
            )
        )
        await self.finish(CloseCode.POLICY_VIOLATION)
        return False

    async def _enqueue(self, windows: list[Window], ready_at: float, wait: bool = True) -> None:
        for window in windows:
            self._backlog.append(_Pending(window, ready_at))
            if self.when_behind == "skip":
                while len(self._backlog) > self._max_backlog:
                    # Behind real time: drop the oldest waiting chunk so latency stays bounded.
                    # Its audio stays on the timeline; the next event reports the skip.
                    self._backlog.popleft()
                    self._skipped_pending += 1
                    self.skipped += 1
        if windows:
            self._backlog_changed.set()
        if wait and self.when_behind == "wait":
            # Back-pressure: the transport awaits us, so it reads no more input until
            # analysis has caught up.
            while len(self._backlog) > self._max_backlog and not self.outbox.closed:
                self._backlog_changed.clear()
                await self._backlog_changed.wait()

    async def _analyse_loop(self) -> None:
        while not self.outbox.closed:
            if not self._backlog:
                if self._input_done:
                    return
                self._backlog_changed.clear()
                await self._backlog_changed.wait()
                continue
            item = self._backlog.popleft()
            self._backlog_changed.set()  # wakes a producer waiting for room
            skipped, self._skipped_pending = self._skipped_pending, 0
            window = item.window
            try:
                fields = await self._engine.analyse(window)
            except AnalysisFailed as exc:
                self.outbox.put(
                    error_event(
                        self.id,
                        "analysis_failed",
                        f"analysis of {window.start / ANALYSIS_SAMPLE_RATE:.3f}-"
                        f"{window.end / ANALYSIS_SAMPLE_RATE:.3f} s failed: {exc}",
                        fatal=False,
                    )
                )
                continue
            self.chunks_analysed += 1
            event = analysis_event(self.id, window.index, window.start, window.end, skipped, fields)
            self.outbox.put(event, ready_at=item.ready_at)
