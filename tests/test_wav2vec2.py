"""wav2vec2 on ONNX Runtime: the analyser with arrays, then through a real server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from benchmarks.fidelity import measure, synthetic_audio
from clients.stream_client import StreamClient
from models.base import decode_embedding
from models.export import ensure_artifact
from models.frames import frames_in_window
from models.wav2vec2_runtime import Wav2Vec2Analyser
from stream.core.audio.chunker import Chunker
from stream.core.audio.pcm import Encoding
from stream.core.text.transcript import CtcVocabulary, TranscriptStitcher
from tests.conftest import ArrayWindow as Win
from tests.conftest import RunningServer
from tests.test_websocket import assert_tiles, blocks_of

# Streamed-vs-whole floors for the untrained tiny preset at the server's default context
# (docs/fidelity.md has the measured table; random weights mix globally, so these are low).
TINY_MIN_ARGMAX_AGREEMENT = 0.85
TINY_MIN_HIDDEN_COSINE = 0.99


@pytest.fixture(scope="module")
def analyser() -> Wav2Vec2Analyser:
    return Wav2Vec2Analyser(
        ensure_artifact("tiny-random", "fp32", progress=False).folder, threads=1
    )


def windows_of(audio: np.ndarray, chunk: int = 16000, left: int = 8000) -> list:
    chunker = Chunker(chunk, left)
    return chunker.push(audio) + chunker.finish()


def test_batched_results_equal_one_by_one(analyser: Wav2Vec2Analyser) -> None:
    rng = np.random.default_rng(3)
    windows = [
        Win(rng.standard_normal(24000).astype(np.float32) * 0.1, 8000, 24000) for _ in range(3)
    ]
    windows.insert(1, Win(rng.standard_normal(9000).astype(np.float32) * 0.1, 0, 9000))
    together = analyser.analyse(windows)
    for window, batched in zip(windows, together):
        (alone,) = analyser.analyse([window])
        assert batched.tokens == alone.tokens
        np.testing.assert_allclose(batched.embedding, alone.embedding, atol=1e-4)


def test_chunks_hold_their_own_frames_only(analyser: Wav2Vec2Analyser) -> None:
    audio = synthetic_audio(3.3)
    results = analyser.analyse(windows_of(audio))
    firsts = [r.first_frame for r in results]
    counts = [len(r.tokens) for r in results]
    assert firsts == list(np.cumsum([0] + counts[:-1]))
    assert sum(counts) == frames_in_window(len(audio))


def test_embedding_round_trip(analyser: Wav2Vec2Analyser) -> None:
    (result,) = analyser.analyse([Win(synthetic_audio(1.0), 0, 16000)])
    field = result.to_event()["wav2vec2"]["embedding"]
    assert field["dim"] == 64 and field["dtype"] == "float16"
    np.testing.assert_allclose(decode_embedding(field), result.embedding, rtol=1e-3, atol=1e-3)


def test_streaming_agrees_with_the_whole_utterance_above_the_floor(
    analyser: Wav2Vec2Analyser,
) -> None:
    (row,) = measure(analyser, synthetic_audio(8.0), chunk_seconds=1.0, contexts=[1.0])
    assert row["ctc_argmax_agreement"] >= TINY_MIN_ARGMAX_AGREEMENT
    assert row["hidden_cosine_mean"] >= TINY_MIN_HIDDEN_COSINE


def test_a_classification_checkpoint_gives_top_labels(tmp_path: Path) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    from models.presets import TINY_CONFIG

    labels = ["speech", "music", "noise"]
    config = Wav2Vec2Config(
        **TINY_CONFIG,
        num_labels=3,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    config.architectures = ["Wav2Vec2ForSequenceClassification"]
    Wav2Vec2ForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    artifact = ensure_artifact(
        str(tmp_path / "clf"), "fp32", cache_dir=tmp_path / "cache", progress=False
    )
    clf = Wav2Vec2Analyser(artifact.folder, threads=1, top_k=2)
    (result,) = clf.analyse([Win(synthetic_audio(1.5), 8000, 24000)])
    top = result.to_event()["wav2vec2"]["labels"]
    assert len(top) == 2 and {t["label"] for t in top} <= set(labels)
    assert top[0]["score"] >= top[1]["score"] and clf.ctc_vocabulary is None
    assert "ctc" not in result.to_event()


# --- through the server ------------------------------------------------------------------------


async def stream_f32(server: RunningServer, audio: np.ndarray, **config: object):
    client = StreamClient(
        server.ws, 16000, 1, Encoding.PCM_F32LE, config={"when_behind": "wait", **config}
    )
    return await client.run(blocks_of(audio[:, None], 320), realtime=False)


async def test_server_frames_and_transcript_match_offline_chunked_decoding(
    server: RunningServer, analyser: Wav2Vec2Analyser
) -> None:
    audio = synthetic_audio(3.3)
    result = await stream_f32(server, audio, chunk_seconds=1.0, left_context_seconds=0.5)
    assert result.ready["analysers"] == ["dsp", "wav2vec2"] and result.ready["trained"] is False
    assert_tiles(result, 3.3)
    frames = [e["wav2vec2"]["frames"] for e in result.analysis]
    assert [f["start"] for f in frames] == list(np.cumsum([0] + [f["count"] for f in frames[:-1]]))
    assert sum(f["count"] for f in frames) == frames_in_window(len(audio))

    # The same chunks decoded here must give the server's transcript, chunk by chunk. (The
    # server runs int8, this fp32: compare texts only where the tokens agree exactly.)
    offline = analyser.analyse(windows_of(audio, 16000, 8000))
    stitcher = TranscriptStitcher(CtcVocabulary.from_tokens(*analyser.ctc_vocabulary))
    finals = []
    for i, (event, mine) in enumerate(zip(result.analysis, offline)):
        ends = [round(t["at"] / 0.02) for t in event.get("turns", []) if t["speech"] == "stopped"]
        update = stitcher.push(mine.first_frame, mine.tokens, ends, last=i == len(offline) - 1)
        # (`finals` too, where two turns ended in the chunk; `words` where some became final)
        assert {"text", "partial", "final"} <= set(event["transcript"])
        assert set(event["transcript"]) <= {"text", "partial", "final", "finals", "words"}
        finals.append(update.final)
    server_finals = [e["transcript"]["final"] for e in result.analysis]
    assert [f is None for f in server_finals] == [f is None for f in finals]


async def test_concurrent_sessions_get_their_own_results(server: RunningServer, speech_wav) -> None:
    speech, rate = sf.read(speech_wav, dtype="float32")
    speech = soxr.resample(speech, rate, 16000).astype(np.float32)[: 16000 * 4]
    tone = synthetic_audio(4.0, seed=9)
    alone = [await stream_f32(server, a, embeddings=True) for a in (speech, tone)]
    together = await asyncio.gather(
        *(stream_f32(server, a, embeddings=True) for a in (speech, tone))
    )
    for solo, mixed in zip(alone, together):
        assert [e["transcript"] for e in solo.analysis] == [e["transcript"] for e in mixed.analysis]
        for a, b in zip(solo.analysis, mixed.analysis):
            np.testing.assert_allclose(
                decode_embedding(a["wav2vec2"]["embedding"]),
                decode_embedding(b["wav2vec2"]["embedding"]),
                atol=2e-3,
            )
    # and the two streams were not mixed up: their embeddings differ
    first = [decode_embedding(e["wav2vec2"]["embedding"]) for e in together[0].analysis]
    second = [decode_embedding(e["wav2vec2"]["embedding"]) for e in together[1].analysis]
    assert not np.allclose(first[1], second[1], atol=1e-2)


async def test_embeddings_are_sent_only_when_asked(server: RunningServer) -> None:
    result = await stream_f32(server, synthetic_audio(1.2))
    assert all("embedding" not in e["wav2vec2"] for e in result.analysis)


def test_int8_runs_each_window_alone_so_sessions_stay_independent() -> None:
    int8 = Wav2Vec2Analyser(
        ensure_artifact("tiny-random", "int8", progress=False).folder, threads=1
    )
    rng = np.random.default_rng(5)
    quiet = Win(rng.standard_normal(24000).astype(np.float32) * 0.01, 8000, 24000)
    loud = Win(rng.standard_normal(24000).astype(np.float32), 8000, 24000)
    (alone,) = int8.analyse([quiet])
    together = int8.analyse([quiet, loud])
    assert together[0].tokens == alone.tokens
    np.testing.assert_array_equal(together[0].embedding, alone.embedding)
