"""The opt-in approximations of the denoising steps (models/audioldm_unet.py) on the tiny preset:
the shallow path is the UNet less its deep layers (its very output, given the same step's deep
feature), each approximation runs the network as it says and stays near the exact clip, and
sessions pass them from the protocol to the generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.audioldm import (
    MEL_HOP,
    VAE_CONTEXT_ROWS,
    VAE_FIRST_ROWS,
    VOCODER_PAD,
    AudioLDM,
    mel_distance,
)
from models.audioldm_components import TINY, TINY_NOTE, random_components
from models.audioldm_unet import UNetSteps, has_shallow_path, shallow_step
from models.generation import GenerationRequest
from tests.session_harness import HeldGenerator, events_until, frames, harness, settle, start


@pytest.fixture(scope="module")
def pipe() -> AudioLDM:
    return AudioLDM(random_components(TINY, 0, "tiny", TINY_NOTE), bf16=False)


def clip(
    pipe: AudioLDM, seed: int = 3, seconds: float = 1.0, **approximations: object
) -> np.ndarray:
    request = GenerationRequest(
        "a low drone", seconds=seconds, steps=6, seed=seed, **approximations
    )
    return np.concatenate([block.audio for block in pipe.generate(request)])


def test_the_shallow_path_with_the_same_steps_deep_feature_is_the_whole_unet(pipe) -> None:
    unet = pipe.c.unet
    assert has_shallow_path(unet)
    steps = UNetSteps(unet, lambda batch: None, pipe._autocast, deep_cache_interval=2)
    x = torch.randn(2, 8, 25, 16, generator=torch.Generator().manual_seed(0))
    embeds = torch.cat([pipe.text_embedding(""), pipe.text_embedding("a low drone")])
    t = torch.tensor(600)
    with torch.no_grad():
        whole = steps(x, t, embeds, step=0)  # a whole step keeps the deep feature
        assert steps._deep is not None and steps._deep.shape[0] == 2
        shallow = shallow_step(unet, x, t, embeds, steps._deep)
        torch.testing.assert_close(shallow, whole, rtol=0, atol=1e-5)
        # At another timestep the reused feature is an approximation: close, not equal.
        later = steps(x, torch.tensor(500), embeds, step=1)
        exact = unet(x, torch.tensor(500), encoder_hidden_states=None, class_labels=embeds).sample
    assert 0 < (later - exact).abs().max() < 0.5 * exact.abs().max()


@pytest.mark.parametrize(
    ("fields", "batches", "deep"),
    [
        ({}, [2] * 6, [True] * 6),
        ({"guidance_until": 0.5}, [2, 2, 2, 1, 1, 1], [True] * 6),
        ({"deep_cache_interval": 2}, [2] * 6, [True, False] * 3),
        ({"deep_cache_interval": 3, "guidance_until": 0.34}, [2, 2, 1, 1, 1, 1],
         [True, False, False] * 2),
    ],
)  # fmt: skip
def test_each_approximation_runs_the_unet_as_it_says(pipe, fields, batches, deep) -> None:
    """Per UNet call: the batch (2 with guidance, 1 without) and whether the deep layers ran."""
    unet, calls = pipe.c.unet, []
    hooks = [
        unet.conv_in.register_forward_pre_hook(lambda m, a: calls.append([len(a[0]), False])),
        unet.mid_block.register_forward_pre_hook(lambda m, a: calls[-1].__setitem__(1, True)),
    ]
    try:
        audio = clip(pipe, **fields)
    finally:
        for hook in hooks:
            hook.remove()
    assert [c[0] for c in calls] == batches and [c[1] for c in calls] == deep
    exact, other_seed = clip(pipe), clip(pipe, seed=4)
    assert mel_distance(audio, exact) < 0.5 * mel_distance(other_seed, exact)


def test_a_progressive_vae_clip_is_the_whole_decodes_but_for_its_first_rows(pipe) -> None:
    """`progressive_vae`: the first rows decoded on their own (with their context), then the
    whole clip; audio whose vocoder blocks see only the whole decode's mel is the same to the
    bit, the first 0.9 s (the first rows and the vocoder's context around them) within the
    stated tolerance."""
    decoded: list[tuple[int, ...]] = []
    hook = pipe.c.vae.decoder.register_forward_pre_hook(
        lambda m, a: decoded.append(tuple(a[0].shape))
    )
    try:
        exact, progressive = clip(pipe, seconds=5.0), clip(pipe, seconds=5.0, progressive_vae=True)
        # A clip too short for rows after the first ones and their context decodes once.
        short = clip(pipe, seconds=1.0, progressive_vae=True)
    finally:
        hook.remove()
    rows = VAE_FIRST_ROWS + VAE_CONTEXT_ROWS
    assert [shape[2] for shape in decoded] == [125, rows, 125, 25] and len(short) == 16_000
    assert len(progressive) == len(exact) == 80_000
    # Vocoder blocks from frame 75 on, with 16 frames of context, read frames 59 on; the first
    # rows are frames 0-43.
    head = (75 + VOCODER_PAD) * MEL_HOP
    assert np.array_equal(progressive[head:], exact[head:])
    assert 0 < np.abs(progressive[:head] - exact[:head]).max() <= 0.02 * np.abs(exact).max()
    assert mel_distance(progressive, exact) < 0.05 * mel_distance(clip(pipe, 4, seconds=5.0), exact)


def test_bad_values_are_refused() -> None:
    for fields in ({"guidance_until": 1.5}, {"guidance_until": -0.1}, {"deep_cache_interval": 0}):
        with pytest.raises(ValueError):
            GenerationRequest("a", **fields)


async def test_sessions_pass_them_from_the_protocol_to_the_generator() -> None:
    """From the session's config, overridden by a `generate`; out of range: invalid_message."""
    held = HeldGenerator()
    generation = {"guidance_until": 0.5, "deep_cache_interval": 2, "progressive_vae": True}
    async with harness(generator=held) as (manager, gate):
        gate.open()
        session = await manager.open(start(config={"generation": generation}))
        await frames(session, 1.0)
        await session.receive_text('{"type": "generate", "deep_cache_interval": 3}')
        await settle(lambda: len(held.waiting) == 1)
        request = held.jobs[0].request
        assert (request.guidance_until, request.deep_cache_interval) == (0.5, 3)
        assert request.progressive_vae
        await session.receive_text(json.dumps({"type": "generate", "guidance_until": 2}))
        error = (await events_until(session, "error"))[-1]
    assert error["code"] == "invalid_message" and "guidance_until" in error["message"]
