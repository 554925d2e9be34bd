"""A session's intake: each audio frame a transport hands over, from arrival to the backlog.

A frame is checked (the send rates of rates.py, the input still open, its size, the session's
duration limit), decoded, down-mixed, resampled and cut into chunks by the core (AudioInput);
each chunk is heard by the pipeline's context (skipped ones too) and joins the backlog in front
of analysis, where a `wait` session's transport is held while analysis is behind. Audio after
the client's `stop` is reported once and not used. What a crossed limit does to the session is
the session's: the intake reports it through `fail` (a rate exceeded, a frame too large) and
`stop` (the duration limit).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from models.frames import STRIDE as FRAME_SAMPLES
from stream.core.audio.chunker import Window
from stream.core.audio.input import AudioInput
from stream.core.audio.pcm import PcmError
from stream.metrics import Metrics
from stream.protocol import CloseCode, ProtocolError, error_event
from stream.session.backlog import Backlog, Pending
from stream.session.lifecycle import Lifecycle
from stream.session.outbox import Outbox
from stream.session.rates import Pace, SendRates


class Intake:
    def __init__(
        self,
        session: str,
        audio: AudioInput,
        backlog: Backlog,
        lifecycle: Lifecycle,
        outbox: Outbox,
        *,
        max_frame_seconds: float,
        max_session_seconds: float,
        rates: SendRates,
        heard: Callable[[Window], None] | None,
        fail: Callable[[ProtocolError], None],
        stop: Callable[[CloseCode], asyncio.Task[None]],
        metrics: Metrics | None = None,
        transport: str = "websocket",
    ) -> None:
        self.session, self.audio, self.backlog = session, audio, backlog
        self.lifecycle, self.outbox = lifecycle, outbox
        fmt = audio.fmt
        self.max_frame_bytes = fmt.bytes_for(max_frame_seconds)
        self._max_samples = round(max_session_seconds * fmt.sample_rate)
        self._heard, self._fail, self._stop = heard, fail, stop
        self._rates = rates
        self._pace = Pace()
        self._metrics, self._transport = metrics, transport
        self.client_stopped = False  # the client sent `stop`: later audio is reported
        self._warned_after_stop = False

    async def receive_bytes(self, data: bytes) -> None:
        """One binary frame of PCM in the session's declared format."""
        received = time.monotonic()
        seconds = len(data) / self.audio.fmt.bytes_for(1.0)
        if not self._within_rates(self._rates.message, seconds):  # before any other work
            return
        if not self._audio_allowed():
            return
        if len(data) > self.max_frame_bytes:
            self._fail(
                ProtocolError(
                    "frame_too_large",
                    f"binary frame of {len(data)} bytes exceeds the limit of "
                    f"{self.max_frame_bytes} bytes; send smaller frames (e.g. 20-100 ms)",
                    CloseCode.MESSAGE_TOO_BIG,
                )
            )
            return
        frames = len(data) // self.audio.fmt.frame_bytes
        if not self._within_rates(self._rates.audio, frames / self.audio.fmt.sample_rate):
            return
        if not await self._within_duration(frames):
            return
        try:
            windows = self.audio.feed_pcm(data)
        except PcmError as exc:
            self.outbox.put(error_event(self.session, exc.code, str(exc), fatal=False))
            return
        self._count(frames)
        self._queue(windows, time.monotonic(), received)
        await self.backlog.room(lambda: self.lifecycle.ended)

    async def receive_frames(self, frames: np.ndarray) -> None:
        """Already-decoded float32 (n, channels) frames, for transports that decode themselves."""
        received = time.monotonic()
        seconds = len(frames) / self.audio.fmt.sample_rate
        if not (
            self._within_rates(self._rates.message, seconds)
            and self._within_rates(self._rates.audio, seconds)
        ):
            return
        if self._audio_allowed() and await self._within_duration(len(frames)):
            self._count(len(frames))
            self._queue(self.audio.feed_frames(frames), time.monotonic(), received)
            await self.backlog.room(lambda: self.lifecycle.ended)

    def commit(self) -> int:
        """The client ends its turn here (/v1/realtime's commit): what has arrived is cut into
        chunks now, the last one short, and a commit mark follows them into the backlog.
        Returns where the turn ends (a timeline sample, on the 20 ms frame grid)."""
        now = time.monotonic()
        self._queue(self.audio.cut_now(FRAME_SAMPLES), now, now)
        at = self.audio.chunker.next_start
        mark = Window(-1, at, at, np.zeros(0, np.float32), 0, 0, self.session)
        self.backlog.push(Pending(mark, now, now, commit=True))
        return at

    def close(self) -> None:
        """No more input: the chunker's last (partial) chunk joins the backlog."""
        now = time.monotonic()
        self._queue(self.audio.finish(), now, now)
        self.backlog.wake()

    def text_allowed(self) -> bool:
        """A text message arrived: within the send rates? (Else the session has failed.)"""
        return self._within_rates(self._rates.message, None)

    def _within_rates(self, check: Callable[[float | None], None], seconds: float | None) -> bool:
        """`check` (a message, checked before any other work, since a flood's cost is per
        message; or a frame's audio, once its size is known to be within the limit); False,
        and the session failed, past the limit."""
        try:
            check(seconds)
        except ProtocolError as exc:
            self._fail(exc)
            return False
        return True

    def _audio_allowed(self) -> bool:
        """False once the input is closed; audio after `stop` is reported once, not used."""
        if self.lifecycle.input_open:
            return True
        if self.client_stopped and not self.lifecycle.ended and not self._warned_after_stop:
            self._warned_after_stop = True
            why = "audio after stop is not used (the session is finishing)"
            self.outbox.put(error_event(self.session, "audio_after_stop", why, fatal=False))
        return False

    async def _within_duration(self, frames: int) -> bool:
        if self.audio.samples_received + frames <= self._max_samples:
            return True
        limit = self._max_samples / self.audio.fmt.sample_rate
        self.outbox.put(
            error_event(
                self.session,
                "session_too_long",
                f"the session reached the server's limit of {limit:g} s of audio; the frame "
                "that crossed it was not used; start a new session to go on",
                fatal=True,
            )
        )
        # Shielded: the end must not depend on the transport task that happened to cross it.
        await asyncio.shield(self._stop(CloseCode.POLICY_VIOLATION))
        return False

    def _count(self, frames: int) -> None:
        self._pace.heard(frames / self.audio.fmt.sample_rate, time.monotonic())
        if self._metrics is not None:
            seconds = frames / self.audio.fmt.sample_rate
            self._metrics.audio_seconds.labels(self._transport).inc(seconds)

    def _queue(self, windows: list[Window], ready_at: float, received_at: float) -> None:
        live = self._pace.live(ready_at)
        for window in windows:
            if self._heard is not None:  # skipped chunks were heard too
                self._heard(window)
            self.backlog.push(Pending(window, ready_at, received_at, live))
