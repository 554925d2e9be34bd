"""AudioLDM's five components, and the generator presets that provide them.

- `tiny`: AudioLDM's real geometry (8 latent channels, VAE x4, 64 mel bins, vocoder hop 160, CLAP
  text embedding into the UNet's class embedding) at small widths with seeded random weights and
  a byte-level tokenizer built in memory: no download, about a second per clip. Its audio is
  noise-like: it proves the plumbing, not the music. Tests and offline runs use it.
- `s-full`: `cvssp/audioldm-s-full-v2`, the trained AudioLDM-S, from the Hugging Face cache (or the
  hub when downloads are allowed) or a local folder in the diffusers layout.
- `s-random`: the AudioLDM-S architecture (UNet 185M, VAE 55M, HiFi-GAN 55M, CLAP text 125M) with
  seeded random weights: the trained model's compute, for benchmarks.
- `auto`: `s-full` when it is available, else `tiny` (with the reason, for a loud warning).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

S_FULL_HUB_ID = "cvssp/audioldm-s-full-v2"
GENERATOR_PRESETS = ("tiny", "s-full", "s-random", "auto")
TINY_NOTE = (
    "built-in tiny generator: AudioLDM's geometry with random weights; its audio is noise-like "
    "and only proves the plumbing (use s-full, or a local AudioLDM folder, for real audio)"
)
S_RANDOM_NOTE = "AudioLDM-S architecture with random weights: for benchmarks (noise-like audio)"
# AudioLDM's training noise schedule (its scheduler/scheduler_config.json).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}
SCHEDULERS = ("dpm++", "ddim")


@dataclass
class AudioLDMComponents:
    tokenizer: Any  # a RobertaTokenizer
    text_encoder: torch.nn.Module  # ClapTextModelWithProjection
    unet: torch.nn.Module  # UNet2DConditionModel
    vae: torch.nn.Module  # AutoencoderKL
    vocoder: torch.nn.Module  # SpeechT5HifiGan
    scheduler_config: dict[str, Any]
    name: str = ""
    trained: bool = False
    note: str = ""


def make_scheduler(config: dict[str, Any], kind: str) -> Any:
    """A fresh scheduler (they hold per-run state): DPM-Solver++ (2nd order) or DDIM."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if kind == "dpm++":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2
        )
    if kind == "ddim":
        return DDIMScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {kind!r}; one of {', '.join(SCHEDULERS)}")


def byte_level_tokenizer(max_length: int = 77) -> Any:
    """A RoBERTa-style byte-level tokenizer with no merges: every UTF-8 byte is a token. It needs
    no download; the random presets use it (their text encoders are untrained anyway)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


@dataclass(frozen=True)
class Architecture:
    text: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    vocoder: dict[str, Any]


TINY = Architecture(
    text={
        "vocab_size": 261, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 80, "projection_dim": 32,
    },
    unet={
        "sample_size": 32, "in_channels": 8, "out_channels": 8, "layers_per_block": 1,
        "block_out_channels": (32, 64), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": (32, 64),
        "attention_head_dim": 8, "norm_num_groups": 8, "class_embed_type": "simple_projection",
        "projection_class_embeddings_input_dim": 32, "class_embeddings_concat": True,
    },
    vae={
        "in_channels": 1, "out_channels": 1, "latent_channels": 8, "layers_per_block": 1,
        "block_out_channels": (16, 32, 32), "norm_num_groups": 8,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
    },
    vocoder={
        "model_in_dim": 64, "sampling_rate": 16000, "upsample_initial_channel": 64,
        "upsample_rates": [5, 4, 2, 2, 2], "upsample_kernel_sizes": [10, 8, 4, 4, 4],
        "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3], [1, 3]],
        "normalize_before": False,
    },
)  # fmt: skip

# AudioLDM-S (cvssp/audioldm-s-full-v2), from diffusers' conversion script defaults.
AUDIOLDM_S = Architecture(
    text={
        "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 514, "projection_dim": 512,
    },
    unet={
        "sample_size": 128, "in_channels": 8, "out_channels": 8, "layers_per_block": 2,
        "block_out_channels": (128, 256, 384, 640),
        "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        "up_block_types": ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        "cross_attention_dim": (128, 256, 384, 640), "attention_head_dim": 8,
        "class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 512,
        "class_embeddings_concat": True,
    },
    vae={
        "in_channels": 1, "out_channels": 1, "latent_channels": 8, "layers_per_block": 2,
        "block_out_channels": (128, 256, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
    },
    vocoder={
        "model_in_dim": 64, "sampling_rate": 16000, "upsample_initial_channel": 1024,
        "upsample_rates": [5, 4, 2, 2, 2], "upsample_kernel_sizes": [16, 16, 8, 4, 4],
        "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5]] * 3,
        "normalize_before": False,
    },
)  # fmt: skip


def random_components(arch: Architecture, seed: int, name: str, note: str) -> AudioLDMComponents:
    """The architecture with weights drawn from `seed`: the same seed gives the same model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    torch.manual_seed(seed)
    text = ClapTextModelWithProjection(ClapTextConfig(**arch.text))
    unet = UNet2DConditionModel(**arch.unet)
    vae = AutoencoderKL(**arch.vae)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**arch.vocoder))
    # transformers draws conv weights from N(0, 0.01): through five upsampling stages the random
    # vocoder's output is ~1e-10, silence. PyTorch's own (Kaiming) init gives audible noise.
    for module in vocoder.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            module.reset_parameters()
    return AudioLDMComponents(
        byte_level_tokenizer(), _eval(text), _eval(unet), _eval(vae), _eval(vocoder),
        dict(SCHEDULER_CONFIG), name=name, trained=False, note=note,
    )  # fmt: skip


