"""Client -> server: the `start` message and its config, control messages, their limits and
parsing (strict: a wrong type is an error, not a guess)."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from stream.core.audio.pcm import Encoding, PcmFormat
from stream.core.steps.prompts import DEFAULT_NEGATIVE, TEMPLATES
from stream.core.steps.triggers import (
    AfterSpeechTrigger,
    IntervalTrigger,
    NoveltyTrigger,
    TriggerStep,
    check_hysteresis,
)
from stream.protocol.errors import CloseCode, ProtocolError

PROTOCOL_VERSION = 1
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000
CONTROL_TYPES = ("stop", "generate", "cancel", "config")
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # whole ids only: fullmatch
# W3C trace context, version 00: trace id, parent span id, flags (lower-case hex; ids not zero).
TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
# Text messages are refused before parsing beyond these: the largest real message (a start with
# an inline pipeline) is a few KB and nests five levels, and json.loads recurses per level.
MAX_TEXT_CHARS = 65536
MAX_JSON_DEPTH = 32


# An encoding field of a strict message model: given by its value, as JSON carries it.
WireEncoding = Annotated[Encoding, Field(strict=False)]


class SessionConfig(BaseModel):
    """Per-session options a client may send in `start.config`; None = the server's default.

    Strict, like every message model here: `"chunk_seconds": "1"` or `"steps": 10.5` are
    errors, not guesses (a number may be given for a float, and enums by their value)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    chunk_seconds: float | None = Field(None, ge=0.1, le=30.0)
    left_context_seconds: float | None = Field(None, ge=0.0, le=30.0)
    lookahead_seconds: float | None = Field(None, ge=0.0, le=5.0)
    # "skip": live audio; when analysis falls behind, the oldest waiting chunks are skipped
    # (and counted) so latency stays bounded. "wait": never skip; the server stops reading
    # from the socket until analysis catches up (back-pressure reaches the sender).
    when_behind: Literal["skip", "wait"] | None = None
    # Mean-pooled wav2vec2 embedding per chunk in each analysis event (about 2 KB each).
    embeddings: bool | None = None
    # Per-stage server timings in each analysis event (`timing`, milliseconds): for latency
    # benchmarks and for clients that want to see where a chunk's time went.
    timing: bool | None = None
    # How CTC output becomes the transcript: greedy, beam (beam search, with the model's
    # character LM where it has one) or auto (beam search where the model has an LM).
    ctc_decoder: Literal["auto", "greedy", "beam"] | None = None
    # End of speech: where utterances (transcript finals) end; unset fields: the server's.
    turn_detection: TurnDetection | None = None
    # The session's pipeline (docs/pipelines.md): a preset's name, or a pipeline declared inline
    # (checked by the server); absent = the server's default pipeline.
    pipeline: str | dict[str, Any] | None = None
    # Generation from the session's context, in a flat form: its options, context and triggers
    # replace the pipeline's.
    generation: GenerationConfig | None = None


class TurnDetection(BaseModel):
    """`start.config.turn_detection` (stream/core/audio/turns.py); None = the server's setting.
    `enabled: false`: no turns from voice activity; utterances end only with the stream (or,
    on /v1/realtime, at the client's commits)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = True
    threshold: float | None = Field(None, ge=0.05, le=0.95)
    min_speech_ms: int | None = Field(None, ge=0, le=5000)
    min_silence_ms: int | None = Field(None, ge=20, le=10000)
    prefix_padding_ms: int | None = Field(None, ge=0, le=5000)


class GenerationOptions(BaseModel):
    """What one generation makes: the fields a `generate` message may override."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field("", max_length=500)  # the user's words; they lead the prompt
    negative_prompt: str = Field(DEFAULT_NEGATIVE, max_length=500)
    auto_prompt: bool = True  # add words derived from the context window (prompts.py)
    template: str = "ambient"
    # variation: re-imagine the window's audio; continuous: an endless stream of segments
    mode: Literal["text", "variation", "continuous"] = "text"
    strength: float = Field(0.6, ge=0.0, le=1.0)  # variation only: 0 = the source itself
    seconds: float = Field(5.0, ge=0.5, le=30.0)
    steps: int = Field(10, ge=1, le=100)
    guidance: float = Field(2.5, ge=0.0, le=20.0)
    scheduler: Literal["dpm++", "ddim"] = "dpm++"
    # Opt-in approximations (faster, a measured distance from the exact clip: BENCHMARKS.md):
    # guidance on the first `guidance_until` of the steps only; the whole UNet every n-th step;
    # a clip's first rows decoded on their own.
    guidance_until: float = Field(1.0, ge=0.0, le=1.0)
    deep_cache_interval: int = Field(1, ge=1, le=10)
    progressive_vae: bool = False  # a clip's first audio before the whole VAE decode
    seed: int | None = Field(None, ge=0, lt=2**32)  # None: a fresh seed, reported in the events
    # continuous: each segment is `seconds` long and adds `hop_seconds` of new audio (None: half
    # of `seconds`); the rest continues the segment before, joined by a crossfade.
    hop_seconds: float | None = Field(None, ge=0.2, le=29.0)
    crossfade_seconds: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _hop_within_segment(self) -> GenerationOptions:
        if self.hop_seconds is not None and self.hop_seconds >= self.seconds:
            raise ValueError("hop_seconds must be shorter than seconds (the rest is the overlap)")
        return self

    @property
    def hop(self) -> float:
        """New audio per segment of a continuous stream, in seconds."""
        return self.hop_seconds if self.hop_seconds is not None else self.seconds / 2

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value not in TEMPLATES:
            raise ValueError(f"unknown template {value!r}; one of {', '.join(TEMPLATES)}")
        return value


