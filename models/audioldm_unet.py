"""The UNet's part of one denoising step (step 3 of models/audioldm.py): compiled or eager, with
guidance or without, the whole network or its shallow path.

Two of its ways of running are opt-in approximations (GenerationRequest), each measured against
the exact loop in BENCHMARKS.md (`python -m benchmarks.generation`):

- guidance on the early steps only (`guidance_until`): classifier-free guidance shapes the clip
  in the first steps; the later ones only refine it, so they run on the prompt's half alone
  (one row instead of two);
- deep-feature reuse (`deep_cache_interval`, after DeepCache, Ma et al. 2023): the deep layers'
  output changes little from one step to the next, so every n-th step runs the whole UNet and
  keeps the feature that enters its last up block, and the steps between run only the shallow
  path on it: the input convolution, the first down block (the skip connections the last up
  block takes) and the last up block, at full resolution but without the deep layers.

A whole step runs the compiled package for its shape where one exists (models/audioldm_compiled.py:
it gives the deep feature out too), a step without guidance the guided package on its one row
twice where there is no package for one row (`python -m models.audioldm_compiled unet:1x125`
makes one), and eagerly otherwise; the shallow path always runs eagerly (on AudioLDM-S, two
cores: 0.03 s, against 0.15 s for a whole compiled step).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any

import torch


class UNetSteps:
    """The UNet calls of one clip's denoising; counts how many ran compiled (for the timings).
    `compiled(batch)`: the compiled step for this clip's latent at that batch, or None."""

    def __init__(
        self,
        unet: torch.nn.Module,
        compiled: Callable[[int], Any],
        autocast: Callable[[], torch.autocast],
        deep_cache_interval: int = 1,
    ) -> None:
        self.unet, self._compiled, self._autocast = unet, compiled, autocast
        self.interval = deep_cache_interval if has_shallow_path(unet) else 1
        self.calls = self.compiled_calls = 0
        self._deep: torch.Tensor | None = None  # input of the last up block at the last whole step

    def __call__(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, step: int) -> Any:
        """The noise prediction for `x` (a row per embedding) at timestep `t`, float32."""
        self.calls += 1
        if self.interval > 1 and step % self.interval and self._deep is not None:
            deep = self._deep[-len(x) :]  # guidance ended since: the prompt's half
            with self._autocast():
                return shallow_step(self.unet, x, t, embeds, deep).float()
        if (runner := self._compiled(len(x))) is not None:
            self.compiled_calls += 1
            noise, self._deep = runner(x.contiguous(), t, embeds)
            return noise
        if len(x) == 1 and (runner := self._compiled(2)) is not None:
            # No package for one row (guidance has ended): the guided one on the row twice is
            # still faster than the eager UNet on one (AudioLDM-S: 0.17 against 0.24 s).
            self.compiled_calls += 1
            noise, deep = runner(torch.cat([x, x]).contiguous(), t, torch.cat([embeds, embeds]))
            self._deep = deep[:1]
            return noise[:1]
        kept: list[torch.Tensor] = []
        keeping = deep_feature(self.unet, kept) if self.interval > 1 else nullcontext()
        with self._autocast(), keeping:
            noise = self.unet(x, t, encoder_hidden_states=None, class_labels=embeds).sample.float()
        self._deep = kept[0] if kept else None
        return noise


@contextmanager
def deep_feature(unet: torch.nn.Module, kept: list[torch.Tensor]) -> Any:
    """Within it, a whole UNet call appends the last up block's input to `kept`: what the steps
    between whole ones reuse."""

    def keep(_module: Any, args: tuple, kwargs: dict) -> None:
        kept.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    handle = unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def has_shallow_path(unet: Any) -> bool:
    """Whether `shallow_step` can run this UNet: one of the plain text-to-audio/image layouts
    (no added embeddings, as AudioLDM's) with a skip for every resnet of the last up block."""
    config = unet.config
    return (
        config.addition_embed_type is None
        and not config.center_input_sample
        and len(unet.up_blocks[-1].resnets) <= 1 + len(unet.down_blocks[0].resnets)
    )


def shallow_step(
    unet: Any, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, deep: torch.Tensor
) -> torch.Tensor:
    """The UNet's output for `x` with the deep layers' part taken from `deep` (the input of the
    last up block at an earlier step): what UNet2DConditionModel.forward does, less the deep
    layers, for AudioLDM's conditioning (class labels, no cross-attention states). Given the
    same step's `deep`, it equals the whole UNet's output."""
    # 1. The time and class embedding, as the whole forward makes it.
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
    class_emb = unet.get_class_embed(sample=x, class_labels=embeds)
    if class_emb is not None:
        concat = unet.config.class_embeddings_concat
        emb = torch.cat([emb, class_emb], dim=-1) if concat else emb + class_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    # 2. The input convolution and the first down block: the last up block's skip connections.
    sample = unet.conv_in(x)
    _, skips = unet.down_blocks[0](hidden_states=sample, temb=emb)
    last = unet.up_blocks[-1]
    skips = (sample, *skips)[: len(last.resnets)]
    # 3. The last up block on the kept deep feature, and the output layers.
    sample = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips)
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)
