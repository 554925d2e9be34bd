"""An OpenAI-Realtime transcription session's configuration, in both of the API's forms.

The current (GA) form: `session.update` with `{"type": "transcription", "audio": {"input":
{"format", "transcription", "turn_detection", "noise_reduction"}}, "include"}`. The older
(beta) form: `transcription_session.update` with `input_audio_format` (`pcm16`, `g711_ulaw`,
`g711_alaw`), `input_audio_transcription`, `turn_detection`, `input_audio_noise_reduction` and
`include` at the top level. Both read into one `RealtimeConfig`, and the server answers in the
form the client used. Unknown parameters and wrong values are errors, as the API has them;
parameters the API defines that grym-stream has no use for (the transcription model's name, a
prompt, noise reduction, log-probabilities) are kept and echoed but change nothing.

`grym` is our extension (never sent by OpenAI's clients): `{"config": {...}}` is a `start.config`
of our own protocol for the session (pipeline, generation, ...), and `"events": true` asks for
our own events too, as `grym.event` (docs/protocol.md, "OpenAI Realtime").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from stream.core.audio.pcm import Encoding
from stream.core.audio.turns import TurnSettings
from stream.protocol.errors import ProtocolError
from stream.protocol.messages import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SessionConfig, TurnDetection

# (wire name in the GA form, in the beta form) -> (encoding, sample rate)
FORMATS = {
    ("audio/pcm", "pcm16"): (Encoding.PCM_S16LE, 24000),
    ("audio/pcmu", "g711_ulaw"): (Encoding.PCM_MULAW, 8000),
    ("audio/pcma", "g711_alaw"): (Encoding.PCM_ALAW, 8000),
}
GA_FORMAT = {ga: value for (ga, _), value in FORMATS.items()}
BETA_FORMAT = {beta: value for (_, beta), value in FORMATS.items()}


class RealtimeError(ProtocolError):
    """Bad input, in the API's terms: `type` (invalid_request_error, server_error), `code`,
    and the parameter at fault."""

    def __init__(
        self, code: str, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ) -> None:
        super().__init__(code, message)
        self.param = param
        self.kind = kind


@dataclass(frozen=True)
class RealtimeConfig:
    encoding: Encoding = Encoding.PCM_S16LE
    sample_rate: int = 24000
    turns: TurnSettings | None = TurnSettings()  # None: the client commits its turns
    server_turns: TurnSettings = TurnSettings()  # the server's, for what a client leaves out
    transcription: dict[str, Any] = field(default_factory=lambda: {"model": "grym-stream"})
    noise_reduction: dict[str, Any] | None = None
    include: tuple[str, ...] = ()
    grym_config: dict[str, Any] = field(default_factory=dict)  # our start.config
    grym_events: bool = False

    def updated(self, session: Any, beta: bool) -> RealtimeConfig:
        """This configuration with a client's `session` object over it."""
        reader = _Reader(session, "session")
        changes: dict[str, Any] = {}
        if beta:
            audio_format = reader.take("input_audio_format", str)
            if audio_format is not None:
                if audio_format not in BETA_FORMAT:
                    raise _invalid("session.input_audio_format", audio_format, list(BETA_FORMAT))
                changes["encoding"], changes["sample_rate"] = BETA_FORMAT[audio_format]
            self._transcription(reader, "input_audio_transcription", changes)
            self._turns(reader, changes)
            if reader.has("input_audio_noise_reduction"):
                changes["noise_reduction"] = reader.take("input_audio_noise_reduction", dict)
        else:
            kind = reader.take("type", str)
            if kind not in (None, "transcription"):
                raise RealtimeError(
                    "invalid_value",
                    f"grym-stream serves transcription sessions only (session.type "
                    f"'transcription'), not {kind!r}",
                    "session.type",
                )
            audio = _Reader(reader.take("audio", dict) or {}, "session.audio")
            source = _Reader(audio.take("input", dict) or {}, "session.audio.input")
            audio.done()
            self._format(source, changes)
            self._transcription(source, "transcription", changes)
            self._turns(source, changes)
            if source.has("noise_reduction"):
                changes["noise_reduction"] = source.take("noise_reduction", dict)
            source.done()
        include = reader.take("include", list)
        if include is not None:
            changes["include"] = tuple(str(item) for item in include)
        self._grym(reader, changes)
        reader.done()
        return dataclasses.replace(self, **changes)

    def _format(self, source: _Reader, changes: dict[str, Any]) -> None:
        given = source.take("format", dict)
        if given is None:
            return
        fmt = _Reader(given, "session.audio.input.format")
        kind = fmt.take("type", str) or "audio/pcm"
        if kind not in GA_FORMAT:
            raise _invalid("session.audio.input.format.type", kind, list(GA_FORMAT))
        encoding, rate = GA_FORMAT[kind]
        asked = fmt.take("rate", int)
        if asked is not None:
            # The API names 24000 for PCM; any rate the server takes is accepted (G.711: 8000).
            if kind != "audio/pcm" and asked != 8000:
                raise _invalid("session.audio.input.format.rate", asked, [8000])
            if not MIN_SAMPLE_RATE <= asked <= MAX_SAMPLE_RATE:
                raise _invalid("session.audio.input.format.rate", asked, [24000])
            rate = asked
        fmt.done()
        changes["encoding"], changes["sample_rate"] = encoding, rate

    def _transcription(self, source: _Reader, key: str, changes: dict[str, Any]) -> None:
        if source.has(key):
            given = source.take(key, dict)
            changes["transcription"] = dict(given) if given is not None else {}

    def _turns(self, source: _Reader, changes: dict[str, Any]) -> None:
        if not source.has("turn_detection"):
            return
        given = source.take("turn_detection", dict)
        param = f"{source.where}.turn_detection"
        if given is None:
            changes["turns"] = None  # the client commits
            return
        vad = _Reader(given, param)
        kind = vad.take("type", str) or "server_vad"
        if kind != "server_vad":
            raise RealtimeError(
                "invalid_value",
                f"turn_detection type {kind!r} is not supported: grym-stream detects turns "
                "from voice activity (server_vad), or the client commits (turn_detection null)",
                f"{param}.type",
            )
        base = self.turns or self.server_turns
        threshold = vad.take("threshold", float)
        padding = vad.take("prefix_padding_ms", int)
        silence = vad.take("silence_duration_ms", int)
        for ignored in ("create_response", "interrupt_response", "idle_timeout_ms"):
            vad.take(ignored, object)  # they concern model responses: there are none here
        vad.done()
        for name, value, low, high in (
            ("threshold", threshold, 0.05, 0.95),
            ("prefix_padding_ms", padding, 0, 5000),
            ("silence_duration_ms", silence, 20, 10000),
        ):
            if value is not None and not low <= value <= high:
                raise RealtimeError(
                    "invalid_value", f"{name} must be from {low} to {high}, got {value}",
                    f"{param}.{name}",
                )  # fmt: skip
        changes["turns"] = dataclasses.replace(
            base,
            threshold=base.threshold if threshold is None else float(threshold),
            prefix_padding_ms=base.prefix_padding_ms if padding is None else padding,
            min_silence_ms=base.min_silence_ms if silence is None else silence,
        )

    def _grym(self, reader: _Reader, changes: dict[str, Any]) -> None:
        given = reader.take("grym", dict)
        if given is None:
            return
        grym = _Reader(given, "session.grym")
        config = grym.take("config", dict)
        if config is not None:
            try:
                SessionConfig.model_validate(config)
            except ValidationError as exc:
                details = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
                )
                raise RealtimeError(
                    "invalid_value",
                    f"invalid session.grym.config: {details}",
                    "session.grym.config",
                ) from None
            changes["grym_config"] = dict(config)
        events = grym.take("events", bool)
        if events is not None:
            changes["grym_events"] = events
        grym.done()

    def start_config(self) -> SessionConfig:
        """Our protocol's `start.config` for the session: the client's `grym.config`, its turn
        detection, and `wait` (the API never drops audio: a client that sends faster than
        analysis runs is slowed down, not skipped)."""
        turns = self.turns
        detection = (
            TurnDetection(enabled=False) if turns is None else TurnDetection(
                threshold=turns.threshold, min_speech_ms=turns.min_speech_ms,
                min_silence_ms=turns.min_silence_ms, prefix_padding_ms=turns.prefix_padding_ms,
            )
        )  # fmt: skip
        config = SessionConfig.model_validate(self.grym_config)
        return config.model_copy(update={"when_behind": "wait", "turn_detection": detection})

    # --- what the server sends back ---------------------------------------------------------

    def turn_detection(self) -> dict[str, Any] | None:
        if self.turns is None:
            return None
        return {
            "type": "server_vad",
            "threshold": self.turns.threshold,
            "prefix_padding_ms": self.turns.prefix_padding_ms,
            "silence_duration_ms": self.turns.min_silence_ms,
        }

    def describe(self, session_id: str, beta: bool) -> dict[str, Any]:
        """The session object of `session.created` / `.updated` (or the beta form's)."""
        if beta:
            name = next(b for (_, b), v in FORMATS.items() if v[0] is self.encoding)
            return {
                "id": session_id,
                "object": "realtime.transcription_session",
                "input_audio_format": name,
                "input_audio_transcription": self.transcription,
                "turn_detection": self.turn_detection(),
                "input_audio_noise_reduction": self.noise_reduction,
                "include": list(self.include),
            }
        name = next(ga for (ga, _), v in FORMATS.items() if v[0] is self.encoding)
        audio_format: dict[str, Any] = {"type": name}
        if self.encoding is Encoding.PCM_S16LE:
            audio_format["rate"] = self.sample_rate
        return {
            "type": "transcription",
            "id": session_id,
            "object": "realtime.transcription_session",
            "audio": {
                "input": {
                    "format": audio_format,
                    "transcription": self.transcription,
                    "turn_detection": self.turn_detection(),
                    "noise_reduction": self.noise_reduction,
                }
            },
            "include": list(self.include),
        }


