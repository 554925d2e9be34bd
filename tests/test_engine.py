"""The analysis engine with a real model: batching and parallel workers keep results per window.
And what the engine and the sessions read of an analyser: what its `info` declares."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest

from models.base import Analyser, AnalyserInfo, AnalysisResult, CtcTokens
from models.export import ensure_artifact
from models.frames import MIN_LEFT_CONTEXT
from models.wav2vec2_runtime import Wav2Vec2Analyser
from stream.core.text.ctc_beam import BeamTranscriptStitcher
from stream.core.text.transcript import TranscriptStitcher
from stream.engines.analysis import AnalysisEngine, AnalysisFailed
from stream.plugins import register_analyser
from stream.retry import RetryPolicy
from stream.session.analysis import transcript_stitcher
from stream.settings import Settings
from stream.wiring import analysis_workers, generation_options, generation_threads
from tests.conftest import ArrayWindow


def tiny_random() -> Path:
    return ensure_artifact("tiny-random", "fp32", progress=False).folder


async def test_parallel_workers_and_batches_give_each_window_its_own_result() -> None:
    analyser = Wav2Vec2Analyser(tiny_random(), threads=1)
    rng = np.random.default_rng(11)
    windows = [
        ArrayWindow(rng.standard_normal(24000).astype(np.float32) * (0.05 + i / 50), 8000, 24000)
        for i in range(12)
    ]
    expected = [analyser.analyse([w])[0] for w in windows]
    engine = AnalysisEngine(analyser, max_batch=3, max_wait_ms=2, workers=2)
    await engine.start()
    try:
        results = await asyncio.gather(*(engine.analyse(w) for w in windows))
    finally:
        await engine.stop()
    for got, want in zip(results, expected):
        assert got.ctc is not None and want.ctc is not None
        assert got.ctc.token_ids == want.ctc.token_ids
        assert got.ctc.first_frame == want.ctc.first_frame
        np.testing.assert_allclose(got.ctc.log_probs, want.ctc.log_probs, atol=1e-4)
        assert got.fields["wav2vec2"]["frames"] == want.to_event()["wav2vec2"]["frames"]
    assert engine.windows == 12 and engine.batches < 12  # some windows shared a batch


class Plain(Analyser):
    """An analyser that declares nothing: the defaults of models.base."""

    name = "plain"
    sample_rate = 16_000


class TokensOnly(Plain):
    """A CTC analyser whose results carry token ids but no log-probabilities."""

    name = "tokens-only"
    info = AnalyserInfo(ctc_vocabulary=CtcTokens(["<pad>", "|", "A"], blank_id=0))


def test_an_analyser_that_declares_nothing_gets_the_defaults() -> None:
    engine = AnalysisEngine(Plain())
    assert engine.trained and engine.info.min_left_context == 0
    assert engine.describe() == {"model": "plain", "trained": True}
    assert "encoded_fraction" not in engine.stats()  # it counts no frames
    assert transcript_stitcher([engine], "beam", 8) is None  # no vocabulary: no transcript
    # Token ids without log-probabilities: greedy decoding, whatever the session asks for.
    tokens_only = AnalysisEngine(TokensOnly())
    assert isinstance(transcript_stitcher([tokens_only], "beam", 8), TranscriptStitcher)


def test_the_wav2vec2_analyser_declares_its_vocabulary_context_and_log_probs() -> None:
    analyser = Wav2Vec2Analyser(tiny_random(), threads=1)
    info = analyser.info
    meta = analyser.meta
    assert info.ctc_vocabulary == CtcTokens(meta["vocab"], meta["blank_id"], "|")
    assert info.min_left_context == MIN_LEFT_CONTEXT and info.ctc_log_probs
    engine = AnalysisEngine(analyser)
    described = {"model": analyser.model_label, "trained": False, "note": analyser.note}
    assert engine.describe() == described  # a random model, and says so
    assert isinstance(transcript_stitcher([engine], "beam", 8), BeamTranscriptStitcher)
    assert isinstance(transcript_stitcher([engine], "greedy", 8), TranscriptStitcher)


class Undeclared:
    """An analyser written to the interface before it was declared: no `info`."""

    name = "undeclared"
    sample_rate = 16_000

    def analyse(self, windows: list) -> list:
        return [{"undeclared": {}} for _ in windows]

    def release(self, stream: str) -> None:
        pass


class PlainResults(Plain):
    """Declared, but its results are plain dicts: not AnalysisResult, so no declared `ctc`."""

    name = "plain-results"

    def analyse(self, windows: list) -> list:
        return [{"plain": {}} for _ in windows]


async def test_an_analyser_or_result_that_declares_nothing_is_refused_with_a_reason() -> None:
    with pytest.raises(TypeError, match="must subclass stream.plugins.Analyser"):
        register_analyser(Undeclared)
    with pytest.raises(TypeError, match="must subclass models.base.Analyser"):
        AnalysisEngine(Undeclared())
    engine = AnalysisEngine(PlainResults(), retry=RetryPolicy(attempts=1))
    await engine.start()
    try:
        window = ArrayWindow(np.zeros(16_000, np.float32), 0, 16_000, 0, "s")
        with pytest.raises(AnalysisFailed, match="does not subclass models.base.AnalysisResult"):
            await engine.analyse(window)
    finally:
        await engine.stop()


class Recorded(AnalysisResult):
    def to_event(self) -> dict:
        return {}


class Slow(Plain):
    """Takes 20 ms a batch and remembers the batches it ran, by stream."""

    name = "slow"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def analyse(self, windows: list) -> list:
        self.batches.append([w.stream for w in windows])
        time.sleep(0.02)
        return [Recorded() for _ in windows]


async def test_live_windows_go_before_bulk_ones_and_bulk_ones_run_alone() -> None:
    """Sessions sending faster than real time (bulk) cannot make a live session wait for more
    than one bulk window's run: the engine serves the live lane first."""
    analyser = Slow()
    engine = AnalysisEngine(analyser, max_batch=8, max_wait_ms=0)
    await engine.start()
    try:

        def window(stream: str) -> ArrayWindow:
            return ArrayWindow(np.zeros(1600, np.float32), 0, 1600, 0, stream)

        bulk = [
            asyncio.create_task(engine.analyse(window(f"bulk{i}"), live=False)) for i in range(6)
        ]
        await asyncio.sleep(0.005)  # the first bulk window is running
        live = [asyncio.create_task(engine.analyse(window(f"live{i}"))) for i in range(2)]
        await asyncio.gather(*bulk, *live)
    finally:
        await engine.stop()
    assert analyser.batches[0] == ["bulk0"]  # it was alone in the queue
    assert analyser.batches[1] == ["live0", "live1"]  # next, together, before any bulk one
    assert analyser.batches[2:] == [[f"bulk{i}"] for i in range(1, 6)]  # then one at a time


