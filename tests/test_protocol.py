"""Generation parts of the wire protocol: audio frame headers and generate/cancel messages."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, get_args, get_type_hints

import pytest
from annotated_types import Ge, Le
from pydantic import BaseModel, TypeAdapter, ValidationError

import stream.protocol.messages
from stream.core.audio.pcm import Encoding
from stream.core.steps.triggers import NoveltyTrigger, TriggerStep
from stream.protocol import (
    AUDIO_HEADER,
    FLAT_TRIGGERS,
    AudioHeader,
    GenerationConfig,
    ProtocolError,
    generation_options,
    pack_audio,
    parse_control,
    unpack_audio,
)


def test_generated_audio_frames_round_trip() -> None:
    header = AudioHeader(3, 7, 22_050, 123_456_789_012, Encoding.PCM_F32LE, True)
    frame = pack_audio(header, b"\x00\x00\x80\x3f")
    assert len(frame) == AUDIO_HEADER.size + 4 == 32 and frame[:4] == b"GRYA"
    assert unpack_audio(frame) == (header, b"\x00\x00\x80\x3f")
    with pytest.raises(ValueError):
        unpack_audio(b"RIFF" + frame[4:])


def test_generate_messages_override_the_session_options() -> None:
    base = GenerationConfig(prompt="rain", seconds=3.0, triggers=["interval"])
    options = generation_options({"type": "generate", "seed": 9, "steps": 4}, base)
    assert (options.prompt, options.seconds, options.seed, options.steps) == ("rain", 3.0, 9, 4)
    for bad in ({"triggers": []}, {"template": "opera"}, {"seconds": 0}, {"mode": "remix"}):
        with pytest.raises(ProtocolError) as info:
            generation_options({"type": "generate", **bad}, base)
        assert info.value.code == "invalid_message" and not info.value.fatal
    with pytest.raises(ProtocolError):
        parse_control('{"type": "cancel", "id": true}')
    assert parse_control('{"type": "cancel", "id": 2}')["id"] == 2


def test_generation_config_errors_are_start_errors() -> None:
    from stream.protocol import parse_start

    start = {"type": "start", "sample_rate": 16000, "channels": 1, "encoding": "pcm_s16le"}
    for bad in (
        {"novelty_on": 0.2, "novelty_off": 0.5},
        {"triggers": ["sometimes"]},
        {"window_seconds": 0},
        {"encoding": "mp3"},
    ):
        with pytest.raises(ProtocolError) as info:
            parse_start(json.dumps({**start, "config": {"generation": bad}}))
        assert info.value.code == "invalid_config" and info.value.fatal


def test_the_flat_trigger_fields_are_the_trigger_steps_options() -> None:
    """Each flat field has the default and the limits of the step options it sets, and a value
    out of bounds is refused in the same words in both forms."""
    names = get_args(get_args(GenerationConfig.model_fields["triggers"].annotation)[0])
    assert set(names) == {step.name for step in FLAT_TRIGGERS}
    for step, options in FLAT_TRIGGERS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(step.Options)}
        hints = get_type_hints(step.Options, include_extras=True)
        for option, flat in options.items():
            field = GenerationConfig.model_fields[flat]
            assert field.default == defaults[option]
            assert field.metadata == list(get_args(hints[option])[1:])  # Ge(...), Le(...)
            too_low = next(m.ge for m in field.metadata if isinstance(m, Ge)) - 1
            with pytest.raises(ValidationError) as flat_error:
                GenerationConfig.model_validate({flat: too_low})
            with pytest.raises(ValidationError) as step_error:
                TypeAdapter(step.Options).validate_python({option: too_low})
            assert flat_error.value.errors()[0]["msg"] == step_error.value.errors()[0]["msg"]
    with pytest.raises(ValidationError, match="novelty_off must not exceed novelty_on"):
        GenerationConfig(novelty_on=0.2, novelty_off=0.5)
    with pytest.raises(ValueError, match="off must not exceed on"):
        NoveltyTrigger.Options(on=0.2, off=0.5)


def test_a_changed_step_limit_shows_in_the_flat_form(monkeypatch: pytest.MonkeyPatch) -> None:
    class Sparse(TriggerStep):
        name = "sparse"

        @dataclasses.dataclass(frozen=True)
        class Options:
            seconds: Annotated[float, Ge(30.0), Le(90.0)] = 60.0

    class Other(TriggerStep):
        name = "other"

        @dataclasses.dataclass(frozen=True)
        class Options:
            seconds: Annotated[float, Ge(1.0), Le(90.0)] = 60.0

    monkeypatch.setattr(stream.protocol.messages, "FLAT_TRIGGERS", {Sparse: {"seconds": "every"}})

    class Flat(BaseModel):
        every: float = stream.protocol.messages._trigger_field("every")

    assert Flat().every == 60.0 and Flat(every=30).every == 30.0
    for bad in (29.0, 91.0):
        with pytest.raises(ValidationError):
            Flat(every=bad)
    both = {Sparse: {"seconds": "every"}, Other: {"seconds": "every"}}
    monkeypatch.setattr(stream.protocol.messages, "FLAT_TRIGGERS", both)
    with pytest.raises(TypeError, match="declare it differently"):
        stream.protocol.messages._trigger_field("every")
