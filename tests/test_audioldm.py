"""The AudioLDM pipeline (models/audioldm.py) on the tiny preset: it matches diffusers'
reference pipeline, vocodes progressively without seams, is seeded, cancels between steps, and
varies audio."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from models.audioldm import MEL_HOP, AudioLDM, _blocks, log_mel
from models.audioldm_components import TINY, TINY_NOTE, make_scheduler, random_components
from models.generation import Callbacks, GenerationCancelled, GenerationRequest


@pytest.fixture(scope="module")
def pipe() -> AudioLDM:
    return AudioLDM(random_components(TINY, 0, "tiny", TINY_NOTE), bf16=False)


def _audio(pipe: AudioLDM, request: GenerationRequest) -> np.ndarray:
    return np.concatenate([block.audio for block in pipe.generate(request)])


def test_matches_diffusers_reference_pipeline(pipe: AudioLDM) -> None:
    with warnings.catch_warnings():  # the reference lives under diffusers' deprecated pipelines
        warnings.simplefilter("ignore")
        from diffusers.pipelines.deprecated.audioldm.pipeline_audioldm import AudioLDMPipeline

        c = pipe.c
        reference = AudioLDMPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
            scheduler=make_scheduler(c.scheduler_config, "ddim"), vocoder=c.vocoder,
        )  # fmt: skip
        reference.set_progress_bar_config(disable=True)
        expected = reference(
            "rain on a tin roof", audio_length_in_s=2.0, num_inference_steps=3,
            guidance_scale=2.5, generator=torch.Generator().manual_seed(7), output_type="np",
        ).audios[0]  # fmt: skip
    ours = _audio(
        pipe,
        GenerationRequest(
            "rain on a tin roof", seconds=2.0, seed=7, steps=3, guidance=2.5, scheduler="ddim"
        ),
    )
    assert ours.shape == expected.shape == (32_000,)
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(ours, expected, atol=1e-4 * scale, rtol=0)


def test_progressive_blocks_tile_the_clip_and_equal_whole_vocoding(pipe: AudioLDM) -> None:
    blocks = list(pipe.generate(GenerationRequest("a", seconds=4.3, seed=1, steps=2)))
    assert len(blocks) >= 3 and blocks[-1].last and not any(b.last for b in blocks[:-1])
    assert [b.index for b in blocks] == list(range(len(blocks)))
    position = 0
    for block in blocks:
        assert block.start == position
        position += len(block.audio)
    assert position == int(4.3 * 16_000)
    # First audio comes before the whole clip is vocoded: the first block is short (0.25 s),
    # and each after it at most twice the one before (made while that one plays).
    sizes = [len(b.audio) for b in blocks]
    assert sizes[0] == 4_000 and all(b <= 2 * a for a, b in zip(sizes, sizes[1:], strict=False))

    mel = torch.randn(430, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = pipe.c.vocoder(mel[None])[0].numpy()
        pieces = [pipe.vocode(mel, a, b) for a, b in _blocks(0, 430)]
    joined = np.concatenate(pieces)
    # (Transposed convolutions leave a few samples past frames x hop; clips are cut anyway.)
    assert len(joined) == 430 * MEL_HOP <= len(whole)
    whole = whole[: len(joined)]
    np.testing.assert_allclose(joined, whole, atol=1e-5 * float(np.abs(whole).max()), rtol=0)


def test_seed_prompt_and_settings_fix_the_audio(pipe: AudioLDM) -> None:
    request = GenerationRequest("slow drums", seconds=1.0, seed=11, steps=3)
    first, again = _audio(pipe, request), _audio(pipe, request)
    np.testing.assert_array_equal(first, again)
    other_seed = _audio(pipe, GenerationRequest("slow drums", seconds=1.0, seed=12, steps=3))
    other_prompt = _audio(pipe, GenerationRequest("fast drums", seconds=1.0, seed=11, steps=3))
    assert not np.allclose(first, other_seed) and not np.allclose(first, other_prompt)


def test_cancel_stops_at_the_next_step(pipe: AudioLDM) -> None:
    steps: list[int] = []
    callbacks = Callbacks(on_step=lambda i, n: steps.append(i), cancelled=lambda: len(steps) >= 2)
    with pytest.raises(GenerationCancelled):
        list(pipe.generate(GenerationRequest("a", seconds=1.0, steps=6), callbacks))
    assert steps == [1, 2]


def test_variation_strength_zero_is_the_source_latent_round_trip(pipe: AudioLDM) -> None:
    t = np.arange(24_000) / 16_000
    source = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    request = GenerationRequest("x", seconds=1.5, seed=0, steps=4, source=source, strength=0.0)
    out = _audio(pipe, request)
    assert out.shape == (24_000,)
    with torch.no_grad():
        latent = pipe.encode_audio(source, 152)  # 1.5 s = 150 frames, rounded up to 4 rows
        mel = pipe.c.vae.decode(latent / pipe.c.vae.config.scaling_factor).sample[0, 0]
        expected = pipe.c.vocoder(mel[None])[0].numpy()[:24_000]
    np.testing.assert_allclose(out, expected, atol=1e-4 * float(np.abs(expected).max()), rtol=0)
    # Some strength: denoising steps run and change the result; the length stays.
    steps: list[int] = []
    varied = np.concatenate(
        [
            b.audio
            for b in pipe.generate(
                GenerationRequest("x", seconds=1.5, steps=4, source=source, strength=0.5),
                Callbacks(on_step=lambda i, n: steps.append(n)),
            )
        ]
    )
    assert steps == [2, 2] and varied.shape == (24_000,) and not np.allclose(varied, out)


def test_log_mel_frames_and_peak_band() -> None:
    t = np.arange(16_000) / 16_000
    mel = log_mel((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    assert mel.shape == (100, 64)
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(513, 64, 0.0, 8000.0, 16_000, "slaney", "slaney")
    centre_bin = int(np.argmax(filters[64]))  # the mel band whose peak is nearest 1 kHz (bin 64)
    assert abs(int(np.argmax(mel[50])) - centre_bin) <= 1
    assert log_mel(np.zeros(16_000, np.float32)).max() == pytest.approx(np.log(1e-5))


def test_text_embeddings_are_cached_per_prompt(pipe: AudioLDM) -> None:
    first = pipe.text_embedding("birdsong")
    assert pipe.text_embedding("birdsong") is first
    assert torch.linalg.vector_norm(first, dim=-1).item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.equal(pipe.text_embedding("thunder"), first)


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ValueError):
        GenerationRequest("a", strength=1.5)
    with pytest.raises(ValueError):
        GenerationRequest("a", steps=0)
    with pytest.raises(ValueError):
        make_scheduler({}, "euler")


def test_a_saved_folder_loads_as_a_trained_generator(pipe: AudioLDM, tmp_path) -> None:
    from models.audioldm_components import load_generator, save_components

    folder = save_components(pipe.c, tmp_path / "audioldm")
    loaded = load_generator(str(folder))
    assert loaded.trained and loaded.name == str(folder)
    request = GenerationRequest("wind", seconds=1.0, seed=4, steps=2)
    np.testing.assert_allclose(
        _audio(AudioLDM(loaded, bf16=False), request), _audio(pipe, request), atol=1e-6, rtol=0
    )


def test_a_scheduler_config_resaved_by_new_diffusers_denoises_as_the_original(
    pipe: AudioLDM, tmp_path
) -> None:
    """diffusers 0.42 writes its class defaults into a config it saves (DDIM's
    `timestep_spacing: "leading"`); the re-saved folder must denoise at the original's
    timesteps, so generate the same audio."""
    from diffusers import DDIMScheduler

    from models.audioldm_components import load_generator, save_components

    folder = save_components(pipe.c, tmp_path / "audioldm")
    DDIMScheduler.from_pretrained(folder / "scheduler").save_pretrained(folder / "scheduler")
    written = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (
        written["timestep_spacing"] == "leading"
        and "timestep_spacing" not in pipe.c.scheduler_config
    )
    loaded = load_generator(str(folder))
    for kind in ("dpm++", "ddim"):
        original, resaved = (
            make_scheduler(c, kind) for c in (pipe.c.scheduler_config, loaded.scheduler_config)
        )
        original.set_timesteps(2)
        resaved.set_timesteps(2)
        assert resaved.timesteps.tolist() == original.timesteps.tolist(), kind
    request = GenerationRequest("wind", seconds=1.0, seed=4, steps=2)
    np.testing.assert_allclose(
        _audio(AudioLDM(loaded, bf16=False), request), _audio(pipe, request), atol=1e-6, rtol=0
    )


def test_a_scheduler_setting_the_checkpoint_chose_is_honoured(pipe: AudioLDM, tmp_path) -> None:
    """A value other than its class's default is the checkpoint's choice: it stands."""
    from diffusers import DPMSolverMultistepScheduler

    from models.audioldm_components import load_generator, save_components

    folder = save_components(pipe.c, tmp_path / "audioldm")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "timestep_spacing": "trailing"}))
    loaded = load_generator(str(folder))
    assert loaded.scheduler_config["timestep_spacing"] == "trailing"
    ours = make_scheduler(loaded.scheduler_config, "dpm++")
    reference = DPMSolverMultistepScheduler.from_config(
        {**pipe.c.scheduler_config, "timestep_spacing": "trailing"},
        algorithm_type="dpmsolver++", solver_order=2,
    )  # fmt: skip
    linspace = make_scheduler(pipe.c.scheduler_config, "dpm++")
    for scheduler in (ours, reference, linspace):
        scheduler.set_timesteps(2)
    assert ours.timesteps.tolist() == reference.timesteps.tolist() != linspace.timesteps.tolist()


def test_auto_falls_back_to_tiny_offline(monkeypatch, tmp_path) -> None:
    from models.audioldm_components import load_generator

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    chosen = load_generator("auto")
    assert chosen.name == "tiny" and not chosen.trained and "auto chose it" in chosen.note
    from models.presets import ModelLoadError

    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_generator("s-full")
    with pytest.raises(ModelLoadError, match="not an AudioLDM folder"):
        load_generator(str(tmp_path))