# The built-in trigger steps the flat form names in `triggers`, in the priority order the protocol
# documents, and which option of each its fields set: {step: {option: flat field}}. The steps'
# Options (stream/core/steps/triggers.py) declare the defaults and limits; stream/pipeline.py
# translates between the two forms with this table.
FLAT_TRIGGERS: dict[type[TriggerStep], dict[str, str]] = {
    AfterSpeechTrigger: {"min_speech_seconds": "min_speech_seconds",
                         "cooldown_seconds": "cooldown_seconds"},
    NoveltyTrigger: {"on": "novelty_on", "off": "novelty_off",
                     "cooldown_seconds": "cooldown_seconds"},
    IntervalTrigger: {"seconds": "interval_seconds"},
}  # fmt: skip


def _trigger_field(flat: str) -> Any:
    """Flat field `flat` with the default and limits of the step options it sets (which must
    agree where it sets several: `cooldown_seconds`)."""
    declared = set()
    for step, options in FLAT_TRIGGERS.items():
        for option, name in options.items():
            if name == flat:
                default = {f.name: f.default for f in dataclasses.fields(step.Options)}[option]
                hint = get_type_hints(step.Options, include_extras=True)[option]
                declared.add((hint, default))
    if len(declared) != 1:
        raise TypeError(f"the trigger steps that {flat} configures declare it differently")
    ((hint, default),) = declared
    return FieldInfo.from_annotated_attribute(hint, default)


class GenerationConfig(GenerationOptions):
    """`start.config.generation`: when to generate, from how much context, and what comes back."""

    triggers: list[Literal["interval", "novelty", "after_speech"]] = Field(default_factory=list)
    # The trigger steps' options, flat (FLAT_TRIGGERS): defaults and limits are the steps' own.
    interval_seconds: float = _trigger_field("interval_seconds")
    novelty_on: float = _trigger_field("novelty_on")
    novelty_off: float = _trigger_field("novelty_off")
    cooldown_seconds: float = _trigger_field("cooldown_seconds")
    min_speech_seconds: float = _trigger_field("min_speech_seconds")
    window_seconds: float = Field(10.0, ge=1.0, le=60.0)  # the rolling context
    sample_rate: int | None = Field(None, ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE)  # None: 16 kHz
    encoding: WireEncoding = Encoding.PCM_S16LE  # of the audio frames sent back

    @model_validator(mode="after")
    def _hysteresis(self) -> GenerationConfig:
        check_hysteresis(self.novelty_on, self.novelty_off, ("novelty_on", "novelty_off"))
        return self


class StartMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["start"]
    sample_rate: int
    channels: int
    encoding: WireEncoding
    session: str | None = None
    config: SessionConfig = Field(default_factory=SessionConfig)
    token: str | None = None
    # Resuming `session` after a lost connection: the events numbered above `last_event` (the
    # last one the client received) are sent again, then the session goes on.
    resume: bool = False
    last_event: int = Field(0, ge=0)
    # The client's span (W3C `traceparent`): with --otel-endpoint the session's trace goes on
    # from it. The WebSocket upgrade's `traceparent` header does the same; this one wins.
    traceparent: str | None = None

    @field_validator("traceparent")
    @classmethod
    def _w3c_traceparent(cls, value: str | None) -> str | None:
        if value is not None and not TRACEPARENT.fullmatch(value):
            raise ValueError("traceparent must be W3C trace context: 00-<32 hex>-<16 hex>-<2 hex>")
        return value

    @model_validator(mode="after")
    def _resume_names_a_session(self) -> StartMessage:
        if self.resume and self.session is None:
            raise ValueError("resume needs the session's id in 'session'")
        return self

    @property
    def format(self) -> PcmFormat:
        return PcmFormat(self.sample_rate, self.channels, self.encoding)


