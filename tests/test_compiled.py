"""The UNet and vocoder compiled ahead of time (models/audioldm_compiled.py), on the tiny preset:
packages made once in a child process and found by later ones, as close to the fp32 networks as
the eager bf16 loop, eager for lengths not compiled, and through a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.stream_client import StreamClient
from models import audioldm_compiled as aot
from models.audioldm import AudioLDM, clip_shapes, mel_distance
from models.audioldm_components import AudioLDMComponents, load_generator
from models.audioldm_unet import deep_feature
from models.generation import GenerationRequest
from stream.core.audio.pcm import Encoding
from stream.engines.worker import load_pipeline
from tests.conftest import run_server

SECONDS = 1.0  # the compiled clip length: 25 latent rows, vocoder blocks of 41, 82, 41 frames
UNET = aot.Shape("unet", 2, 25)
# Compiled here: the UNet, and the vocoder's first block (every clip's: 41 frames) but not its
# second (82), to keep the test short (a package of the tiny preset takes about 25 s).
COMPILED = [UNET, aot.Shape("vocoder", 1, 41)]


def clip(
    pipeline: AudioLDM, seconds: float = SECONDS, **approximations: object
) -> tuple[np.ndarray, str]:
    """The clip's audio, and how its UNet and vocoder ran."""
    request = GenerationRequest("a low drone", seconds=seconds, steps=4, seed=3, **approximations)
    blocks = list(pipeline.generate(request))
    timings = blocks[-1].timings
    return np.concatenate([b.audio for b in blocks]), f"{timings['unet']}, {timings['vocoder']}"


@pytest.fixture(scope="module")
def components() -> AudioLDMComponents:
    return load_generator("tiny")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, components: AudioLDMComponents) -> Path:
    """A cache with packages for a guided 1 s clip (COMPILED), made the way the server makes
    them: by child processes (`Compiler`), here waited for."""
    folder = tmp_path_factory.mktemp("compiled")
    compiled = aot.CompiledNetworks(components, True, folder)
    shapes = clip_shapes(SECONDS, compiled.row)
    assert shapes[0] == UNET and [s.length for s in shapes[1:]] == [41, 82, 41]
    # One child per package, side by side: on two cores 35 s instead of 50 one after the other.
    compilers = [aot.Compiler("tiny", [shape], folder, bf16=True) for shape in COMPILED]
    assert [compiler.process.wait(300) for compiler in compilers] == [0, 0]
    assert compiled.missing(shapes) == [aot.Shape("vocoder", 1, 82)]
    return folder


def test_a_compiled_clip_is_as_close_to_fp32_as_the_eager_one(
    components: AudioLDMComponents, cache: Path
) -> None:
    fp32, how = clip(AudioLDM(components, bf16=False))
    assert how == "eager, eager"
    eager, _ = clip(AudioLDM(components, bf16=True))
    pipeline = AudioLDM(components, bf16=True)
    pipeline.compiled = aot.CompiledNetworks(components, True, cache)
    compiled, how = clip(pipeline)
    assert how == "compiled, partly compiled"
    assert compiled.shape == eager.shape
    bf16_error = mel_distance(eager, fp32)
    assert 0 < mel_distance(compiled, fp32) <= 2 * bf16_error + 1e-3
    # Deep-feature reuse: whole steps compiled (their package gives the feature out), the
    # shallow ones between eager; as close to the eager loop's reuse as bf16 is.
    reused, how = clip(pipeline, deep_cache_interval=2)
    assert how == "partly compiled, partly compiled"
    eager_reused, _ = clip(AudioLDM(components, bf16=True), deep_cache_interval=2)
    fp32_reused, _ = clip(AudioLDM(components, bf16=False), deep_cache_interval=2)
    assert mel_distance(reused, fp32_reused) <= 2 * mel_distance(eager_reused, fp32_reused) + 1e-3
    # Guidance on the first half only: no package for one row, so the guided one runs it.
    early, how = clip(pipeline, guidance_until=0.5)
    assert how == "compiled, partly compiled"
    eager_early, _ = clip(AudioLDM(components, bf16=True), guidance_until=0.5)
    fp32_early, _ = clip(AudioLDM(components, bf16=False), guidance_until=0.5)
    assert mel_distance(early, fp32_early) <= 2 * mel_distance(eager_early, fp32_early) + 1e-3
    # 0.5 s has no UNet package: it runs eagerly; of its vocoder blocks, the first (41 frames,
    # as every clip's) has one, the second (43) none.
    other, how = clip(pipeline, seconds=0.5)
    assert how == "eager, partly compiled"
    fp32_other, _ = clip(AudioLDM(components, bf16=False), seconds=0.5)
    eager_other, _ = clip(AudioLDM(components, bf16=True), seconds=0.5)
    assert mel_distance(other, fp32_other) <= 2 * mel_distance(eager_other, fp32_other) + 1e-3


