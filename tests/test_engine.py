"""The analysis engine with a real model: batching and parallel workers keep results per window."""

from __future__ import annotations

import asyncio

import numpy as np

from models.export import ensure_artifact
from models.wav2vec2_runtime import Wav2Vec2Analyser
from stream.engines.analysis import AnalysisEngine
from tests.conftest import ArrayWindow


async def test_parallel_workers_and_batches_give_each_window_its_own_result() -> None:
    analyser = Wav2Vec2Analyser(
        ensure_artifact("tiny-random", "fp32", progress=False).folder, threads=1
    )
    rng = np.random.default_rng(11)
    windows = [
        ArrayWindow(rng.standard_normal(24000).astype(np.float32) * (0.05 + i / 50), 8000, 24000)
        for i in range(12)
    ]
    expected = [analyser.analyse([w])[0].to_event() for w in windows]
    engine = AnalysisEngine(analyser, max_batch=3, max_wait_ms=2, workers=2)
    await engine.start()
    try:
        results = await asyncio.gather(*(engine.analyse(w) for w in windows))
    finally:
        await engine.stop()
    for got, want in zip(results, expected):
        assert got["ctc"]["tokens"] == want["ctc"]["tokens"]
        assert got["ctc"]["first_frame"] == want["ctc"]["first_frame"]
        np.testing.assert_allclose(got["ctc"]["log_probs"], want["ctc"]["log_probs"], atol=1e-4)
        assert got["wav2vec2"]["frames"] == want["wav2vec2"]["frames"]
    assert engine.windows == 12 and engine.batches < 12  # some windows shared a batch
