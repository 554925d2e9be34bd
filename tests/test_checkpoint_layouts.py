"""Checkpoint folders laid out as the libraries that write them lay them out, built offline in the
test run, loaded the way a user loads them (through a real server where the server is the
point): the feature extractor's settings wherever transformers put them; weights in whichever
format each part of a repository holds them, fetched and loaded per part.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from clients.stream_client import StreamClient
from models.presets import BASE_960H_VOCAB, resolve_model, weight_files
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


# What the hub lists for two repositories, as published (README and git files left out).
WAV2VEC2_BASE_960H = [
    "config.json", "preprocessor_config.json", "special_tokens_map.json", "tokenizer_config.json",
    "vocab.json", "feature_extractor_config.json", "pytorch_model.bin", "tf_model.h5",
    "flax_model.msgpack",
]  # fmt: skip
AUDIOLDM_2023 = [
    "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.bin",
    "vocoder/config.json", "vocoder/pytorch_model.bin",
]  # fmt: skip
AUDIOLDM_PARTS = ("unet", "vae", "text_encoder", "vocoder")


def test_each_part_is_fetched_in_the_format_the_repository_holds() -> None:
    """Safetensors where a part has them, its pickles where it has only those: a generator
    whose parts are pickles in subfolders must not come down without its weights."""
    assert weight_files(WAV2VEC2_BASE_960H) == (["pytorch_model.bin"], ["(top level)"])
    with_safetensors = [*WAV2VEC2_BASE_960H, "model.safetensors"]
    assert weight_files(with_safetensors) == (["model.safetensors"], [])
    chosen, pickled = weight_files(AUDIOLDM_2023, AUDIOLDM_PARTS)
    assert sorted(chosen) == sorted(f for f in AUDIOLDM_2023 if f.endswith(".bin"))
    assert pickled == list(AUDIOLDM_PARTS)
    mixed = [*AUDIOLDM_2023, "unet/diffusion_pytorch_model.safetensors"]
    chosen, pickled = weight_files(mixed, AUDIOLDM_PARTS)
    assert "unet/diffusion_pytorch_model.safetensors" in chosen
    assert "unet/diffusion_pytorch_model.bin" not in chosen and "unet" not in pickled


def pickle_every_part(folder: Path) -> None:
    """Turn each part's safetensors into the pickle the 2023 diffusers layout held."""
    import torch
    from safetensors.torch import load_file

    for part in AUDIOLDM_PARTS:
        (weights,) = (folder / part).glob("*.safetensors")
        name = "diffusion_pytorch_model.bin" if part in ("unet", "vae") else "pytorch_model.bin"
        torch.save(load_file(weights), folder / part / name)
        weights.unlink()


def test_a_cached_generator_of_pickles_loads_and_generates_as_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`--generator s-full` from a Hugging Face cache whose snapshot holds every part as a
    pickle (the 2023 layout): it loads, says which parts are pickles, and makes the audio the
    same weights make."""
    from models.audioldm import AudioLDM
    from models.audioldm_components import TINY, load_generator, random_components, save_components
    from models.generation import GenerationRequest

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--cvssp--audioldm-s-full-v2"
    original = random_components(TINY, 3, "tiny", "")
    snapshot = save_components(original, repo / "snapshots" / commit)
    pickle_every_part(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    caplog.set_level(logging.WARNING, logger="models.audioldm_components")
    loaded = load_generator("s-full")
    assert loaded.trained and loaded.name == "s-full"
    warned = [r.getMessage() for r in caplog.records if "pickles" in r.getMessage()]
    assert len(warned) == 1 and "unet, vae, text_encoder, vocoder" in warned[0], warned
    request = GenerationRequest("rain on a tin roof", seconds=1.0, seed=4, steps=2)
    ours, reference = (
        np.concatenate([c.audio for c in AudioLDM(c, bf16=False).generate(request)])
        for c in (loaded, original)
    )
    np.testing.assert_allclose(ours, reference, atol=1e-6, rtol=0)
