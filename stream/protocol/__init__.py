"""Wire protocol v1: message parsing, validation and event construction.

Shared by the server and the clients, so it imports neither the server nor any model code (only
models.base, the analysers' interface, for the analysis rate they all work at).
docs/protocol.md is the prose version of this package; keep the two in step. One module per
direction and kind: errors.py (close codes, errors), messages.py (client -> server), events.py
(server -> client JSON), audio.py (server -> client binary frames).
"""

from models.base import ANALYSIS_SAMPLE_RATE
from stream.protocol.audio import (
    AUDIO_HEADER,
    AUDIO_MAGIC,
    AUDIO_VERSION,
    AudioHeader,
    pack_audio,
    unpack_audio,
)
from stream.protocol.errors import (
    CloseCode,
    ProtocolError,
    error_event,
)
from stream.protocol.events import (
    ack_event,
    analysis_event,
    commit_event,
    encode_event,
    end_event,
    generation_event,
    patterns_event,
    ready_event,
)
from stream.protocol.messages import (
    CONTROL_TYPES,
    FIXED_FOR_A_SESSION,
    FLAT_TRIGGERS,
    MAX_JSON_DEPTH,
    MAX_SAMPLE_RATE,
    MAX_TEXT_CHARS,
    MIN_SAMPLE_RATE,
    PROTOCOL_VERSION,
    SESSION_ID,
    GenerationConfig,
    GenerationOptions,
    SessionConfig,
    StartMessage,
    TurnDetection,
    WireEncoding,
    generation_options,
    nests_deeper,
    parse_control,
    parse_start,
    updated_generation_config,
)

__all__ = [
    "ANALYSIS_SAMPLE_RATE",
    "AUDIO_HEADER",
    "AUDIO_MAGIC",
    "AUDIO_VERSION",
    "AudioHeader",
    "CONTROL_TYPES",
    "CloseCode",
    "FIXED_FOR_A_SESSION",
    "FLAT_TRIGGERS",
    "GenerationConfig",
    "GenerationOptions",
    "MAX_JSON_DEPTH",
    "MAX_SAMPLE_RATE",
    "MAX_TEXT_CHARS",
    "MIN_SAMPLE_RATE",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "SESSION_ID",
    "SessionConfig",
    "TurnDetection",
    "StartMessage",
    "WireEncoding",
    "ack_event",
    "commit_event",
    "analysis_event",
    "encode_event",
    "end_event",
    "error_event",
    "generation_event",
    "generation_options",
    "nests_deeper",
    "pack_audio",
    "parse_control",
    "parse_start",
    "patterns_event",
    "ready_event",
    "unpack_audio",
    "updated_generation_config",
]
