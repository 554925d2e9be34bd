"""Twilio-style media streams (`/v1/media-stream`), their messages without I/O: a text message
as a JSON object within the protocol's limits, and a call's `start` as the session's start
message and the call's own options. The transport is stream/transports/media_stream.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from stream.core.audio.pcm import Encoding
from stream.protocol.errors import CloseCode, ProtocolError
from stream.protocol.messages import (
    MAX_JSON_DEPTH,
    MAX_TEXT_CHARS,
    SESSION_ID,
    StartMessage,
    nests_deeper,
    parse_start,
)

# mediaFormat.encoding -> the session's encoding (Twilio sends mu-law; A-law is G.711's other).
MEDIA_ENCODINGS = {"audio/x-mulaw": Encoding.PCM_MULAW, "audio/x-alaw": Encoding.PCM_ALAW}
DEFAULT_RATE = 8000  # telephony's rate, when mediaFormat does not say
MARK_PREFIX = "generation-"  # a clip's mark: "generation-<id>"


@dataclass
class Call:
    """What the `start` message says: the session's start, and this transport's own part."""

    start: StartMessage
    stream_sid: str | None
    events: bool = True  # send the session's JSON events (else only media and marks)


def load_message(text: str, close: CloseCode | None) -> dict[str, Any]:
    """A text message as a JSON object, within the protocol's limits; ProtocolError
    `invalid_message` (fatal with `close`) otherwise."""
    if len(text) > MAX_TEXT_CHARS:
        raise ProtocolError(
            "invalid_message",
            f"text message of {len(text)} characters exceeds the limit of {MAX_TEXT_CHARS}",
            close,
        )
    if nests_deeper(text, MAX_JSON_DEPTH):
        raise ProtocolError(
            "invalid_message", f"text message nests JSON deeper than {MAX_JSON_DEPTH} levels",
            close,
        )  # fmt: skip
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ProtocolError("invalid_message", f"text message is not JSON: {exc}", close) from None
    if not isinstance(data, dict):
        raise ProtocolError(
            "invalid_message", 'a message is a JSON object: {"event": ..., ...}', close
        )
    return data


def parse_call(message: dict[str, Any]) -> Call:
    """A `start` message -> the session's start message (checked by `parse_start`, with its
    error codes) and the call's own options. Every failure is fatal."""
    policy = CloseCode.POLICY_VIOLATION
    body = message.get("start")
    if not isinstance(body, dict):
        raise ProtocolError("invalid_start", 'start needs its "start": {...} object', policy)
    media_format = body.get("mediaFormat", {})
    if not isinstance(media_format, dict):
        raise ProtocolError("invalid_start", "start.mediaFormat must be an object", policy)
    named = media_format.get("encoding", "audio/x-mulaw")
    encoding = MEDIA_ENCODINGS.get(named) if isinstance(named, str) else None
    if encoding is None:
        raise ProtocolError(
            "unsupported_encoding",
            f"mediaFormat.encoding must be one of {list(MEDIA_ENCODINGS)}, got {named!r}",
            CloseCode.UNSUPPORTED_DATA,
        )
    if media_format.get("channels", 1) != 1:
        raise ProtocolError(
            "unsupported_channels",
            f"mediaFormat.channels must be 1, got {media_format.get('channels')!r}",
            CloseCode.UNSUPPORTED_DATA,
        )
    params = body.get("customParameters", {})
    if not isinstance(params, dict):
        raise ProtocolError("invalid_start", "start.customParameters must be an object", policy)
    config = params.get("config", {})
    if isinstance(config, str):  # Twilio's parameters are strings: the config is JSON text
        try:
            config = load_message(config, policy)
        except ProtocolError as exc:
            raise ProtocolError(
                "invalid_config", f"customParameters.config: {exc}", policy
            ) from None
    if not isinstance(config, dict):
        raise ProtocolError("invalid_config", "customParameters.config must be an object", policy)
    rate = media_format.get("sampleRate", DEFAULT_RATE)
    if isinstance(config.get("generation"), dict):
        # Generated audio goes back into the call: in its format, whatever was asked.
        config = {**config, "generation": {**config["generation"], "encoding": encoding.value}}
        if isinstance(rate, int):
            config["generation"]["sample_rate"] = rate
    events = params.get("events", "all")
    if events not in ("all", "none"):
        raise ProtocolError(
            "invalid_start", f'customParameters.events is "all" or "none", not {events!r}', policy
        )
    stream_sid = body.get("streamSid", message.get("streamSid"))
    if stream_sid is not None and not isinstance(stream_sid, str):
        raise ProtocolError("invalid_start", "streamSid must be a string", policy)
    start: dict[str, Any] = {
        "type": "start", "sample_rate": rate, "channels": 1, "encoding": encoding.value,
        "config": config,
    }  # fmt: skip
    if stream_sid is not None and SESSION_ID.fullmatch(stream_sid):
        start["session"] = stream_sid  # else the session gets an id of its own
    if params.get("token") is not None:
        start["token"] = params["token"]
    if params.get("traceparent") is not None:  # the caller's span (W3C), as start.traceparent
        start["traceparent"] = params["traceparent"]
    return Call(parse_start(json.dumps(start)), stream_sid, events == "all")
