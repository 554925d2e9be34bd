"""Generation parts of the wire protocol: audio frame headers and generate/cancel messages."""

from __future__ import annotations

import json

import pytest

from stream.core.audio.pcm import Encoding
from stream.protocol import (
    AUDIO_HEADER,
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