class _Reader:
    """Takes a JSON object's fields one by one, checking their types; `done` refuses the rest
    (unknown parameters are errors, as in the API)."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise RealtimeError("invalid_type", f"{where} must be an object", where)
        self.value, self.where, self._taken = value, where, set()

    def has(self, key: str) -> bool:
        return key in self.value

    def take(self, key: str, kind: type) -> Any:
        self._taken.add(key)
        value = self.value.get(key)
        if value is None or kind is object:
            return value
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            raise RealtimeError(
                "invalid_type",
                f"{self.where}.{key} must be {_TYPE_NAMES[kind]}, got {type(value).__name__}",
                f"{self.where}.{key}",
            )
        return value

    def done(self) -> None:
        unknown = sorted(set(self.value) - self._taken)
        if unknown:
            raise RealtimeError(
                "unknown_parameter", f"Unknown parameter: '{self.where}.{unknown[0]}'.",
                f"{self.where}.{unknown[0]}",
            )  # fmt: skip


_TYPE_NAMES = {
    str: "a string", int: "an integer", float: "a number", bool: "a boolean",
    dict: "an object", list: "an array",
}  # fmt: skip


def _invalid(param: str, value: Any, allowed: list[Any]) -> RealtimeError:
    return RealtimeError(
        "invalid_value", f"Invalid value: {value!r}. Supported values are: {allowed}.", param
    )
