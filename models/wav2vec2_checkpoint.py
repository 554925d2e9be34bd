"""Building or loading a wav2vec2 checkpoint in PyTorch, with what a runner needs to read its
outputs (vocabulary, blank, word delimiter, labels, input normalisation).

Random presets are built from their config and seed; hub snapshots and folders are loaded with
transformers, safetensors preferred, pickles through the weights-only loader. Always with eager
attention: the legacy TorchScript exporter then writes the plain MatMul/Softmax pattern that
onnxruntime's transformer optimizer fuses into `Attention` (models/wav2vec2.py exports).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.presets import BASE_960H_VOCAB, ModelLoadError, ModelSpec, checkpoint_key

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model in eval mode plus what a runner needs to interpret its outputs."""

    model: torch.nn.Module
    spec: ModelSpec
    key: str  # checkpoint key (models.presets.checkpoint_key)
    head: str
    vocab: list[str] | None  # CTC: id -> token
    blank_id: int | None  # CTC blank = the pad token id
    word_delimiter: str | None
    labels: list[str] | None  # classification: id -> label
    do_normalize: bool  # the runner must zero-mean/unit-variance each window first
    trained: bool
    normalize_source: str = "preset"  # which file said do_normalize (feature_extractor_settings)

    @property
    def config(self) -> Any:
        return self.model.config

    def describe(self) -> dict[str, Any]:
        """The model part of an artifact's meta.json."""
        cfg = self.config
        return {
            "checkpoint_key": self.key, "source": self.spec.source, "preset": self.spec.preset,
            "name": self.spec.name, "head": self.head, "vocab": self.vocab,
            "blank_id": self.blank_id, "word_delimiter": self.word_delimiter,
            "labels": self.labels, "do_normalize": self.do_normalize,
            "do_normalize_from": self.normalize_source, "trained": self.trained,
            "note": self.spec.note,
            "model_type": cfg.model_type, "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_hidden_layers": cfg.num_hidden_layers, "conv_kernel": list(cfg.conv_kernel),
            "conv_stride": list(cfg.conv_stride), "feat_extract_norm": cfg.feat_extract_norm,
        }  # fmt: skip


def _build_random(spec: ModelSpec) -> torch.nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    cfg = Wav2Vec2Config(**(spec.config or {}))
    # A private RNG stream: the same seed gives the same weights whatever the caller did before,
    # and the caller's global RNG state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return Wav2Vec2ForCTC._from_config(cfg, attn_implementation="eager")


def _load_pretrained(spec: ModelSpec) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForAudioClassification, AutoModelForCTC

    assert spec.path is not None
    folder = Path(spec.path)
    auto = {
        "ctc": AutoModelForCTC,
        "classification": AutoModelForAudioClassification,
        "base": AutoModel,
    }[spec.head]
    if any(folder.glob("*.safetensors")):
        use_safetensors = True
    elif (folder / "pytorch_model.bin").is_file():
        use_safetensors = False
        log.warning(
            "%s has only a pickle checkpoint (pytorch_model.bin); loading it with "
            "torch.load(weights_only=True). Prefer a safetensors copy.",
            folder,
        )
    else:
        raise ModelLoadError(
            f"{str(folder)!r} has no weights: expected model.safetensors "
            "(or a pytorch_model.bin pickle)"
        )
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the pipeline prints its own step lines
    try:
        return auto.from_pretrained(
            str(folder),
            attn_implementation="eager",
            use_safetensors=use_safetensors,
            weights_only=True,
            trust_remote_code=False,
            local_files_only=True,
        )
    except Exception as exc:  # corrupt or foreign weights surface as many exception types
        if use_safetensors:
            what = f"the safetensors weights ({type(exc).__name__}: {str(exc)[:160]})"
        else:  # torch's message suggests weights_only=False, which we never do: leave it out
            what = f"pytorch_model.bin as a weights-only pickle ({type(exc).__name__})"
        raise ModelLoadError(
            f"could not load {what} in {str(folder)!r}; re-save the checkpoint "
            "with save_pretrained() (safetensors)"
        ) from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", path)
        return {}


def feature_extractor_settings(folder: Path) -> tuple[dict[str, Any], str]:
    """The feature extractor's settings and the file they came from. transformers >= 5 saves a
    processor's parts in one `processor_config.json` (under "feature_extractor") and writes no
    `preprocessor_config.json`; older versions and most hub repositories have only the latter.
    The new file is read first; with neither, the settings are empty (the defaults apply)."""
    processor = _read_json(folder / "processor_config.json")
    processor = processor.get("feature_extractor") if isinstance(processor, dict) else None
    if isinstance(processor, dict):
        return processor, "processor_config.json"
    if (folder / "preprocessor_config.json").is_file():
        return _read_json(folder / "preprocessor_config.json"), "preprocessor_config.json"
    return {}, "default: the folder has no feature extractor settings"


def load_torch_model(spec: ModelSpec) -> LoadedModel:
    """Build (random presets) or load (hub snapshot / folder) the model, in eval mode."""
    if spec.config is not None:
        model = _build_random(spec)
        vocab: list[str] | None = list(BASE_960H_VOCAB)
        word_delimiter, do_normalize, normalize_source = "|", True, "preset"
    else:
        model = _load_pretrained(spec)
        folder = Path(spec.path or "")
        token_ids = _read_json(folder / "vocab.json")
        vocab = None
        if token_ids and all(isinstance(i, int) for i in token_ids.values()):
            vocab = [""] * (max(token_ids.values()) + 1)
            for token, index in token_ids.items():
                vocab[index] = token
        elif spec.head == "ctc":
            log.warning("%s: no flat vocab.json; CTC ids cannot be turned into text", folder)
        tokenizer = _read_json(folder / "tokenizer_config.json")
        word_delimiter = tokenizer.get("word_delimiter_token", "|")
        # Hub wav2vec2 checkpoints normalise unless their feature extractor says otherwise.
        extractor, normalize_source = feature_extractor_settings(folder)
        do_normalize = bool(extractor.get("do_normalize", True))
    model.eval()
    cfg = model.config
    labels = None
    if spec.head == "classification":
        labels = [cfg.id2label[i] for i in sorted(cfg.id2label)]
    blank_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    is_ctc = spec.head == "ctc"
    return LoadedModel(
        model=model, spec=spec, key=checkpoint_key(spec), head=spec.head,
        vocab=vocab if is_ctc else None, blank_id=blank_id if is_ctc else None,
        word_delimiter=word_delimiter if is_ctc else None, labels=labels,
        do_normalize=do_normalize, trained=spec.trained,
        normalize_source=normalize_source)  # fmt: skip
