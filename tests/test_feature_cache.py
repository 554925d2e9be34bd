"""Reuse of conv features across a stream's overlapping windows (models/feature_cache.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.fidelity import synthetic_audio
from clients.stream_client import StreamClient
from models.export import ensure_artifact
from models.feature_cache import FeatureCache
from models.presets import BASE_960H_VOCAB, resolve_model
from models.wav2vec2_runtime import Wav2Vec2Analyser
from stream.core.audio.chunker import Chunker
from tests.conftest import RunningServer, run_server
from tests.test_websocket import blocks_of


def stream_windows(audio: np.ndarray, stream: str, chunk: int = 16000, left: int = 16000) -> list:
    chunker = Chunker(chunk, left, stream=stream)
    return chunker.push(audio) + chunker.finish()


def one_by_one(analyser: Wav2Vec2Analyser, windows: list) -> list[dict[str, np.ndarray]]:
    """Windows in order, one call each, as a session sends them."""
    return [analyser.window_outputs([window])[0] for window in windows]


@pytest.fixture(scope="module")
def unnormalised_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a local checkpoint whose feature extractor does not normalise each
    window: then every frame's conv features depend on its own 400 samples only."""
    from models.wav2vec2_checkpoint import load_torch_model

    folder = tmp_path_factory.mktemp("checkpoints") / "tiny-raw"
    load_torch_model(resolve_model("tiny-random")).model.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(BASE_960H_VOCAB)}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    cache = tmp_path_factory.mktemp("onnx-cache")
    return ensure_artifact(str(folder), "fp32", cache_dir=cache, progress=False).folder


def test_cache_keeps_the_latest_window_per_stream_least_recent_out() -> None:
    cache = FeatureCache(max_streams=2)
    features = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    cache.store("a", 100, features)  # frames 100..109
    assert cache.lookup("a", 99, 5) is None  # the cache must hold the window's FIRST frame
    np.testing.assert_array_equal(cache.lookup("a", 104, 50), features[4:])
    np.testing.assert_array_equal(cache.lookup("a", 100, 3), features[:3])
    assert cache.lookup("a", 110, 5) is None and cache.lookup("b", 100, 5) is None
    cache.store("b", 0, features)
    cache.lookup("a", 100, 1)  # "a" is now the most recently used
    cache.store("c", 0, features)
    assert len(cache) == 2 and cache.lookup("b", 0, 1) is None
    assert cache.lookup("a", 100, 1) is not None
    cache.forget("a")
    assert cache.lookup("a", 100, 1) is None and len(cache) == 1


def test_reuse_is_exact_for_layer_norm_features(unnormalised_tiny: Path) -> None:
    fresh = Wav2Vec2Analyser(unnormalised_tiny, threads=1)
    reusing = Wav2Vec2Analyser(unnormalised_tiny, threads=1, feature_cache=True)
    audio = synthetic_audio(6.3, seed=4)
    expected = one_by_one(fresh, stream_windows(audio, "s"))
    got = one_by_one(reusing, stream_windows(audio, "s"))
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b["logits"], a["logits"], atol=1e-4)
        assert (a["logits"].argmax(-1) == b["logits"].argmax(-1)).all()
    # 1 s chunks + 1 s context: after the first window, only the new second is encoded.
    assert fresh.frames_encoded == fresh.frames_windowed
    assert 0.5 < reusing.frames_encoded / reusing.frames_windowed < 0.6
    assert reusing.frames_windowed == fresh.frames_windowed


def test_streams_never_share_features(unnormalised_tiny: Path) -> None:
    """Two streams interleaved in one batch each get their own audio's results."""
    fresh = Wav2Vec2Analyser(unnormalised_tiny, threads=1)
    reusing = Wav2Vec2Analyser(unnormalised_tiny, threads=1, feature_cache=True)
    a = stream_windows(synthetic_audio(4.0, seed=1), "a")
    b = stream_windows(synthetic_audio(4.0, seed=2), "b")
    for wa, wb in zip(a, b):
        together = reusing.window_outputs([wa, wb])
        for window, out in zip((wa, wb), together):
            (alone,) = fresh.window_outputs([window])
            np.testing.assert_allclose(out["logits"], alone["logits"], atol=1e-4)
    reusing.release("a")
    assert len(reusing.feature_cache) == 1


def test_skipped_chunks_and_off_grid_windows_are_computed_whole(unnormalised_tiny: Path) -> None:
    fresh = Wav2Vec2Analyser(unnormalised_tiny, threads=1)
    reusing = Wav2Vec2Analyser(unnormalised_tiny, threads=1, feature_cache=True)
    windows = stream_windows(synthetic_audio(6.0, seed=5), "s")
    kept = windows[:2] + windows[4:]  # a session skipped two chunks while behind
    for window in kept:
        (expected,) = fresh.window_outputs([window])
        (got,) = reusing.window_outputs([window])
        np.testing.assert_allclose(got["logits"], expected["logits"], atol=1e-4)
    # Window 0 (no context yet) and window 4 (nothing of it cached) are encoded whole (49 and 99
    # frames); windows 1 and 5 reuse their context's 49 frames and encode 50.
    assert reusing.frames_encoded == 49 + 50 + 99 + 50


def test_per_window_normalisation_keeps_reuse_close() -> None:
    """The tiny preset normalises each window (zero mean, unit variance): reused frames were
    normalised with an earlier window's statistics. Measured: same argmax, cosine ~1."""
    folder = ensure_artifact("tiny-random", "fp32", progress=False).folder
    fresh = Wav2Vec2Analyser(folder, threads=1)
    reusing = Wav2Vec2Analyser(folder, threads=1, feature_cache=True)
    audio = synthetic_audio(8.0, seed=6)
    expected = one_by_one(fresh, stream_windows(audio, "s"))
    got = one_by_one(reusing, stream_windows(audio, "s"))
    hidden_a = np.concatenate([o["hidden"] for o in expected])
    hidden_b = np.concatenate([o["hidden"] for o in got])
    cosine = (hidden_a * hidden_b).sum(-1) / (
        np.linalg.norm(hidden_a, axis=-1) * np.linalg.norm(hidden_b, axis=-1)
    )
    agree = np.concatenate(
        [a["logits"].argmax(-1) == b["logits"].argmax(-1) for a, b in zip(expected, got)]
    )
    assert cosine.mean() > 0.999 and agree.mean() > 0.97


async def test_sessions_release_their_features(server: RunningServer) -> None:
    (analyser,) = [e.analyser for e in server.app.state.sessions.engines if e.name == "wav2vec2"]
    assert analyser.feature_cache is not None  # auto: on for the layer-norm tiny preset
    encoded = analyser.frames_encoded
    client = StreamClient(server.ws, 16000, 1)
    result = await client.run(blocks_of(synthetic_audio(3.0, seed=7)[:, None], 1600))
    assert len(result.analysis) == 3
    # 3 windows of 1 s chunk + 1 s context: 49 + 99 + 99 frames seen, 49 + 50 + 50 encoded.
    assert analyser.frames_encoded - encoded == 149
    assert result.ready["session"] not in analyser.feature_cache._streams


def test_feature_cache_setting() -> None:
    with run_server(analysis_feature_cache="off") as running:
        (analyser,) = [
            e.analyser for e in running.app.state.sessions.engines if e.name == "wav2vec2"
        ]
        assert analyser.feature_cache is None
