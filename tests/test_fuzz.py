"""Property-based fuzzing of the sans-I/O parts a client's bytes reach first: the start message,
control messages and PCM decoding. Whatever arrives, each either returns a valid value or raises
the protocol's own error (which the transports turn into a typed error event); nothing else."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.core.audio.chunker import Chunker
from stream.core.audio.input import AudioInput
from stream.core.audio.pcm import Encoding, PcmError, PcmFormat, decode
from stream.protocol import (
    MAX_JSON_DEPTH,
    ProtocolError,
    StartMessage,
    encode_event,
    nests_deeper,
    parse_control,
    parse_start,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values of every kind, including the odd ones (huge and non-finite numbers, deep nesting).
scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
START_KEYS = ["type", "sample_rate", "channels", "encoding", "session", "config", "token",
              "resume", "last_event"]  # fmt: skip
CONFIG_KEYS = ["chunk_seconds", "left_context_seconds", "lookahead_seconds", "when_behind",
               "embeddings", "timing", "ctc_decoder", "pipeline", "generation"]  # fmt: skip


def plausible(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the message's own keys (and a few others), holding any JSON values."""
    return st.dictionaries(st.sampled_from([*keys, "extra"]), json_values, max_size=len(keys))


starts = plausible(START_KEYS).map(lambda m: {"type": "start", **m}) | st.builds(
    lambda config, rate, channels: {
        "type": "start", "sample_rate": rate, "channels": channels, "encoding": "pcm_s16le",
        "config": config,
    },
    plausible(CONFIG_KEYS),
    st.sampled_from([16000, 48000, 16000.0, "16000", True, -1]),
    st.sampled_from([1, 2, 2.0, 3, "1", None]),
)  # fmt: skip


def dumps(value: Any) -> str:
    return json.dumps(value)  # NaN and Infinity too: Python's json writes and reads them


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_text_as_start_is_a_start_or_a_protocol_error(text: str) -> None:
    try:
        assert isinstance(parse_start(text), StartMessage)
    except ProtocolError as error:
        assert error.fatal and error.code


@FUZZ
@given(starts)
def test_start_shaped_messages_are_strict_or_refused(message: dict[str, Any]) -> None:
    try:
        start = parse_start(dumps(message))
    except ProtocolError as error:
        assert error.fatal and error.code
        return
    # Accepted: exactly the declared types, nothing coerced from a string or a float.
    assert type(message["sample_rate"]) is int and message["channels"] in (1, 2)
    assert type(message["channels"]) is int
    assert start.sample_rate == message["sample_rate"]


@FUZZ
@given(plausible(["type", "id", "generation", "prompt", "steps", "seed"]) | json_values)
def test_control_messages_are_parsed_or_refused_without_closing(value: Any) -> None:
    if isinstance(value, dict) and "type" not in value:
        value = {"type": "generate", **value}
    try:
        message = parse_control(dumps(value))
    except ProtocolError as error:
        assert not error.fatal  # a bad control message never ends the session
        return
    assert message["type"] in ("stop", "generate", "cancel", "config")


@FUZZ
@given(st.integers(1, 4000), st.sampled_from("[{"))
def test_nesting_is_refused_before_parsing_at_any_depth(depth: int, bracket: str) -> None:
    opening, inner, closing = ("[", "[]", "]") if bracket == "[" else ('{"a": ', "{}", "}")
    text = opening * depth + inner + closing * depth
    assert nests_deeper(text, MAX_JSON_DEPTH) == (depth + 1 > MAX_JSON_DEPTH)
    try:
        parse_control(text)
    except ProtocolError as error:
        assert not error.fatal


@FUZZ
@given(json_values)
def test_nesting_measure_matches_the_parsed_value(value: Any) -> None:
    def depth(v: Any) -> int:
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        return 0

    for limit in range(4):
        assert nests_deeper(dumps(value), limit) == (depth(value) > limit)


@FUZZ
@given(json_values)
def test_every_event_encodes_as_strict_json(value: Any) -> None:
    text = encode_event({"type": "analysis", "value": value})
    assert json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


formats = st.builds(
    PcmFormat,
    st.sampled_from([8000, 16000, 44100, 48000]),
    st.sampled_from([1, 2]),
    st.sampled_from(list(Encoding)),
)


@FUZZ
@given(st.binary(max_size=512), formats)
def test_any_bytes_decode_to_finite_full_scale_audio_or_a_pcm_error(
    data: bytes, fmt: PcmFormat
) -> None:
    try:
        audio = decode(data, fmt)
    except PcmError as error:
        assert error.code in ("partial_frame", "non_finite_samples")
        return
    assert audio.shape == (len(data) // fmt.frame_bytes, fmt.channels)
    assert np.isfinite(audio).all() and np.abs(audio).max(initial=0) <= 1.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=400), max_size=20), formats)
def test_a_stream_of_arbitrary_frames_tiles_the_analysis_timeline(
    frames: list[bytes], fmt: PcmFormat
) -> None:
    """Valid frames are used whole, invalid ones not at all: the windows cut from what was
    used tile it exactly, and their samples are finite and about full scale at most."""
    audio = AudioInput(fmt, 16000, Chunker(1600, 800))
    windows = []
    for frame in frames:
        try:
            windows += audio.feed_pcm(frame)
        except PcmError:
            pass
    windows += audio.finish()
    position = 0
    for window in windows:
        assert window.start == position
        position = window.end
        # (Resampling may ring a little past full scale, never far: nothing can overflow.)
        assert np.isfinite(window.audio).all() and np.abs(window.audio).max(initial=0) <= 2.0