def test_one_step_and_its_deep_feature_are_as_close_to_fp32_as_eager_bf16(
    components: AudioLDMComponents, cache: Path
) -> None:
    compiled = aot.CompiledNetworks(components, True, cache)
    runner = compiled.runner(UNET)
    assert runner is not None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, UNET.length, compiled.bins // compiled.row, generator=generator)
    dim = components.text_encoder.config.projection_dim
    embeds = torch.nn.functional.normalize(torch.randn(2, dim, generator=generator))
    t = torch.tensor(600)

    def eager(bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        kept: list[torch.Tensor] = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with deep_feature(components.unet, kept):
                out = components.unet(x, t, encoder_hidden_states=None, class_labels=embeds)
        return out.sample, kept[0]

    fp32, eager_bf16 = eager(False), eager(True)

    def error(y: tuple[torch.Tensor, torch.Tensor], which: int) -> float:
        return float((y[which].float() - fp32[which]).norm() / fp32[which].norm())

    # The step's output, and the deep feature it gives out (what deep-feature reuse keeps).
    out = runner(x, t, embeds)
    assert error(out, 0) <= 1.5 * error(eager_bf16, 0)
    assert error(out, 1) <= 1.5 * error(eager_bf16, 1) and out[1].shape == fp32[1].shape


def test_packages_are_keyed_by_weights_and_a_damaged_one_runs_eagerly(
    components: AudioLDMComponents, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ours = aot.CompiledNetworks(components, True, tmp_path)
    other = aot.CompiledNetworks(load_generator("tiny", seed=1), True, tmp_path)
    assert ours.path(UNET) != other.path(UNET)
    assert ours.path(UNET) != ours.path(aot.Shape("unet", 1, 25))
    assert ours.path(UNET) != aot.CompiledNetworks(components, False, tmp_path).path(UNET)
    assert aot.Shape.parse(str(UNET)) == UNET
    ours.folder.mkdir(parents=True)
    ours.path(UNET).write_bytes(b"not a package")
    assert ours.runner(UNET) is None
    assert "did not load" in caplog.text


def test_the_loader_compiles_what_is_missing_in_the_background(tmp_path: Path) -> None:
    pipeline, _ = load_pipeline(
        "tiny", None, compile_mode="on", compile_seconds=(0.5,), cache_dir=str(tmp_path)
    )
    assert isinstance(pipeline, AudioLDM) and pipeline.compiled is not None
    background = pipeline.compiled.background
    assert background is not None and not background.done()
    background.stop()
    assert background.done()
    # `auto` leaves a small UNet (tiny's: 1M parameters) eager: no package, nothing started.
    pipeline, _ = load_pipeline("tiny", None, compile_mode="auto", compile_seconds=(0.5,))
    assert isinstance(pipeline, AudioLDM) and pipeline.compiled is None


@pytest.fixture()
def compiled_server(cache: Path) -> Iterator[str]:
    # bf16 on, as the fixture's packages are: `auto` would run fp32 on a CPU without bf16
    # (AVX2-only machines), and fp32 clips have no package.
    settings = {
        "generation_compile": "on", "generation_compile_seconds": [SECONDS],
        "generation_bf16": "on",
    }  # fmt: skip
    with run_server(generator="tiny", analysis_model="none", cache_dir=str(cache),
                    **settings) as running:  # fmt: skip
        yield running.ws


async def test_the_server_makes_clips_with_the_compiled_unet(compiled_server: str) -> None:
    client = StreamClient(compiled_server, 16_000, 1, Encoding.PCM_S16LE, config={})
    finished = asyncio.Queue[str]()

    def on_event(event: dict) -> None:
        if event["type"].startswith("generation."):
            finished.put_nowait(event["type"])

    client.on_event = on_event

    async def quiet() -> AsyncIterator[np.ndarray]:
        """A 0.1 s frame opens the session; then two requests, one after the other (a newer
        request would supersede one still waiting)."""
        yield np.zeros(1600, np.float32)
        while not client.connected:
            await asyncio.sleep(0.01)
        for seconds in (SECONDS, 0.5):
            await client.send_control(
                {"type": "generate", "prompt": "drone", "seconds": seconds, "steps": 3}
            )
            while (kind := await asyncio.wait_for(finished.get(), 30)) != "generation.done":
                assert kind != "generation.failed"

    result = await client.run(quiet(), realtime=True)
    done = [e for e in result.events if e["type"] == "generation.done"]
    how = [(e["timings"]["unet"], e["timings"]["vocoder"]) for e in done]
    assert how == [("compiled", "partly compiled"), ("eager", "partly compiled")]
    assert len(result.clip(done[0]["id"])) == 16_000
