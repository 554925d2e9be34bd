"""The PyTorch side of wav2vec2: export a model to ONNX, check ONNX against it (the model itself is
built or loaded by models/wav2vec2_checkpoint.py).

Only the export pipeline (models/export.py) imports this module, and only when an artifact has to
be made or re-verified: serving runs the cached ONNX files on onnxruntime and never needs torch.

Models are always built with eager attention: the legacy TorchScript exporter then writes the
plain MatMul/Softmax pattern that onnxruntime's transformer optimizer fuses into `Attention`
(sdpa exports do not fuse; see /work/shared/NOTES-models.md).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.conv_norm import FirstConvNorm
from models.encoder_int8 import ConvStack
from models.presets import ExportVerificationError
from models.wav2vec2_checkpoint import LoadedModel

__all__ = [
    "ExportVerificationError", "TorchForward", "EncoderWrapper", "TransformerWrapper", "OPSET",
    "export_onnx", "verify_onnx", "output_names", "conv_stack",
]  # fmt: skip

log = logging.getLogger(__name__)

OPSET = 17
# fp32 graphs (plain and fused) must match PyTorch this closely on the checked output (logits,
# class_logits, or hidden for bare encoders); measured: ~1e-6 on tiny, ~3e-6 on base (notes).
FP32_TOLERANCE = 1e-3
# int8 floors. Measured on the VERIFY_CASES noise (worst case of the two shapes), onnxruntime 1.32:
#   tiny:        hidden cosine 0.99997, CTC argmax agreement 0.984 (max |dlogits| 0.008)
#   base-random: hidden cosine 0.99954, CTC argmax agreement 0.953 (max |dlogits| 0.069)
# Random weights give near-flat logits, so argmax agreement is the noisier number and its floor
# has the wider margin; cosine keeps ~20x margin in (1 - cos). A broken quantisation lands far
# below both. Deep trained models (24 layers) may need checking: fall back to fp32-opt if refused.
# The argmax floor applies to CTC frames only (classification has one argmax per row).
INT8_FLOORS = {"hidden_cosine": 0.99, "argmax_agreement": 0.80}
# (batch, samples): 2 x 1.3 s and 1 x 0.7 s, so that both dynamic axes differ from the traced
# (2, 16000) example and from each other.
VERIFY_CASES = ((2, 20800), (1, 11200))
_TRACE_SHAPE = (2, 16000)

# Known, harmless warnings of the legacy exporter in torch 2.13 (pyproject turns warnings into
# errors under pytest, so they are silenced here, where they arise, and nowhere else).
_EXPORT_WARNINGS = (
    (DeprecationWarning, r"You are using the legacy TorchScript-based ONNX export"),
    (DeprecationWarning, r"The feature will be removed"),
)


def output_names(head: str) -> list[str]:
    """The transformer graph's output names, in order: `hidden` always, then the head's output."""
    return ["hidden"] + {"ctc": ["logits"], "classification": ["class_logits"], "base": []}[head]


def _model_outputs(
    model: torch.nn.Module, head: str, inputs: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    if head == "base":
        return (model(inputs).last_hidden_state,)
    # hidden_states[-1] is the encoder's output (after the final layer norm in the stable
    # variant), i.e. what the head consumes; the unused earlier states are pruned on export.
    out = model(inputs, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


class TorchForward(torch.nn.Module):
    """The whole model in PyTorch: audio (batch, samples), normalised -> hidden (+ head output).

    The reference that both ONNX graphs together must reproduce."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.model = loaded.model
        self.head = loaded.head

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _model_outputs(self.model, self.head, audio)


