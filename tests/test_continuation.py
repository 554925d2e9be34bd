"""A continuous stream's segments, made by the real AudioLDM loop (tiny preset, random weights):
the samples each one adds, the latent rows it continues, and how its joins sound."""

from __future__ import annotations

import numpy as np
import pytest

from models.audioldm import MEL_HOP, AudioLDM, seam_ratio
from models.audioldm_components import load_generator
from models.generation import Continuation, GenerationRequest, SegmentPlan, crossfade
from stream.session.continuous import MIN_STEPS, Pace


@pytest.fixture(scope="module")
def pipeline() -> AudioLDM:
    return AudioLDM(load_generator("tiny"))


def segments(
    pipeline: AudioLDM, count: int, continued: bool = True, **fields: float
) -> tuple[list[np.ndarray], list[Continuation]]:
    """`count` segments of one stream (each from the one before unless not `continued`)."""
    audio, held = [], []
    continuation = None
    for k in range(count):
        request = GenerationRequest(
            "rain on a tin roof", seconds=fields.get("seconds", 3.0), seed=k, steps=4,
            hop_seconds=fields.get("hop", 1.5), continuation=continuation,
        )  # fmt: skip
        blocks = list(pipeline.generate(request))
        assert [b.start for b in blocks] == np.cumsum(
            [0] + [len(b.audio) for b in blocks[:-1]]
        ).tolist()
        assert all(b.continuation is None for b in blocks[:-1]) and blocks[-1].last
        audio.append(np.concatenate([b.audio for b in blocks]))
        held.append(blocks[-1].continuation)
        continuation = held[-1] if continued else None
    return audio, held


def joins(audio: list[np.ndarray], fade: int = 10 * MEL_HOP) -> list[int]:
    """The middle of each crossfade: where one segment gives way to the next."""
    return (np.cumsum([len(a) for a in audio[:-1]]) + fade // 2).tolist()


def test_segments_add_exactly_the_planned_samples(pipeline: AudioLDM) -> None:
    audio, held = segments(pipeline, 3, seconds=3.0, hop=1.5)
    request = GenerationRequest("x", seconds=3.0, hop_seconds=1.5)
    plan = SegmentPlan.of(request, pipeline.vae_scale)
    assert (plan.frames, plan.hop) == (300, 152)  # whole latent rows of 4 frames
    assert len(audio[0]) == (plan.hop + plan.seam - plan.fade // 2) * MEL_HOP
    assert [len(a) for a in audio[1:]] == [plan.hop * MEL_HOP] * 2
    assert all(len(h.tail) == plan.fade * MEL_HOP for h in held)
    rows = (plan.frames - plan.hop) // pipeline.vae_scale
    assert held[0].latents.shape == (pipeline.c.unet.config.in_channels, rows, 16)
    # The stream's end: the held tail faded to silence, no click.
    end = held[-1].fade_out()
    assert len(end) == plan.fade * MEL_HOP and abs(end[-1]) < 1e-3 * max(1e-6, abs(end).max())


@pytest.mark.parametrize(("before", "after"), [(100, 200), (200, 100)])  # mel frames
def test_a_changed_hop_joins_where_the_segment_before_said(
    pipeline: AudioLDM, before: int, after: int
) -> None:
    """A stream that falls behind lengthens its hop, one that recovers shortens it again: the
    next segment joins the one before in the middle of the overlap that one had, and adds what
    its plan says."""
    audio, held = segments(pipeline, 2, seconds=3.0, hop=before / 100)
    changed = GenerationRequest(
        "rain on a tin roof", seconds=3.0, seed=5, steps=4, hop_seconds=after / 100,
        continuation=held[-1],
    )  # fmt: skip
    plan = SegmentPlan.of(changed, pipeline.vae_scale)
    seam_in, seam = (300 - before) // 2, (300 - after) // 2  # the middles of the overlaps
    assert (plan.seam_in, plan.seam) == (seam_in, seam)
    third = np.concatenate([b.audio for b in pipeline.generate(changed)])
    added = (plan.emit_to - plan.emit_from) * MEL_HOP
    assert len(third) == added == (after + seam - seam_in) * MEL_HOP
    stream = [*audio, third]
    assert seam_ratio(np.concatenate(stream), joins(stream)) < 1.6


def test_a_continued_segment_keeps_the_rows_it_shares(pipeline: AudioLDM) -> None:
    """Inpainting puts the shared rows back exactly after the last step: decoding them with the
    same context gives the same mel, so the next segment's head is the previous one's tail."""
    _, held = segments(pipeline, 2, seconds=2.0, hop=1.0)
    request = GenerationRequest(
        "x", seconds=2.0, seed=9, steps=4, hop_seconds=1.0, continuation=held[0]
    )
    captured = []
    vae_decode = pipeline.c.vae.decode

    def decode(latents, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        captured.append(latents.clone())
        return vae_decode(latents, *args, **kwargs)

    pipeline.c.vae.decode = decode
    try:
        list(pipeline.generate(request))
    finally:
        del pipeline.c.vae.decode
    shared = held[0].latents.shape[1]
    scaled = captured[0][0, :, :shared] * pipeline.c.vae.config.scaling_factor
    np.testing.assert_allclose(scaled.numpy(), held[0].latents, rtol=1e-5, atol=1e-6)


def test_joins_are_seamless_only_when_continued(pipeline: AudioLDM) -> None:
    continued, _ = segments(pipeline, 4)
    independent, _ = segments(pipeline, 4, continued=False)
    assert seam_ratio(np.concatenate(continued), joins(continued)) < 1.6
    assert seam_ratio(np.concatenate(independent), joins(independent, fade=0)) > 2.5


def test_crossfade_weights_sum_to_one() -> None:
    tail, head = np.full(400, 0.5, np.float32), np.full(400, 0.5, np.float32)
    np.testing.assert_allclose(crossfade(tail, head), 0.5, rtol=1e-6)
    mixed = crossfade(np.ones(400, np.float32), np.zeros(400, np.float32))
    assert mixed[0] > 0.99 and mixed[-1] < 0.01 and np.all(np.diff(mixed) < 0)


def test_a_request_must_be_a_clip_or_a_segment() -> None:
    with pytest.raises(ValueError, match="shorter than seconds"):
        GenerationRequest("x", seconds=2.0, hop_seconds=2.0)
    with pytest.raises(ValueError, match="needs hop_seconds"):
        GenerationRequest("x", continuation=Continuation(np.zeros((8, 1, 16)), np.zeros(0)))
    with pytest.raises(ValueError, match="no source"):
        GenerationRequest("x", hop_seconds=1.0, source=np.zeros(16_000, np.float32))


def test_a_stream_that_falls_behind_lowers_steps_then_lengthens_its_hop() -> None:
    pace = Pace(steps=10, hop_seconds=2.0, seconds=4.0)
    changes = [pace.adapt() for _ in range(6)]
    assert changes[:3] == ["steps", "steps", "steps"] and pace.steps == MIN_STEPS
    assert changes[3:] == ["hop", "hop", "none"] and pace.hop_seconds == 3.0
    # ... and goes back once it can: the hop first (the last kind of change), up to what was
    # asked, never beyond.
    back = [pace.recover() for _ in range(7)]
    assert back == ["hop", "hop", "steps", "steps", "steps", None, None]
    assert (pace.steps, pace.hop_seconds) == (10, 2.0)
    pace.adapt()
    pace.ask(4)  # a config's steps: taken at once, and the most it goes back to
    assert (pace.steps, pace.recover()) == (4, None)
