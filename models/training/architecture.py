"""The model's architecture: the tiny-espeak configuration and the candidate sizes measured
against it (`python -m benchmarks.model_size`; BENCHMARKS.md "The offline model's size")."""

from __future__ import annotations

from typing import Any

from transformers import Wav2Vec2Config

from models.presets import BASE_960H_VOCAB

# Candidate sizes, as changes to the tiny-espeak architecture below. Each keeps the 20 ms frame
# geometry and the layer-norm conv stack (the server reuses its features across chunks); they
# spend the analysis cost differently: a narrower conv stack (the fp32 part of an int8 artifact)
# for a deeper or wider int8 encoder. `python -m benchmarks.model_size` times each one's
# analysis cost against `tiny`.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "slim-conv-8-layers": {"conv_dim": [48, 48, 64, 96, 128, 192, 256], "num_hidden_layers": 8},
    "slim-conv-320": {
        "conv_dim": [48, 48, 64, 96, 160, 256, 320], "hidden_size": 320,
        "num_attention_heads": 5, "intermediate_size": 960,
    },
    "8-layers": {"num_hidden_layers": 8},
    "12-layers": {"num_hidden_layers": 12},
}  # fmt: skip
# The recipe's default: 1.11x tiny's analysis cost, and at equal training time (two 40-minute
# pilot runs side by side) 12 points of CER better than tiny on the unseen set (BENCHMARKS.md
# "The offline model's size"). The shipped tiny-espeak is the older "tiny".
DEFAULT_ARCHITECTURE = "slim-conv-8-layers"


def model_config(architecture: str = "tiny") -> Wav2Vec2Config:
    """The tiny-espeak architecture (base's conv geometry, narrow convs, a 6-layer encoder), or
    one of ARCHITECTURES' changes to it.

    Chosen for what a step costs on 2 CPU cores (torch.profiler, bf16; the model card has the
    figures): ReLU in the conv stack (GELU's backward over its 3,200 frames a second was the
    largest item), a 32-tap positional conv (64 taps cost twice as much, for a model that
    streams 2 s windows), and no dropout (a run sees each clip about twice: under-trained, not
    over-fitted). The attention kernel is chosen by measurement when training starts
    (`fastest_attention`); it is not saved in config.json.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"no architecture {architecture!r}: {', '.join(ARCHITECTURES)}")
    settings: dict[str, Any] = dict(
        vocab_size=len(BASE_960H_VOCAB), pad_token_id=0, bos_token_id=1, eos_token_id=2,
        conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
        conv_dim=[64, 64, 96, 128, 192, 256, 256], conv_bias=True, feat_extract_norm="layer",
        feat_extract_activation="relu", do_stable_layer_norm=True, hidden_size=256,
        num_hidden_layers=6, num_attention_heads=4, intermediate_size=768,
        num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=16, hidden_dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
        layerdrop=0.0, mask_time_prob=0.05, mask_time_length=5, ctc_loss_reduction="mean",
        ctc_zero_infinity=True, attn_implementation="eager",
    )  # fmt: skip
    return Wav2Vec2Config(**{**settings, **ARCHITECTURES[architecture]})
