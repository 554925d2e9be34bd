"""Checkpoint folders laid out as the libraries that write them lay them out, built offline in the
test run, loaded the way a user loads them (through a real server where the server is the
point): the feature extractor's settings wherever transformers put them; weights in whichever
format each part of a repository holds them, fetched and loaded per part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.stream_client import StreamClient
from models.audioldm_components import PARTS
from models.presets import BASE_960H_VOCAB, resolve_model, weight_files
from models.wav2vec2_checkpoint import load_torch_model
from tests.conftest import run_server, tone
from tests.test_websocket import blocks_of

ROOT = Path(__file__).resolve().parent.parent


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


def test_each_part_is_fetched_in_the_format_the_repository_holds() -> None:
    """Safetensors where a part has them, its pickles where it has only those: a generator
    whose parts are pickles in subfolders must not come down without its weights."""
    assert weight_files(WAV2VEC2_BASE_960H) == (["pytorch_model.bin"], ["(top level)"])
    with_safetensors = [*WAV2VEC2_BASE_960H, "model.safetensors"]
    assert weight_files(with_safetensors) == (["model.safetensors"], [])
    chosen, pickled = weight_files(AUDIOLDM_2023, PARTS)
    assert sorted(chosen) == sorted(f for f in AUDIOLDM_2023 if f.endswith(".bin"))
    assert pickled == list(PARTS)
    variants = [
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.bin",
    ]
    mixed = [*AUDIOLDM_2023, *variants, "unet/diffusion_pytorch_model.safetensors"]
    chosen, pickled = weight_files(mixed, PARTS)
    assert "unet/diffusion_pytorch_model.safetensors" in chosen
    assert "unet/diffusion_pytorch_model.bin" not in chosen and "unet" not in pickled
    assert not set(variants) & set(chosen)  # variants only where a part has nothing else


def as_2023_layout(folder: Path) -> None:
    """Turn a folder save_components wrote into the 2023 diffusers layout: each part's weights
    as the pickle it held then, the tokenizer as vocab.json + merges.txt (no tokenizer.json)."""
    import torch
    from safetensors.torch import load_file

    for part in PARTS:
        (weights,) = (folder / part).glob("*.safetensors")
        name = "diffusion_pytorch_model.bin" if part in ("unet", "vae") else "pytorch_model.bin"
        torch.save(load_file(weights), folder / part / name)
        weights.unlink()
    fast = folder / "tokenizer" / "tokenizer.json"
    bpe = json.loads(fast.read_text())["model"]
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    merges = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]]
    (folder / "tokenizer" / "merges.txt").write_text("\n".join(merges) + "\n")
    fast.unlink()


def hub_cache(root: Path, repo_id: str, files: dict[str, bytes] | None = None) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out (models--org--name/refs/main
    naming a snapshot folder), its commit hash derived from what `files` holds; returns the
    snapshot folder, to be filled where `files` is None."""
    digest = hashlib.sha1(json.dumps(sorted(files or {}), default=str).encode())
    for content in (files or {}).values():
        digest.update(content)
    commit = digest.hexdigest()
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in (files or {}).items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(content)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def audioldm_2023_cache(root: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """cvssp/audioldm-s-full-v2 in the cache, offline, in the 2023 layout (the tiny geometry,
    seeded random weights); returns the components it was written from."""
    from models.audioldm_components import TINY, random_components, save_components

    original = random_components(TINY, 3, "tiny", "")
    snapshot = hub_cache(root, "cvssp/audioldm-s-full-v2")
    save_components(original, snapshot)
    as_2023_layout(snapshot)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return original


def test_a_cached_generator_of_pickles_loads_and_generates_as_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`s-full` from a cache whose snapshot holds every part as a pickle and the tokenizer as
    vocab.json + merges.txt (the 2023 layout): it loads, says which parts are pickles, and
    makes the audio the same weights make from the same prompt."""
    from models.audioldm import AudioLDM
    from models.audioldm_components import load_generator
    from models.generation import GenerationRequest

    original = audioldm_2023_cache(tmp_path / "hub", monkeypatch)
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


async def test_the_cached_generator_of_pickles_through_a_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--generator s-full` from that cache: the server's worker process loads it and a clip
    comes back with `generation.done`."""
    audioldm_2023_cache(tmp_path / "hub", monkeypatch)
    config = {"generation": {"triggers": ["interval"], "interval_seconds": 2.0, "seconds": 1.0,
                             "steps": 2, "seed": 1}}  # fmt: skip
    with run_server(generator="s-full", analysis_model="none") as server:
        client = StreamClient(server.ws, 16000, 1, config=config)
        result = await client.run(blocks_of(tone(3.0, 16000), 1600), realtime=False)
    assert result.ready["generator"]["model"] == "s-full" and result.ready["generator"]["trained"]
    kinds = [e["type"] for e in result.generation(1)]
    assert kinds[0] == "generation.queued" and kinds[-1] == "generation.done", result.events
    clip = result.clip(1)
    assert result.generation(1)[-1]["samples"] == len(clip) > 0 and np.isfinite(clip).all()


@pytest.mark.parametrize("weights_format", ["pickle", "safetensors"])
async def test_wav2vec2_base_960h_cached_through_a_server(
    weights_format: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`--analysis-model base` from a cache holding the repository's own layout with only its
    pickle, or only a safetensors copy (its weights random here, the tiny geometry): loaded
    (a pickle through the weights-only loader, with a warning), exported, analysing a
    stream."""
    import io

    import torch
    from safetensors.torch import save

    model = load_torch_model(resolve_model("tiny-random")).model
    model.config.architectures = ["Wav2Vec2ForCTC"]  # as the published config.json says
    if weights_format == "pickle":
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        weights = {"pytorch_model.bin": buffer.getvalue()}
    else:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        weights = {"model.safetensors": save(state, metadata={"format": "pt"})}
    vocab = {token: i for i, token in enumerate(BASE_960H_VOCAB)}
    files = {
        "config.json": model.config.to_json_string().encode(),
        **weights,
        "preprocessor_config.json": json.dumps({"do_normalize": True, "sampling_rate": 16000,
                                                "feature_size": 1}).encode(),
        "vocab.json": json.dumps(vocab).encode(),
        "tokenizer_config.json": json.dumps({"word_delimiter_token": "|"}).encode(),
        "special_tokens_map.json": b"{}",
    }  # fmt: skip
    hub_cache(tmp_path / "hub", "facebook/wav2vec2-base-960h", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("GRYM_CACHE_DIR", str(tmp_path / "artifacts"))  # exported in this run
    caplog.set_level(logging.INFO)
    with run_server(analysis_model="base") as server:
        client = StreamClient(server.ws, 16000, 1, config={"when_behind": "wait"})
        result = await client.run(blocks_of(tone(3.0, 16000), 1600), realtime=False)
    messages = [r.getMessage() for r in caplog.records]
    pickle_warned = any("only a pickle checkpoint" in m for m in messages)
    assert pickle_warned == (weights_format == "pickle"), messages
    assert any("input normalised" in m and "preprocessor_config.json" in m for m in messages)
    assert not result.errors and result.analysis and result.end["samples_received"] == 48000
    assert all("transcript" in event for event in result.analysis), result.analysis[0]


def test_a_generator_of_pickles_downloads_on_its_first_online_start(tmp_path: Path) -> None:
    """The hub (a stand-in on 127.0.0.1, tests/local_hub.py) holds cvssp/audioldm-s-full-v2 in
    the 2023 layout, every part a pickle; the cache is empty and downloads are allowed. The
    first start fetches each part's pickle, and nothing the parts do not need, and loads it."""
    from models.audioldm_components import TINY, random_components, save_components
    from tests.local_hub import LocalHub

    published = save_components(random_components(TINY, 3, "tiny", ""), tmp_path / "published")
    as_2023_layout(published)
    files = {
        str(f.relative_to(published)): f.read_bytes() for f in published.rglob("*") if f.is_file()
    }
    files["unet/diffusion_pytorch_model.fp16.bin"] = b"not wanted"  # a variant nobody asked for
    code = (
        "from models.audioldm_components import load_generator\n"
        "c = load_generator('s-full')\n"
        "print('loaded', c.name, c.trained)\n"
    )
    with LocalHub({"cvssp/audioldm-s-full-v2": files}) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env |= {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"),
                "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
    assert done.returncode == 0 and "loaded s-full True" in done.stdout, done.stderr[-3000:]
    pickles = {f"{part}/{name}" for part, name in (
        ("unet", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin"),
        ("text_encoder", "pytorch_model.bin"), ("vocoder", "pytorch_model.bin"))}  # fmt: skip
    assert pickles <= set(hub.fetched), hub.fetched
    assert "unet/diffusion_pytorch_model.fp16.bin" not in hub.fetched
    assert "stored only as pickles" in done.stderr