def test_analysis_workers_default_to_one_per_core_and_two_on_a_gpu() -> None:
    """`--analysis-workers 0`: a worker per usable core on the CPU; on a GPU one run is on the
    device while the next is prepared, so two (as many calls in flight with Ray)."""
    cores = len(os.sched_getaffinity(0))
    assert analysis_workers(Settings(analysis_device="cpu")) == cores
    assert analysis_workers(Settings(analysis_device="cuda")) == 2
    assert analysis_workers(Settings(analysis_device="cuda", analysis_workers=3)) == 3
    assert analysis_workers(Settings(analysis_model="none", analysis_device="cuda")) == cores
    assert analysis_workers(Settings(inference="ray")) == 2


def test_generation_threads_default_to_every_core_at_idle_priority() -> None:
    """At idle priority the worker gets only the cores analysis leaves, so it may have all of
    them; at other priorities it would compete, so one. Ray replicas reserve what they get."""
    cores = len(os.sched_getaffinity(0))
    assert generation_threads(Settings()) == cores
    assert generation_threads(Settings(generation_priority="low")) == 1
    assert generation_threads(Settings(generation_threads=3, generation_priority="low")) == 3
    assert generation_options(Settings()).threads == 1


def test_ray_generation_replicas_compile_as_the_settings_say() -> None:
    """Each replica compiles its networks on its own machine, as --generation-compile(-seconds)
    ask (the replica's cache: a remote machine's, not this one's)."""
    options = generation_options(
        Settings(generation_compile="off", generation_compile_seconds=[3.0, 6.5])
    )
    assert (options.compile, options.compile_seconds) == ("off", (3.0, 6.5))
    assert generation_options(Settings()).compile == "auto"