class EncoderWrapper(torch.nn.Module):
    """audio (batch, samples) -> conv features (batch, frames, conv_dim[-1]).

    The conv feature encoder alone: for "layer"-norm checkpoints each frame depends only on its
    own 400 samples, so a stream's frames can be computed once and reused by later windows.
    "group"-norm checkpoints take their first layer's normalisation as two more inputs,
    `norm_shift` and `norm_scale` (batch, channels), and raw audio (models/conv_norm.py says
    why and how the runner computes them)."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.feature_extractor = loaded.model.base_model.feature_extractor
        self.group_norm = loaded.config.feat_extract_norm == "group"
        self.input_normalised = loaded.do_normalize

    @property
    def input_names(self) -> list[str]:
        return ["audio", "norm_shift", "norm_scale"] if self.group_norm else ["audio"]

    def first_conv(self) -> FirstConvNorm:
        layer = self.feature_extractor.conv_layers[0]
        weight = layer.conv.weight.detach().numpy()[:, 0, :]
        stride, eps = int(layer.conv.stride[0]), float(layer.layer_norm.eps)
        return FirstConvNorm(weight, stride, eps, self.input_normalised)

    def forward(
        self,
        audio: torch.Tensor,
        norm_shift: torch.Tensor | None = None,
        norm_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.group_norm:
            return self.feature_extractor(audio).transpose(1, 2)
        assert norm_shift is not None and norm_scale is not None
        first, *rest = self.feature_extractor.conv_layers
        hidden = first.conv(audio[:, None])
        hidden = (hidden - norm_shift[:, :, None]) * norm_scale[:, :, None]
        norm = first.layer_norm
        hidden = first.activation(hidden * norm.weight[:, None] + norm.bias[:, None])
        for layer in rest:
            hidden = layer(hidden)
        return hidden.transpose(1, 2)


def conv_stack(loaded: LoadedModel) -> ConvStack | None:
    """The conv encoder's weights for models/encoder_int8.py; None where it does not apply."""
    if not ConvStack.supported(loaded.config):
        return None
    layers = loaded.model.base_model.feature_extractor.conv_layers
    norm = layers[0].layer_norm
    return ConvStack(
        weights=[layer.conv.weight.detach().numpy() for layer in layers],
        strides=[int(layer.conv.stride[0]) for layer in layers],
        norm_weight=norm.weight.detach().numpy(),
        norm_bias=norm.bias.detach().numpy(),
    )


class _FeaturesAsInput(torch.nn.Module):
    """Stands in for the feature encoder: the model's input already is its output."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.transpose(1, 2)  # the model transposes back to (batch, frames, dim)


class TransformerWrapper(torch.nn.Module):
    """conv features (batch, frames, dim) -> hidden (+ logits | class_logits): the rest of the
    model (feature projection, positional conv, transformer layers, head), run by the model's own
    forward with its feature encoder swapped out for the duration of the call."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.model = loaded.model
        self.head = loaded.head
        self._passthrough = _FeaturesAsInput()

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        base = self.model.base_model
        encoder = base.feature_extractor
        base.feature_extractor = self._passthrough
        try:
            return _model_outputs(self.model, self.head, features)
        finally:
            base.feature_extractor = encoder


def _export(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    names: tuple[list[str], list[str]],
    axes: dict[str, dict[int, str]],
) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        for category, message in _EXPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=names[0],
            output_names=names[1],
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def export_onnx(loaded: LoadedModel, folder: Path) -> None:
    """Legacy (TorchScript) export at opset 17 of `encoder.onnx` (audio -> features) and
    `transformer.onnx` (features -> outputs), dynamic batch/samples/frames; for "group"-norm
    checkpoints also the first conv's weights (models/conv_norm.py)."""
    frames = {0: "batch", 1: "frames"}
    audio = _audio(*_TRACE_SHAPE, seed=0)
    encoder = EncoderWrapper(loaded)
    example = encoder_inputs(encoder, audio)
    axes = {name: {0: "batch"} for name in encoder.input_names}
    axes["audio"] = {0: "batch", 1: "samples"}
    _export(
        encoder, tuple(torch.from_numpy(v) for v in example.values()), folder / "encoder.onnx",
        (encoder.input_names, ["features"]), {**axes, "features": frames},
    )  # fmt: skip
    if encoder.group_norm:
        encoder.first_conv().save(folder)
    with torch.no_grad():
        features = encoder(*(torch.from_numpy(v) for v in example.values()))
    names = output_names(loaded.head)
    axes = {"features": frames}
    for name in names:
        axes[name] = {0: "batch"} if name == "class_logits" else frames
    _export(
        TransformerWrapper(loaded), (features,), folder / "transformer.onnx",
        (["features"], names), axes,
    )  # fmt: skip


