"""Which wav2vec2-family checkpoint a model name means, and its cache key, without torch.

`resolve_model` turns a name (a preset, a hub id or a local folder) into a `ModelSpec`. Everything
here stays free of torch and transformers so that the artifact cache can be consulted (and a
cached ONNX file used) without paying for those imports: a hub checkpoint is located in the local
HF cache by `huggingface_hub` alone, a folder is hashed, a random preset's key is a hash of the
config dict written below.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Head = Literal["ctc", "classification", "base"]

BASE_HUB_ID = "facebook/wav2vec2-base-960h"
# The character vocabulary of facebook/wav2vec2-base-960h (vocab.json), id -> token: "<pad>" is
# the CTC blank, "|" separates words. Written out so the random presets decode like the real one.
BASE_960H_VOCAB: tuple[str, ...] = (
    "<pad>", "<s>", "</s>", "<unk>", "|",
    "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "W", "C", "F", "G", "Y",
    "P", "B", "V", "K", "'", "X", "J", "Q", "Z",
)  # fmt: skip

# Shared by every preset: base's conv stack (kernels and strides), so that frame geometry is the
# real one (320-sample hop, 400-sample receptive field), and base's special token ids.
_GEOMETRY: dict[str, Any] = {
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "vocab_size": len(BASE_960H_VOCAB),
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Small enough to build in ~10 ms and export/optimize/quantize in ~2 s. "layer" norm in the feature
# encoder (as in large-lv60 / XLS-R) with the stable-layer-norm encoder that goes with it in those
# checkpoints; 4 heads of 16 so that the attention fusion sees real multi-head attention.
TINY_CONFIG: dict[str, Any] = {
    **_GEOMETRY,
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
    "conv_dim": [32] * 7, "conv_bias": True, "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4,
}  # fmt: skip
# facebook/wav2vec2-base-960h exactly (94.4M parameters), for benchmarks without the download.
BASE_CONFIG: dict[str, Any] = {
    **_GEOMETRY,
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "conv_dim": [512] * 7, "conv_bias": False,
    "feat_extract_norm": "group", "do_stable_layer_norm": False,
    "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16,
}  # fmt: skip
RANDOM_PRESETS: dict[str, dict[str, Any]] = {"tiny-random": TINY_CONFIG, "base-random": BASE_CONFIG}

# The `tiny` preset: a small wav2vec2 CTC model trained by models/training on synthetic English
# speech (espeak-ng and festival voices), shipped in the repository (config, safetensors, vocab,
# character LM, model card).
SHIPPED_TINY = Path(__file__).resolve().parent / "weights" / "tiny-espeak"
TINY_NOTE = (
    "demo model trained on synthetic speech only (espeak-ng and festival voices; "
    "models/weights/tiny-espeak): it transcribes clear synthetic English roughly, not human speech"
)

# model_type values whose graphs we export and fuse (same conv front end + transformer encoder).
SUPPORTED_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm")
_BASE_ARCHITECTURES = ("Wav2Vec2Model", "HubertModel", "WavLMModel", "Wav2Vec2ForPreTraining")
# Files that define a local checkpoint: what its key hashes, and what a hub download fetches.
_CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".bin", ".txt")
_HUB_PATTERNS = ["*.json", "*.txt"]  # and the weights weight_files picks
NETWORK_TIMEOUT_S = 5.0  # a hub metadata request that takes longer than this counts as "offline"


class ModelLoadError(ValueError):
    """A model name or checkpoint that cannot be used; the message says what and how to fix it."""


class ExportVerificationError(RuntimeError):
    """An ONNX graph disagrees with PyTorch beyond tolerance; `report` holds the numbers.

    Defined here, beside ModelLoadError, so that callers can catch both without importing torch.
    """

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: enough to compute its cache key and to build or load it."""

    name: str  # "tiny", "base", "base-random", a hub id, or a folder as given
    source: str | None  # hub id or absolute folder; None for random-init presets
    head: Head
    trained: bool
    seed: int = 0
    preset: str | None = None  # "tiny" / "base" / "base-random" when the name was a preset
    config: dict[str, Any] | None = field(default=None, hash=False)  # random presets only
    path: str | None = None  # local folder holding config.json + weights (a hub snapshot too)
    note: str = ""  # what users must know about the model (e.g. a demo model's limits)
    revision: str | None = None  # hub commit hash (the snapshot folder's name)
    reason: str = ""  # why `auto` chose this model; empty otherwise


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at its import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_cache_dir() -> str:
    """The hub cache folder, from the environment as it is now (same rules as huggingface_hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file()


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and _has_weights(folder)


def weight_files(files: Sequence[str], parts: Sequence[str] = ("",)) -> tuple[list[str], list[str]]:
    """Which of a repository's `files` hold each part's weights (a part is a folder of it, ""
    its top level): the part's safetensors where it has any, else its pickles (`*.bin`); of
    those, the plain ones, not variants such as `diffusion_pytorch_model.fp16.bin`, where it
    has them. Returns (the files to fetch, the parts that are pickles only)."""

    def plain(names: list[str]) -> list[str]:
        return [f for f in names if "." not in Path(f).stem] or names

    chosen: list[str] = []
    pickled: list[str] = []
    for part in parts:
        own = [f for f in files if os.path.dirname(f) == part]
        safe = plain([f for f in own if f.endswith(".safetensors")])
        pickles = plain([f for f in own if f.endswith(".bin")])
        chosen += safe or pickles
        if pickles and not safe:
            pickled.append(part or "(top level)")
    return chosen, pickled


def locate_hub_checkpoint(
    repo_id: str,
    *,
    allow_download: bool = True,
    patterns: Sequence[str] = tuple(_HUB_PATTERNS),
    complete: Callable[[Path], bool] = _is_checkpoint,
    parts: Sequence[str] = ("",),
) -> Path:
    """Local snapshot folder of `repo_id` with config and weights (or whatever `complete` asks
    of the files matching `patterns`); downloads only if allowed and HF_HUB_OFFLINE is unset,
    each of `parts` in the format the repository holds it (weight_files). Never hangs:
    metadata requests time out after NETWORK_TIMEOUT_S."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    cache = hf_cache_dir()
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                cache_dir=cache,
                local_files_only=True,
                allow_patterns=list(patterns) + ["pytorch_model.bin"],
            )
        )
        if complete(folder):
            return folder
    except Exception:  # noqa: BLE001 - anything short of a complete snapshot is "not cached"
        pass
    if hub_offline() or not allow_download:
        raise ModelLoadError(
            f"{repo_id!r} is not in the local Hugging Face cache ({cache}) and downloads are off "
            "(HF_HUB_OFFLINE is set): run once with network access, pass a local folder, or use "
            "the built-in tiny preset"
        )
    try:
        info = HfApi().model_info(repo_id, timeout=NETWORK_TIMEOUT_S)
        weights, pickled = weight_files([s.rfilename for s in info.siblings or []], parts)
        if pickled:
            log.warning(
                "%s: %s stored only as pickles: fetching those, to be loaded with "
                "torch.load(weights_only=True)", repo_id, ", ".join(pickled),
            )  # fmt: skip
        folder = Path(
            snapshot_download(
                repo_id,
                cache_dir=cache,
                revision=info.sha,  # the commit whose files were listed
                allow_patterns=list(patterns) + weights,
                etag_timeout=NETWORK_TIMEOUT_S,
            )
        )
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"{repo_id!r} is not a model on the Hugging Face hub") from exc
    except Exception as exc:  # noqa: BLE001 - any network failure: report it, never retry
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "check the network or set HF_HUB_OFFLINE=1 and use a cached model"
        ) from exc
    if not complete(folder):
        raise ModelLoadError(f"{repo_id!r} on the hub lacks the files a checkpoint needs")
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, checked to be a supported wav2vec2-family model."""
    config_path = folder / "config.json"
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise ModelLoadError(f"model folder {str(folder)!r} {state}")
    if not config_path.is_file():
        raise ModelLoadError(
            f"{str(folder)!r} has no config.json: it must be a folder written by "
            "save_pretrained() or a Hugging Face model repository"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_path} is not readable JSON: {exc}") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{str(folder)!r} is a {model_type!r} model, not a wav2vec2-family "
            f"one ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return config


def detect_head(config: dict[str, Any], where: str) -> Head:
    """The output head, from the checkpoint's `architectures` (no entry: the bare encoder)."""
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else ""
    if arch.endswith("ForCTC"):
        return "ctc"
    if arch.endswith("ForSequenceClassification"):
        return "classification"
    if not arch or arch in _BASE_ARCHITECTURES:
        return "base"
    raise ModelLoadError(
        f"{where}: architecture {arch!r} is not supported; use a *ForCTC, "
        "*ForSequenceClassification or bare encoder checkpoint"
    )


