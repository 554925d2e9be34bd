"""The shipped `tiny` model (models/weights/tiny-espeak) analyses for real, through a server.

Held-out sentences spoken by held-out espeak-ng voices (never seen in training) are streamed as
44.1 kHz stereo over WebSocket at the default chunk and context settings; the final transcript
must hold most of the sentence's words. A word-level threshold, not an exact match: the model is
small and the voices are new to it (its measured error rates are in its model card).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import soxr

from clients.stream_client import StreamClient
from models.training.evaluate import heldout_clips
from stream.core.pcm import Encoding
from tests.conftest import RunningServer, run_server
from tests.test_websocket import blocks_of

MIN_WORD_RECALL = 0.7  # fraction of the sentence's words found in the transcript


@pytest.fixture(scope="module")
def trained_server() -> Iterator[RunningServer]:
    with run_server(analysis_model="tiny") as running:
        yield running


def word_recall(reference: str, transcript: str) -> float:
    heard = transcript.split()
    found = 0
    for word in reference.split():
        if word in heard:
            heard.remove(word)  # each heard word counts once
            found += 1
    return found / len(reference.split())


async def test_ready_says_which_model_and_what_it_is(trained_server: RunningServer) -> None:
    client = StreamClient(trained_server.ws, 16000, 1)
    result = await client.run(blocks_of(np.zeros((1600, 1), np.float32), 1600))
    model = result.ready["models"]["wav2vec2"]
    assert result.ready["trained"] is True and model["trained"] is True
    assert model["model"] == "tiny:int8" and "espeak-ng" in model["note"]


async def test_held_out_speech_at_44k_stereo_is_transcribed(trained_server: RunningServer) -> None:
    clips = heldout_clips(limit=3, processes=1)
    recalls = []
    for text, audio in clips:
        wire = soxr.resample(audio, 16000, 44100).astype(np.float32)
        stereo = np.repeat(wire[:, None], 2, axis=1)
        config = {"when_behind": "wait"}  # sent faster than real time: never skip a chunk
        client = StreamClient(trained_server.ws, 44100, 2, Encoding.PCM_S16LE, config)
        result = await client.run(blocks_of(stereo, 882), realtime=False)
        assert not result.errors and result.end is not None
        assert result.finals, f"no final transcript for {text!r}"
        recalls.append(word_recall(text, result.transcript))
    assert min(recalls) >= MIN_WORD_RECALL, list(zip([t for t, _ in clips], recalls))
