"""One streaming session: the API every transport drives.

A transport calls `receive_bytes` / `receive_frames` / `receive_text` with what arrived and sends
whatever `outbox` yields; it stops reading once `accepting` is False. Its states (OPEN, STOPPING,
DRAINING, ENDED) and how each cause ends it are in lifecycle.py. The rest lives here and in the
collaborators it owns: each frame's way in and its limits (intake.py), the backlog in front of
the shared analysis engine (backlog.py), the analysis loop, control messages, errors as typed
events, acknowledgements (acks.py), what is kept (recorder.py) and the end-of-stream handshake.

A session outlives its connection: the manager (manager.py) keeps it through a grace period in
which a client may resume it. Acks (`{"type": "ack", "samples": N}`) tell the client how much
of its audio it may forget: N covers chunks that are analysed and, when context is persisted,
whose timeline entries are committed, so a crash of the server loses nothing acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from stream.core.audio.chunker import Chunker, Window
from stream.core.audio.input import AudioInput
from stream.core.audio.turns import TurnDetector, TurnSettings
from stream.engines.analysis import AnalysisEngine
from stream.engines.generation import GenerationEngine
from stream.logs import current_session
from stream.metrics import Metrics
from stream.pipeline import Pipeline
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
from stream.session.acks import Acks
from stream.session.analysis import (
    analyse_chunk,
    commit_transcript,
    detect_turns,
    fields_to_send,
    stitch_transcript,
    transcript_stitcher,
)
from stream.session.backlog import Backlog
from stream.session.controls import generation_control
from stream.session.generation import SessionGeneration, no_generation_event
from stream.session.intake import Intake
from stream.session.lifecycle import Attachment, Lifecycle, SessionState
from stream.session.options import Restored, SessionOptions
from stream.session.outbox import Outbox
from stream.session.rates import SendRates
from stream.session.recorder import Recorder
from stream.session.steps import SessionSteps
from stream.session.timing import ChunkTiming
from stream.session.tracing import Tracer
from stream.settings import Settings
from stream.store import Store

log = logging.getLogger(__name__)


class Session:
    def __init__(
        self,
        session_id: str,
        start: StartMessage,
        settings: Settings,
        engines: Sequence[AnalysisEngine],
        pipeline: Pipeline,
        generator: GenerationEngine | None = None,
        metrics: Metrics | None = None,
        transport: str = "websocket",
        store: Store | None = None,
        restored: Restored | None = None,
        tracer: Tracer | None = None,
        resumable: bool = True,
    ) -> None:
        self.id = session_id
        self.resumable = resumable  # False: its protocol has no resume (manager.open)
        self.pipeline = pipeline
        spec = pipeline.spec
        self.all_analysers = [e.name for e in engines]  # a `config` may name any of them
        engines = [e for e in engines if spec.analyse is None or e.name in spec.analyse]
        current_session.set(session_id)  # this task's log records, and its children's
        self.metrics = metrics
        self.transport = transport
        self.format = start.format
        min_left = max((e.info.min_left_context for e in engines), default=0)
        self.options = SessionOptions.resolve(start.config, settings, min_left)
        self.trace = None  # its spans (stream/session/tracing.py), with --otel-endpoint
        if tracer is not None:
            self.trace = tracer.session(session_id, start, transport, bool(restored), pipeline.name)
        chunker = Chunker(
            self.options.chunk, self.options.left_context, self.options.lookahead,
            stream=session_id, first_index=restored.next_chunk if restored else 0,
        )  # fmt: skip
        self.input = AudioInput(self.format, ANALYSIS_SAMPLE_RATE, chunker)
        self.recorder = Recorder(session_id, store, metrics)
        sent = self.recorder.sent if self.trace is None else self.trace.watch(self.recorder.sent)
        self.outbox = Outbox(
            session_id, settings.outbound_queue, sent, self.slow_consumer,
            first_n=restored.last_event if restored else 0,
        )  # fmt: skip
        if restored is not None:
            self.outbox.replay(list(restored.replay))
        self._engines = list(engines)
        self._analysers = [e.name for e in engines]
        self._transcript = transcript_stitcher(
            engines, self.options.ctc_decoder, settings.ctc_beam_width
        )
        self.turns = TurnDetector(self.options.turns)  # where speech ends
        self.trained = all(engine.trained for engine in engines)
        self._models = {engine.name: engine.describe() for engine in engines}
        self._drain_seconds = settings.generation_drain_seconds
        self._frontend = settings.frontend_id  # which server serves it (ready says)
        # The server's generator (ready says), whether or not this session's pipeline generates.
        self.generator_info = generator.describe() if generator is not None else None
        generates = generator is not None and spec.generate is not None
        self.steps = (
            SessionSteps(
                session_id,
                pipeline,
                self.outbox,
                self.recorder,
                origin=restored.next_chunk * self.options.chunk if restored else 0,
                kept=restored.context if restored else None,
            )  # fmt: skip
            if generates or pipeline.detectors
            else None
        )
        self.generation = None
        if generates and self.steps is not None and spec.generate is not None:
            self.generation = SessionGeneration(
                session_id, spec.generate, self.steps.context, spec.context_seconds, generator,
                self.outbox, self.recorder, send_audio=spec.send.audio,
                first_number=restored.generations + 1 if restored else 1, trace=self.trace,
            )  # fmt: skip
        if generator is None and (start.config.generation is not None or pipeline.triggers):
            self.outbox.put(no_generation_event(session_id, False, pipeline.name))
        if restored is None:
            info = {
                "transport": transport, "resumable": resumable, "sample_rate": start.sample_rate,
                "channels": start.channels, "encoding": start.encoding.value,
                "options": self.options.describe(), "models": self._models,
                "generator": self.generator_info,
                "config": start.config.model_dump(exclude_none=True),
                "pipeline": pipeline.describe(),
            }  # fmt: skip
            self.recorder.opened(info)

        self._backlog = Backlog(
            settings.max_backlog_chunks, self.options.when_behind,
            metrics.skipped.inc if metrics is not None else lambda: None,
        )  # fmt: skip
        self.chunks_analysed = restored.chunks if restored else 0
        self.lifecycle = Lifecycle()
        self._ending: asyncio.Task[None] | None = None  # stop(): the rest, up to `end`
        self.intake = Intake(
            session_id, self.input, self._backlog, self.lifecycle, self.outbox,
            max_frame_seconds=settings.max_frame_seconds,
            max_session_seconds=settings.max_session_seconds,
            rates=SendRates(
                settings.max_messages_per_second,
                settings.max_audio_speed if self.options.when_behind == "skip" else None,
            ),
            heard=self.steps.push_audio if self.steps is not None else None,
            fail=self.fail, stop=self.stop, metrics=metrics, transport=transport,
        )  # fmt: skip
        self.attachment: Attachment | None = None  # the connection holding it; None: detached
        self.failure: ProtocolError | None = None  # the fatal error that ended it, if one did
        self.acks = Acks(session_id, self.outbox, self.recorder)
        self._analysis = asyncio.create_task(self._analyse_loop(), name=f"analysis-{session_id}")
        self._acker = asyncio.create_task(
            self.acks.run(lambda: self.attachment is not None), name=f"acks-{session_id}"
        )

    # --- what transports call -------------------------------------------------------------

    @property
    def skipped(self) -> int:
        """Chunks dropped unanalysed because analysis was behind (`when_behind: skip`)."""
        return self._backlog.skipped

    @property
    def backlog(self) -> int:
        """Chunks cut and waiting for analysis: more than one means analysis is behind."""
        return len(self._backlog)

    @property
    def state(self) -> SessionState:
        return self.lifecycle.state

    @property
    def accepting(self) -> bool:
        """False once the session has ended or failed: the transport should stop reading."""
        return not self.lifecycle.ended

    def attach(self, attachment: Attachment) -> None:
        """A connection holds the session now (it opened or resumed it)."""
        self.attachment = attachment

    def detach(self, attachment: Attachment) -> None:
        """`attachment`'s connection let go; a newer one that took over keeps its hold."""
        if self.attachment is attachment:
            self.attachment = None

    def ready_event(self, resumed: bool = False) -> dict[str, Any]:
        return ready_event(
            self.id,
            sample_rate=self.format.sample_rate,
            channels=self.format.channels,
            encoding=self.format.encoding.value,
            **self.options.describe(),
            max_frame_bytes=self.intake.max_frame_bytes,
            analysers=self._analysers,
            models=self._models,
            generator=self.generator_info,
            pipeline=self.pipeline.describe(),
            trained=self.trained,
            ctc_decoder=self._transcript.decoding if self._transcript else None,
            resumed=resumed,
            samples_received=self.input.samples_received,
            frontend=self._frontend,
        )

    def summary(self) -> dict[str, Any]:
        """A line of the status page."""
        return {
            "id": self.id,
            "transport": self.transport,
            "state": self.state.name.lower(),  # open, stopping, draining, ended
            "attached": self.attachment is not None,  # False: waiting for a resume
            "seconds": round(self.input.samples_received / self.format.sample_rate, 2),
            "chunks": self.chunks_analysed,
            "skipped": self.skipped,
            "backlog": self.backlog,
            "generations": len(self.generation.clips) if self.generation else 0,
        }

    async def receive_bytes(self, data: bytes) -> None:
        """One binary frame of PCM in the session's declared format."""
        await self.intake.receive_bytes(data)

    async def receive_frames(self, frames: np.ndarray) -> None:
        """Already-decoded float32 (n, channels) frames, for transports that decode themselves."""
        await self.intake.receive_frames(frames)

    def commit(self) -> float | None:
        """The client ends its turn here (/v1/realtime): a `commit` event follows the
        analysis of what it sent, with the utterance's final. Returns where the turn ends
        (seconds on the analysis timeline); None once the input is closed."""
        if not self.lifecycle.input_open:
            return None
        return self.intake.commit() / ANALYSIS_SAMPLE_RATE

    def configure_turns(self, turns: TurnSettings | None) -> None:
        """New end-of-speech settings from the next chunk on (None: no turns from voice
        activity; utterances end at commits and with the stream)."""
        self.turns.reconfigure(turns)

    async def receive_text(self, text: str) -> None:
        if not self.accepting:
            return
        if not self.intake.text_allowed():  # the send rates count text messages too
            return
        try:
            message = parse_control(text)
        except ProtocolError as exc:
            self.outbox.put(exc.to_event(self.id))
            return
        if message["type"] == "stop":
            self.intake.client_stopped = True
            self.stop()  # not awaited: finishing may wait for generations, so keep reading
        else:
            await generation_control(self, message)

    def stop(
        self, close_code: CloseCode = CloseCode.NORMAL, drain_seconds: float | None = None
    ) -> asyncio.Task[None]:
        """The input is over: it closes now (STOPPING), and a task does the rest: analyse what
        remains, let generations finish (at most `drain_seconds`, default the server's
        setting), acknowledge everything, send `end`, close with `close_code`. Returns that
        task; a second call returns the same one (the first cause's close code stands). Callers
        that await it shield it: the end must not depend on who waits for it."""
        if self._ending is None:
            if self.lifecycle.input_open:
                self._close_input()
            self._ending = asyncio.create_task(
                self._end(close_code, drain_seconds), name=f"end-{self.id}"
            )
        return self._ending

    async def finalise(self) -> None:
        """Nobody will read this session's events: analyse what it has (that audio was
        received, and may have been acknowledged), cancel its generations, persist its end."""
        if self._ending is None:
            await asyncio.shield(self.stop(CloseCode.GOING_AWAY, drain_seconds=0))
            return
        if self.generation is not None:  # already stopping: cut the drain short
            await self.generation.close("session_end")
        await asyncio.wait({self._ending})

    def fail(self, error: ProtocolError, drop_pending: bool = False) -> None:
        """A fatal error: send it (after what is queued, or instead of it) and close; pending
        analysis is abandoned (and generations, once the manager closes the session)."""
        if self.lifecycle.ended:
            return
        self.failure = error
        self.lifecycle.enter(SessionState.ENDED)
        self._analysis.cancel()
        self._acker.cancel()
        self.outbox.fail(error, drop_pending)
        self._backlog.wake()  # releases a producer waiting for room

    def keep_context(self) -> None:
        """It moves (to another front-end, or past a restart): its rolling context goes to the
        store, for the one that goes on with it."""
        kept = self.steps.kept() if self.steps is not None else None
        if kept is not None:
            self.recorder.context(kept)

    async def close(self) -> None:
        """Stop all work for this session (it ended, or nobody will resume it)."""
        self.lifecycle.enter(SessionState.ENDED)  # first: nothing new starts while this waits
        if self.trace is not None:
            self.trace.end(self.summary())
        self._backlog.wake()
        tasks = [self._analysis, self._acker, *([self._ending] if self._ending else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.generation is not None:
            await self.generation.close("session_end")
        self.outbox.close(CloseCode.GOING_AWAY)

    # --- internals ------------------------------------------------------------------------

    def _handled(self, window: Window) -> None:
        """The window's chunk is done with (analysed, or failed and reported)."""
        # What the server will never need again: a session resumed after a restart goes on
        # from its last kept chunk, with that chunk's left context before it.
        needed = self.input.to_client_rate(max(0, window.end - self.options.left_context))
        self.acks.mark(min(needed, self.input.samples_received))

    def _close_input(self) -> None:
        """OPEN -> STOPPING: the chunker's last (partial) chunk joins the backlog, and the
        analysis loop ends once the backlog is empty."""
        self.lifecycle.enter(SessionState.STOPPING)
        self.intake.close()

    async def _end(self, close_code: CloseCode, drain_seconds: float | None) -> None:
        await asyncio.gather(self._analysis, return_exceptions=True)
        if self.lifecycle.ended:  # failed meanwhile: its error was the last word
            return
        self.lifecycle.enter(SessionState.DRAINING)
        if self.generation is not None:
            await self.generation.drain(
                self._drain_seconds if drain_seconds is None else drain_seconds
            )
        event = end_event(
            self.id,
            self.input.samples_received,
            self.format.sample_rate,
            self.chunks_analysed,
            self.skipped,
        )
        if self._transcript is not None:
            # An utterance still open when the last chunk had already been analysed.
            event["transcript"] = {"final": self._transcript.flush()}
        await self.recorder.written()
        await self.acks.final(self.input.samples_received)
        if self.lifecycle.ended:
            return
        self.outbox.put(event)
        self.lifecycle.enter(SessionState.ENDED)
        if self.trace is not None:
            self.trace.end(self.summary())
        self.outbox.close(close_code)

    def slow_consumer(self, why: str | None = None) -> None:
        """The client does not read its events: the outbox is full, or (`why`) a transport
        could not send for too long. Its queued events are dropped for the error."""
        why = why or f"{self.outbox.maxsize} events waited unread"
        error = ProtocolError(
            "slow_consumer", f"{why}; read events as they arrive", CloseCode.POLICY_VIOLATION
        )
        self.fail(error, drop_pending=True)

    async def _analyse_loop(self) -> None:
        try:
            await self._analyse_windows()
        except Exception as exc:  # a bug, not a model failure: say so rather than end short
            log.exception("session %s: analysis stopped", self.id)
            if self.trace is not None:
                self.trace.exception(exc)
            self.fail(ProtocolError("internal_error", "analysis failed", CloseCode.INTERNAL_ERROR))
        finally:  # however the session ends, models drop what they kept for it
            for engine in self._engines:
                engine.release(self.id)

    async def _analyse_windows(self) -> None:
        while not self.lifecycle.ended:
            taken = await self._backlog.take(lambda: not self.lifecycle.input_open)
            if taken is None:  # the last chunk has been analysed
                return
            item, skipped = taken
            window = item.window
            if item.commit:
                at = window.start
                self.outbox.put(await commit_transcript(self.id, self._transcript, self.turns, at))
                continue
            last = not self.lifecycle.input_open and not self._backlog
            timed = self.options.timing or self.trace is not None  # spans use the stamps too
            timing = ChunkTiming(item.received_at, item.ready_at) if timed else None
            fields, ctc, failures = await analyse_chunk(self._engines, window, timing, item.live)
            for message in failures:
                self.outbox.put(error_event(self.id, "analysis_failed", message, fatal=False))
            if not fields:
                if self.trace is not None:
                    self.trace.chunk_failed(window, skipped, timing, failures)
                self._handled(window)
                continue
            ends = detect_turns(self.turns, window, fields)
            await stitch_transcript(self._transcript, fields, ctc, skipped, ends, last)
            entry = self.steps.record(window, fields) if self.steps else None
            self.chunks_analysed += 1
            sent = fields_to_send(fields, self.pipeline.spec.send.analysis, self.options.embeddings)
            event = analysis_event(self.id, window.index, window.start, window.end, skipped, sent)
            now = time.monotonic()
            if timing is not None and self.options.timing:
                event["timing"] = timing.event_fields(now)
            traced = self.trace and self.trace.chunk(window, skipped, timing, now, failures)
            self.outbox.put(event, item.ready_at, item.received_at, queued_at=now, trace=traced)
            self.recorder.analysed(event, fields)  # all of it, whatever was sent
            self._handled(window)
            if self.metrics is not None:
                total = time.monotonic() - item.ready_at
                self.metrics.analysis_latency.labels("total", "all").observe(total)
            if self.steps is not None and entry is not None:
                await self.steps.react(entry, window.index, self.generation)