def _folder_spec(
    name: str, folder: Path, revision: str | None = None, source: str | None = None
) -> ModelSpec:
    config = read_config(folder)
    return ModelSpec(
        name=name,
        source=source or str(folder.resolve()),
        head=detect_head(config, str(folder)),
        trained=True,
        path=str(folder.resolve()),
        revision=revision,
    )


def _hub_spec(name: str, repo_id: str, preset: str | None = None, reason: str = "") -> ModelSpec:
    folder = locate_hub_checkpoint(repo_id)
    spec = _folder_spec(name, folder, revision=folder.name, source=repo_id)
    return replace(spec, preset=preset, reason=reason)


def _shipped_tiny() -> ModelSpec:
    if not (SHIPPED_TINY / "config.json").is_file() or not _has_weights(SHIPPED_TINY):
        raise ModelLoadError(
            f"the shipped tiny model is missing from {SHIPPED_TINY} (a broken install?); "
            "reinstall grym-stream, or use tiny-random"
        )
    spec = _folder_spec("tiny", SHIPPED_TINY, source="grym-stream/tiny-espeak")
    return replace(spec, preset="tiny", note=TINY_NOTE)


def _random_spec(name: str, reason: str = "") -> ModelSpec:
    return ModelSpec(
        name=name,
        source=None,
        head="ctc",
        trained=False,
        seed=0,
        preset=name,
        config=dict(RANDOM_PRESETS[name]),
        reason=reason,
        note="random weights: its transcripts and embeddings are noise",
    )