def _load_object(text: str, code: str, close: CloseCode | None) -> dict[str, Any]:
    if len(text) > MAX_TEXT_CHARS:
        raise ProtocolError(
            code, f"text frame of {len(text)} characters exceeds the limit of {MAX_TEXT_CHARS}",
            close,
        )  # fmt: skip
    if nests_deeper(text, MAX_JSON_DEPTH):
        raise ProtocolError(
            code, f"text frame nests JSON deeper than {MAX_JSON_DEPTH} levels", close
        )  # fmt: skip
    try:
        message = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(code, f"text frame is not valid JSON: {exc}", close) from None
    if not isinstance(message, dict):
        raise ProtocolError(code, "text frame must be a JSON object with a 'type' field", close)
    return message


def nests_deeper(text: str, limit: int) -> bool:
    """Whether JSON `text`'s arrays and objects nest deeper than `limit`, found without parsing
    it (brackets inside strings do not count). Ordinary messages cost two counts: only text
    with more brackets than the limit is scanned."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def header_traceparent(value: str | None) -> str | None:
    """A `traceparent` HTTP header's value if it is W3C trace context, else None: a malformed
    header is ignored, as the W3C spec asks (the session starts a trace of its own)."""
    value = (value or "").strip()
    return value if TRACEPARENT.fullmatch(value) else None


def parse_start(text: str) -> StartMessage:
    """Validate the first message; every failure is fatal, with the code the protocol names."""
    policy, unsupported = CloseCode.POLICY_VIOLATION, CloseCode.UNSUPPORTED_DATA
    message = _load_object(text, "invalid_start", policy)
    if message.get("type") != "start":
        raise ProtocolError(
            "invalid_start",
            f'the first message must be {{"type": "start", ...}}, got type {message.get("type")!r}',
            policy,
        )
    rate = message.get("sample_rate")
    if (
        not isinstance(rate, int)
        or isinstance(rate, bool)
        or not (MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE)
    ):
        raise ProtocolError(
            "unsupported_sample_rate",
            f"sample_rate must be an integer from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz, "
            f"got {rate!r}",
            unsupported,
        )
    if type(message.get("channels")) is not int or message["channels"] not in (1, 2):
        raise ProtocolError(
            "unsupported_channels",
            f"channels must be 1 or 2, got {message.get('channels')!r}",
            unsupported,
        )
    if message.get("encoding") not in [e.value for e in Encoding]:
        raise ProtocolError(
            "unsupported_encoding",
            f"encoding must be one of {[e.value for e in Encoding]}, got "
            f"{message.get('encoding')!r}",
            unsupported,
        )
    session = message.get("session")
    if session is not None and not (isinstance(session, str) and SESSION_ID.fullmatch(session)):
        raise ProtocolError(
            "invalid_start", "session must be 1-64 characters of A-Z a-z 0-9 _ -", policy
        )
    try:
        return StartMessage.model_validate(message)
    except ValidationError as exc:
        code = (
            "invalid_config"
            if any(e["loc"][:1] == ("config",) for e in exc.errors())
            else "invalid_start"
        )
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'start'}: {e['msg']}" for e in exc.errors()
        )
        raise ProtocolError(code, f"invalid start message: {details}", policy) from None


def parse_control(text: str) -> dict[str, Any]:
    """A text frame after `start`. Unknown or malformed messages are recoverable errors."""
    message = _load_object(text, "invalid_message", None)
    kind = message.get("type")
    if kind not in CONTROL_TYPES:
        raise ProtocolError(
            "unknown_message_type",
            f"unknown message type {kind!r}; after start the server accepts {list(CONTROL_TYPES)}"
            " as text and PCM audio as binary frames",
        )
    generation = message.get("id")
    if kind == "cancel" and (not isinstance(generation, int) or isinstance(generation, bool)):
        raise ProtocolError("invalid_message", 'cancel needs the generation\'s integer "id"')
    return message


FIXED_FOR_A_SESSION = ("window_seconds", "sample_rate", "encoding")


def updated_generation_config(message: dict[str, Any], base: GenerationConfig) -> GenerationConfig:
    """A `config` message's `generation` fields over the session's; the context window and the
    format of the audio sent back are fixed for a session."""
    changes = message.get("generation")
    if set(message) - {"type", "generation"} or not isinstance(changes, dict):
        raise ProtocolError(
            "invalid_message", 'config takes one field, "generation": {...} (section 9)'
        )
    fixed = sorted(k for k in changes if k in FIXED_FOR_A_SESSION)
    if fixed:
        raise ProtocolError("invalid_message", f"{fixed} cannot change during a session")
    try:
        return GenerationConfig.model_validate({**base.model_dump(), **changes})
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ProtocolError("invalid_message", f"invalid config message: {details}") from None


def generation_options(message: dict[str, Any], base: GenerationOptions) -> GenerationOptions:
    """A `generate` message's fields over the session's generation options."""
    overrides = {k: v for k, v in message.items() if k != "type"}
    fields = set(GenerationOptions.model_fields)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ProtocolError("invalid_message", f"generate does not take {unknown}")
    try:
        return GenerationOptions.model_validate({**base.model_dump(include=fields), **overrides})
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ProtocolError("invalid_message", f"invalid generate message: {details}") from None