def encoder_inputs(encoder: EncoderWrapper, audio: np.ndarray) -> dict[str, np.ndarray]:
    """The encoder graph's inputs for a batch of (normalised) audio, each row taken alone."""
    if not encoder.group_norm:
        return {"audio": audio}
    shift, scale = encoder.first_conv().window(audio)
    return {"audio": audio, "norm_shift": shift, "norm_scale": scale}


def _audio(batch: int, samples: int, seed: int) -> np.ndarray:
    """Seeded white noise, zero-mean and unit-variance like normalised audio."""
    return np.random.default_rng(seed).standard_normal((batch, samples)).astype(np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis."""
    denom = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(denom, 1e-12)


def verify_onnx(
    loaded: LoadedModel, folder: Path, variant: str, int8_encoder: bool = False
) -> dict[str, Any]:
    """Run the artifact's two ONNX graphs (CPUExecutionProvider) one after the other, and the
    whole PyTorch model, on VERIFY_CASES; return the numbers.

    Raises ExportVerificationError when fp32 variants differ by FP32_TOLERANCE or more on the
    checked output, or int8 falls below INT8_FLOORS.
    """
    from models.wav2vec2_runtime import Wav2Vec2Graphs

    # The runner's own code and options, one thread: results do not depend on the thread count.
    graphs = Wav2Vec2Graphs(folder, threads=1, device="cpu", int8_encoder=int8_encoder)
    names = output_names(loaded.head)
    checked = names[-1]
    wrapper = TorchForward(loaded).eval()
    cases = []
    for index, (batch, samples) in enumerate(VERIFY_CASES):
        audio = _audio(batch, samples, seed=1000 + index)
        with torch.no_grad():
            expected = dict(zip(names, (t.numpy() for t in wrapper(torch.from_numpy(audio)))))
        got = graphs.run(audio)
        case: dict[str, Any] = {"shape": [batch, samples]}
        for name in names:
            if got[name].shape != expected[name].shape:
                raise ExportVerificationError(
                    f"{variant}: {name} has shape {got[name].shape}, "
                    f"PyTorch {expected[name].shape}",
                    {"cases": cases},
                )
            case[f"max_abs_{name}"] = float(np.abs(got[name] - expected[name]).max())
        cosine = _cosine(got["hidden"], expected["hidden"])  # per frame
        case["hidden_cosine_mean"] = float(cosine.mean())
        case["hidden_cosine_min"] = float(cosine.min())
        if checked != "hidden":
            case["argmax_agreement"] = float(
                (got[checked].argmax(-1) == expected[checked].argmax(-1)).mean()
            )
        cases.append(case)
    report: dict[str, Any] = {
        "variant": variant, "checked_output": checked, "cases": cases,
        "max_abs": max(c[f"max_abs_{checked}"] for c in cases),
        "hidden_cosine": min(c["hidden_cosine_mean"] for c in cases),
        "argmax_agreement": min((c["argmax_agreement"] for c in cases if "argmax_agreement" in c),
                                default=None),
    }  # fmt: skip
    failures = []
    if variant == "int8":
        report["floors"] = dict(INT8_FLOORS)
        for metric, floor in INT8_FLOORS.items():
            # Class argmax over 3 verification rows is too coarse to refuse on: reported only.
            enforced = metric != "argmax_agreement" or loaded.head == "ctc"
            if enforced and report[metric] is not None and report[metric] < floor:
                failures.append(f"{metric} {report[metric]:.4f} < floor {floor}")
    else:
        report["tolerance"] = FP32_TOLERANCE
        if not report["max_abs"] < FP32_TOLERANCE:  # also catches NaN
            failures.append(
                f"max |{checked} difference| {report['max_abs']:.3g} >= {FP32_TOLERANCE}"
            )
    report["passed"] = not failures
    if failures:
        raise ExportVerificationError(
            f"{variant} ONNX disagrees with PyTorch: " + "; ".join(failures), report
        )
    return report