PRESETS = ("tiny", "tiny-random", "base", "base-random", "auto")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(name: str, model_dir: str | None = None) -> ModelSpec:
    """A preset, a folder (under `model_dir` first when relative) or a hub id -> ModelSpec.

    `auto` is `base` when that is cached (or downloadable, when not offline), else `tiny`; the
    spec's `reason` says which and why. Raises ModelLoadError with a fix-it message.
    """
    if name in RANDOM_PRESETS:
        return _random_spec(name)
    if name == "tiny":
        return _shipped_tiny()
    if name == "base":
        return _hub_spec("base", BASE_HUB_ID, preset="base")
    if name == "auto":
        try:
            return _hub_spec(
                "base",
                BASE_HUB_ID,
                preset="base",
                reason=f"auto: {BASE_HUB_ID} is available (trained weights)",
            )
        except ModelLoadError as exc:
            return replace(
                _shipped_tiny(), reason=f"auto: fell back to the built-in tiny preset because {exc}"
            )
    candidates = [Path(model_dir, name)] if model_dir and not os.path.isabs(name) else []
    candidates.append(Path(os.path.expanduser(name)))
    for folder in candidates:
        if folder.exists():
            return _folder_spec(name, folder)
    looks_like_path = (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    )
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelLoadError(
            f"model folder {name!r} does not exist"
            + (f" (looked under {model_dir!r} too)" if model_dir else "")
        )
    try:
        return _hub_spec(name, name)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"{name!r} is not a preset ({', '.join(PRESETS)}) nor an existing "
            f"folder, so it was taken as a hub id: {exc}"
        ) from exc


def _hash_folder(folder: Path) -> str:
    """sha256 over the names and contents of the files that define a checkpoint."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in _CHECKPOINT_SUFFIXES:
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def checkpoint_key(spec: ModelSpec) -> str:
    """What identifies the weights: `hub-id@commit`, `folder-name@sha256:...` over the files,
    or `preset:seed:config-hash` for random presets. Cheap (no torch); a changed checkpoint
    gets a new key and so a new artifact."""
    if spec.config is not None:
        config_hash = hashlib.sha256(json.dumps(spec.config, sort_keys=True).encode()).hexdigest()
        return f"{spec.preset or spec.name}:{spec.seed}:{config_hash[:16]}"
    if spec.revision:
        return f"{spec.source}@{spec.revision}"
    assert spec.path is not None
    return f"{Path(spec.path).name}@sha256:{_hash_folder(Path(spec.path))[:16]}"
