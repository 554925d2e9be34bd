"""Checkpoint folders laid out as the libraries that write them lay them out, built offline in the
test run, loaded the way a user loads them (through a real server where the server is the
point): the feature extractor's settings wherever transformers put them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from clients.stream_client import StreamClient
from models.presets import BASE_960H_VOCAB, resolve_model
from models.wav2vec2_checkpoint import load_torch_model
from tests.conftest import run_server, tone
from tests.test_websocket import blocks_of


def transformers_5_folder(folder: Path, do_normalize: bool) -> Path:
    """A wav2vec2 CTC folder as transformers >= 5 saves model and processor: the feature
    extractor's settings inside processor_config.json, no preprocessor_config.json."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    load_torch_model(resolve_model("tiny-random")).model.save_pretrained(folder)
    vocab = folder / "vocab.json"
    vocab.write_text(json.dumps({token: i for i, token in enumerate(BASE_960H_VOCAB)}))
    processor = Wav2Vec2Processor(
        feature_extractor=Wav2Vec2FeatureExtractor(do_normalize=do_normalize),
        tokenizer=Wav2Vec2CTCTokenizer(str(vocab)),
    )
    processor.save_pretrained(folder)
    return folder


def test_transformers_5_writes_no_preprocessor_config(tmp_path: Path) -> None:
    """The layout the loader must read: if transformers changes it again, this says so."""
    folder = transformers_5_folder(tmp_path / "t5", do_normalize=False)
    assert not (folder / "preprocessor_config.json").exists()
    settings = json.loads((folder / "processor_config.json").read_text())["feature_extractor"]
    assert settings["do_normalize"] is False


@pytest.mark.parametrize(
    ("files", "expected", "source"),
    [
        ({"processor_config.json": {"feature_extractor": {"do_normalize": False}}}, False,
         "processor_config.json"),
        ({"preprocessor_config.json": {"do_normalize": False}}, False, "preprocessor_config.json"),
        # Both: transformers 5's file is the newer, so it wins.
        ({"processor_config.json": {"feature_extractor": {"do_normalize": True}},
          "preprocessor_config.json": {"do_normalize": False}}, True, "processor_config.json"),
        # A processor file without feature extractor settings says nothing about them.
        ({"processor_config.json": {"processor_class": "Wav2Vec2Processor"},
          "preprocessor_config.json": {"do_normalize": False}}, False,
         "preprocessor_config.json"),
        ({}, True, "default: the folder has no feature extractor settings"),
    ],
)  # fmt: skip
def test_the_feature_extractor_settings_come_from_either_file(
    tmp_path: Path, files: dict, expected: bool, source: str
) -> None:
    folder = tmp_path / "ckpt"
    load_torch_model(resolve_model("tiny-random")).model.save_pretrained(folder)
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    loaded = load_torch_model(resolve_model(str(folder)))
    assert loaded.do_normalize is expected and loaded.normalize_source == source
    assert loaded.describe()["do_normalize_from"] == source


async def test_a_transformers_5_folder_through_a_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server exports the folder, says at start-up that its input is not normalised and
    which file said so, and analyses a stream with it."""
    folder = transformers_5_folder(tmp_path / "t5", do_normalize=False)
    caplog.set_level(logging.INFO, logger="stream.engines.loading")
    with run_server(analysis_model=str(folder)) as server:
        client = StreamClient(server.ws, 16000, 1, config={"when_behind": "wait"})
        audio = tone(3.0, 16000)
        result = await client.run(blocks_of(audio, 1600), realtime=False)
    said = [r.getMessage() for r in caplog.records if "do_normalize from" in r.getMessage()]
    assert said and "not normalised (do_normalize from processor_config.json)" in said[0], said
    assert not result.errors and result.end is not None
    assert result.analysis and all("transcript" in event for event in result.analysis)
    assert result.end["samples_received"] == len(audio)
