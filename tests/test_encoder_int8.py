"""The int8 conv encoder of group-norm checkpoints (models/encoder_int8.py): close to the fp32
encoder also on quiet frames, rows independent of each other, any input length, and what economy
mode's streaming does with it on speech."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from benchmarks.fidelity import measure
from models.export import ensure_artifact
from models.frames import frames_in_window
from models.training.evaluate import heldout_clips
from models.wav2vec2_runtime import Wav2Vec2Analyser, Wav2Vec2Graphs
from stream.engines.loading import load_wav2vec2
from stream.settings import Settings
from stream.wiring import default_analysers


@pytest.fixture(scope="module")
def folder():
    return ensure_artifact("base-random", "int8", progress=False).folder


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_int8_encoder_keeps_quiet_frames(folder) -> None:
    """A window whose first half is 40 dB quieter than its second: one scale per tensor would
    leave the quiet frames a bit or two; with a scale per row every frame stays close to the
    fp32 encoder (measured: cosine >= 0.9995 on the quiet half, >= 0.9989 on the loud one)."""
    audio = np.random.default_rng(3).standard_normal((1, 32_000)).astype(np.float32)
    audio[:, :16_000] *= 0.01
    fp32 = Wav2Vec2Graphs(folder, threads=1).encode(audio)[0]
    int8 = Wav2Vec2Graphs(folder, threads=1, int8_encoder=True).encode(audio)[0]
    assert int8.shape == fp32.shape == (frames_in_window(32_000), 512)
    similarity = cosine(int8, fp32)
    quiet, loud = similarity[:45], similarity[55:]
    assert quiet.min() >= 0.995 and loud.min() >= 0.995
    # And the quiet frames are not just scaled-up noise: they are as quiet as in fp32.
    ratio = np.linalg.norm(int8[:45]) / np.linalg.norm(fp32[:45])
    assert abs(ratio - 1) < 0.02


def test_rows_of_a_batch_are_independent(folder) -> None:
    """Scales are per row of one window, and integer products are exact: a window gives the
    same features batched with a loud one as alone (one session cannot change another's)."""
    graphs = Wav2Vec2Graphs(folder, threads=1, int8_encoder=True)
    rng = np.random.default_rng(4)
    quiet = 0.001 * rng.standard_normal((1, 16_080)).astype(np.float32)
    loud = 10 * rng.standard_normal((1, 16_080)).astype(np.float32)
    alone = graphs.encode(quiet)
    batched = graphs.encode(np.concatenate([loud, quiet]))
    np.testing.assert_array_equal(batched[1], alone[0])


@pytest.mark.parametrize("samples", [400, 719, 720, 16_000, 20_799])
def test_any_length_gives_its_frames(folder, samples: int) -> None:
    """The graph takes whole frames only; the runner trims what feeds no frame, after group
    norm's statistics saw all of it (as PyTorch's GroupNorm does)."""
    audio = np.random.default_rng(samples).standard_normal((1, samples)).astype(np.float32)
    fp32 = Wav2Vec2Graphs(folder, threads=1).encode(audio)
    int8 = Wav2Vec2Graphs(folder, threads=1, int8_encoder=True).encode(audio)
    assert int8.shape == fp32.shape == (1, frames_in_window(samples), 512)
    assert cosine(int8, fp32).min() >= 0.99


def test_export_verifies_it_against_pytorch(folder) -> None:
    meta = ensure_artifact("base-random", "int8", progress=False).meta
    report = meta["int8_encoder_verification"]
    assert report["passed"] and report["hidden_cosine"] >= 0.99


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    gap = np.zeros(4800, np.float32)
    return np.concatenate([part for _, a in heldout_clips(10) for part in (a, gap)])


def test_economy_mode_on_speech(folder, speech: np.ndarray) -> None:
    """Economy mode (2 s chunks + 0.5 s, int8 conv encoder) streamed, against the whole
    utterance through the fp32 encoder: what a session in economy mode gives up, int8 included
    (measured on these 10 sentences: agreement 0.694 / cosine 0.936 with the fp32 encoder
    streamed, 0.686 / 0.935 with the int8 one; docs/fidelity.md)."""
    reference = Wav2Vec2Analyser(folder, 2)
    rows = {}
    for encoder in ("fp32", "int8"):
        analyser = Wav2Vec2Analyser(
            folder, 2, feature_cache=True, norm_seconds=10.0, encoder=encoder
        )
        assert analyser.encoder == encoder
        (rows[encoder],) = measure(analyser, speech, 2.0, [0.5], reference)
    assert rows["int8"]["ctc_argmax_agreement"] >= rows["fp32"]["ctc_argmax_agreement"] - 0.03
    assert rows["int8"]["hidden_cosine_mean"] >= rows["fp32"]["hidden_cosine_mean"] - 0.01


def test_layer_norm_checkpoints_keep_the_fp32_encoder(caplog) -> None:
    """The shipped tiny model normalises each frame (layer norm): its encoder is cheap and has
    no int8 graph; asking for one runs the fp32 encoder and says so."""
    with caplog.at_level(logging.WARNING, logger="stream.engines.loading"):
        analyser = load_wav2vec2(
            "tiny", "int8", threads=1, device="cpu", feature_cache="auto", max_streams=4,
            encoder="int8",
        )  # fmt: skip
    assert analyser.encoder == "fp32"
    assert "no such conv encoder" in caplog.text


def test_the_server_setting_reaches_the_analyser() -> None:
    """`--analysis-encoder int8` (economy mode's server half) through the server's own wiring."""
    settings = Settings(analysis_model="base-random", analysis_encoder="int8", max_sessions=4)
    analyser = next(a for a in default_analysers(settings) if a.name == "wav2vec2")
    assert analyser.encoder == "int8"
    assert analyser.graphs.encoder.get_modelmeta().graph_name == "encoder_int8"