def load_components(folder: str | Path, name: str) -> AudioLDMComponents:
    """A trained AudioLDM in the diffusers layout (model_index.json + one folder per part)."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import ClapTextModelWithProjection, RobertaTokenizer, SpeechT5HifiGan

    root = Path(folder)
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    pickled = [part for part in PARTS if not any((root / part).glob("*.safetensors"))]
    if pickled:
        log.warning(
            "AudioLDM %s: %s stored only as pickles; loading them with torch.load(weights_only="
            "True). Prefer safetensors copies.", name, ", ".join(pickled),
        )  # fmt: skip
    return AudioLDMComponents(
        tokenizer=RobertaTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=_eval(ClapTextModelWithProjection.from_pretrained(root / "text_encoder")),
        unet=_eval(UNet2DConditionModel.from_pretrained(root / "unet")),
        vae=_eval(AutoencoderKL.from_pretrained(root / "vae")),
        vocoder=_eval(SpeechT5HifiGan.from_pretrained(root / "vocoder")),
        scheduler_config=stated_scheduler_settings(scheduler),
        name=name,
        trained=True,
    )


def stated_scheduler_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint's scheduler_config.json states, for make_scheduler: where it is
    silent, the sampler's own defaults apply (diffusers' defaults of DPM-Solver++ or DDIM).

    diffusers writes every setting it knows when it saves a config, its class's defaults
    included: a 2023 AudioLDM config re-saved by diffusers 0.42 gains `timestep_spacing:
    "leading"` (DDIMScheduler's default), which would move DPM-Solver++'s two steps from [999,
    500] to [667, 334]. The file cannot tell a chosen value from a written default, so a value
    equal to the default of the class it names (`_class_name`) is taken as the latter; every
    other value is honoured as stated. A config naming no class diffusers knows is taken whole.
    """
    import diffusers

    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None or not hasattr(cls, "from_config"):
        return settings
    defaults = inspect.signature(cls.__init__).parameters
    return {
        k: v
        for k, v in settings.items()
        if k not in defaults or _json_value(defaults[k].default) != v
    }


def _json_value(value: Any) -> Any:
    """A default as a JSON file holds it (tuples are lists there)."""
    return list(value) if isinstance(value, tuple) else value


def _eval(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


# What a diffusers-layout AudioLDM snapshot needs besides the weights, which are fetched per part
# in the format the repository holds them (models.presets.weight_files).
_SNAPSHOT_PATTERNS = ("model_index.json", "*/*.json", "*/*.txt")
PARTS = ("unet", "vae", "text_encoder", "vocoder")


def _is_audioldm_folder(folder: Path) -> bool:
    return (folder / "scheduler" / "scheduler_config.json").is_file() and all(
        any((folder / part).glob("*.safetensors")) or any((folder / part).glob("*.bin"))
        for part in PARTS
    )


def load_generator(name: str, seed: int = 0) -> AudioLDMComponents:
    """A preset (GENERATOR_PRESETS), a local diffusers-layout folder, or a hub id.

    `auto` is s-full when cached (or downloadable), else tiny, its note saying why. Raises
    ModelLoadError with a fix-it message otherwise.
    """
    from models.presets import ModelLoadError

    if name == "tiny":
        return random_components(TINY, seed, "tiny", TINY_NOTE)
    if name == "s-random":
        return random_components(AUDIOLDM_S, seed, "s-random", S_RANDOM_NOTE)
    try:
        folder = generator_folder(name)
    except ModelLoadError as exc:
        if name != "auto":
            raise
        tiny = random_components(TINY, seed, "tiny", TINY_NOTE)
        tiny.note = f"{TINY_NOTE}; auto chose it because {exc}"
        return tiny
    return load_components(folder, "s-full" if name in ("s-full", "auto") else name)


def generator_folder(name: str) -> Path:
    """Where the trained generator `name` (s-full, auto, a folder or a hub id) lives, without
    loading it: the server checks this before it starts. Raises ModelLoadError."""
    from models.presets import ModelLoadError, locate_hub_checkpoint

    if name in ("tiny", "s-random"):
        raise ValueError(f"{name} is built in: it has no folder")
    if name not in ("s-full", "auto") and Path(name).expanduser().exists():
        folder = Path(name).expanduser()
        if not _is_audioldm_folder(folder):
            raise ModelLoadError(f"{name!r} is not an AudioLDM folder in the diffusers layout")
        return folder
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(
            f"generator folder {name!r} does not exist (presets: {', '.join(GENERATOR_PRESETS)})"
        )
    hub_id = S_FULL_HUB_ID if name in ("s-full", "auto") else name
    return locate_hub_checkpoint(
        hub_id, patterns=_SNAPSHOT_PATTERNS, complete=_is_audioldm_folder, parts=PARTS
    )


def save_components(components: AudioLDMComponents, folder: str | Path) -> Path:
    """Write the components in the diffusers layout that `load_components` reads."""
    import json

    root = Path(folder)
    for part in PARTS:
        getattr(components, part).save_pretrained(root / part)
    components.tokenizer.save_pretrained(root / "tokenizer")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "DDIMScheduler", **components.scheduler_config}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=1))
    index = {"_class_name": "AudioLDMPipeline", "_note": "written by grym-stream"}
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    return root
