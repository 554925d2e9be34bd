"""Between an OpenAI-Realtime transcription client and a grym-stream session, without I/O.

Client events come in as text (`client_event`) and leave as typed requests the transport
carries out on the session (`Append`, `Commit`, `Clear`, `Configure`) or as server events to
send at once (`session.updated`, `error`). The session's own events come in as dicts
(`session_event`) and leave as the API's server events:

- an analysis event's `turns` (stream/core/audio/turns.py): `speech_started` opens an item,
  `speech_stopped` commits it (`input_audio_buffer.speech_stopped`, `.committed`,
  `conversation.item.added`), and the transcript final that ended at the same frame completes
  it (`conversation.item.input_audio_transcription.completed`);
- the utterance's `partial` grows the open item's text: each newly finished word is sent as a
  `...transcription.delta` at once, before the item is committed (the API's order sends
  deltas after `committed`; ours streams them while the words are spoken, under the item id
  that `speech_started` named), and the rest with the final. A text that beam search revised
  after it was sent is not sent again: the completed transcript is the final text, whatever
  the deltas said;
- a client's commit (turn_detection null) is answered with `committed` and
  `conversation.item.added` at once, and completed when the session's `commit` event brings the
  utterance's final.

The translator numbers server events (`event_<n>`) and items (`item_<n>`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from stream.protocol.realtime.config import RealtimeConfig, RealtimeError

MIN_COMMIT_MS = 100  # the API refuses to commit less audio than this


@dataclass
class Append:
    audio: bytes  # in the session's format


@dataclass
class Commit:
    pass


@dataclass
class Clear:
    pass


@dataclass
class Configure:
    """The configuration changed (its format only before any audio arrived)."""

    config: RealtimeConfig


Request = Append | Commit | Clear | Configure


@dataclass
class Item:
    id: str
    start: float  # seconds on the session's timeline
    end: float | None = None  # set once committed
    sent: str = ""  # the text its deltas have given
    cleared: bool = False  # the client cleared the buffer: no transcript is sent


@dataclass
class Translator:
    session_id: str
    config: RealtimeConfig
    beta: bool = False  # the client speaks the older (beta) form
    audio_started: bool = False
    _events: int = 0
    _items: int = 0
    _open: Item | None = None  # the item speech goes into now
    _committed: deque[Item] = field(default_factory=deque)  # by the client, awaiting `commit`
    _previous: str | None = None  # the last item committed
    _buffered: float = 0.0  # seconds of audio appended since the last commit or clear
    _turn_end: float = 0.0  # where the last item ended (prefix padding stops there)

    # --- the client's side ------------------------------------------------------------------

    def created(self) -> dict[str, Any]:
        return self._event("session.created", session=self.config.describe(self.session_id, False))

    def client_event(self, text: str) -> tuple[list[Request], list[dict[str, Any]]]:
        """A client's text message -> what to do with the session, and what to send back."""
        try:
            message = json.loads(text)
        except ValueError as exc:
            return [], [self.error(RealtimeError("invalid_json", f"not valid JSON: {exc}"))]
        if not isinstance(message, dict):
            return [], [self.error(RealtimeError("invalid_json", "a message is a JSON object"))]
        event_id = message.get("event_id") if isinstance(message.get("event_id"), str) else None
        try:
            return self._handle(message, event_id)
        except RealtimeError as error:
            return [], [self.error(error, event_id)]

    def _handle(
        self, message: dict[str, Any], event_id: str | None
    ) -> tuple[list[Request], list[dict[str, Any]]]:
        kind = message.get("type")
        if kind in ("session.update", "transcription_session.update"):
            beta = kind == "transcription_session.update"
            config = self.config.updated(message.get("session"), beta)
            changed = (config.encoding, config.sample_rate) != (
                self.config.encoding, self.config.sample_rate,
            )  # fmt: skip
            if changed and self.audio_started:
                raise RealtimeError(
                    "invalid_value",
                    "the input audio format cannot change once audio has been appended",
                    "session.audio.input.format" if not beta else "session.input_audio_format",
                )
            self.config, self.beta = config, beta
            updated = "transcription_session.updated" if beta else "session.updated"
            reply = self._event(updated, session=config.describe(self.session_id, beta))
            return [Configure(config)], [reply]
        if kind == "input_audio_buffer.append":
            audio = message.get("audio")
            if not isinstance(audio, str):
                raise RealtimeError("invalid_type", "audio must be a base64 string", "audio")
            try:
                data = base64.b64decode(audio, validate=True)
            except (binascii.Error, ValueError):
                raise RealtimeError("invalid_value", "audio is not valid base64", "audio") from None
            width = self.config.encoding.bytes_per_sample
            self._buffered += len(data) / width / self.config.sample_rate
            self.audio_started = True
            return [Append(data)], []
        if kind == "input_audio_buffer.commit":
            if self._buffered * 1000 < MIN_COMMIT_MS:
                raise RealtimeError(
                    "input_audio_buffer_commit_empty",
                    f"buffer too small. Expected at least {MIN_COMMIT_MS}ms of audio, but buffer "
                    f"only has {self._buffered * 1000:.2f}ms of audio.",
                )
            return [Commit()], []
        if kind == "input_audio_buffer.clear":
            self._buffered = 0.0
            return [Clear()], [self._event("input_audio_buffer.cleared")]
        raise RealtimeError(
            "unknown_event" if isinstance(kind, str) else "invalid_event",
            f"grym-stream's transcription sessions take session.update, "
            f"transcription_session.update and input_audio_buffer.append / commit / clear; "
            f"not {kind!r}",
            "type",
        )

    def committed(self, at: float) -> list[dict[str, Any]]:
        """The client's commit was cut at `at` seconds: its item is committed now, and
        completed when the session's `commit` event for `at` comes."""
        item = self._take_open(at)
        item.end = at
        self._committed.append(item)
        self._buffered = 0.0
        return self._commit_events(item)

    def cleared(self, at: float) -> None:
        """The client cleared the buffer, cut at `at`: what it said is dropped."""
        item = self._take_open(at)
        item.end, item.cleared = at, True
        self._committed.append(item)

    # --- the session's side -----------------------------------------------------------------

    def session_event(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """One of the session's events -> the API's (before them, for clients that asked, the
        event itself as `grym.event`)."""
        kind = event.get("type")
        out: list[dict[str, Any]] = []
        if self.config.grym_events:
            out.append(self._event("grym.event", event=event))
        if kind == "analysis":
            out += self._analysis(event)
        elif kind == "commit":
            out += self._client_commit(event)
        elif kind == "error":
            error = RealtimeError(
                event["code"], event["message"],
                kind="server_error" if event["code"] in SERVER_ERRORS else "invalid_request_error",
            )  # fmt: skip
            out.append(self.error(error))
        return out

    def generated_audio(self, header: dict[str, Any], pcm: bytes) -> list[dict[str, Any]]:
        """A block of generated audio: only for clients that asked for our events."""
        if not self.config.grym_events:
            return []
        return [self._event("grym.audio", **header, audio=base64.b64encode(pcm).decode())]

    def _analysis(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        transcript = event.get("transcript") or {}
        finals = transcript.get("finals") or (
            [transcript["final"]] if transcript.get("final") else []
        )
        for turn in event.get("turns", ()):
            if turn["speech"] == "started":
                item = self._open_item(turn["at"])
                padding = self.config.turns.prefix_padding_ms / 1000 if self.config.turns else 0.0
                start = max(self._turn_end, turn["at"] - padding)
                out.append(
                    self._event(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=round(start * 1000), item_id=item.id,
                    )
                )  # fmt: skip
            elif self._committed:
                continue  # the client committed during the turn: no speech_stopped (as the API)
            else:
                item = self._take_open(turn["at"])
                item.end = turn["at"]
                out.append(
                    self._event(
                        "input_audio_buffer.speech_stopped",
                        audio_end_ms=round(turn["detected"] * 1000), item_id=item.id,
                    )
                )  # fmt: skip
                out += self._commit_events(item)
                final = next((f for f in finals if _same_time(f["end"], item.end)), None)
                out += self._complete(item, final)
        partial = transcript.get("partial") or ""
        item = self._committed[0] if self._committed else self._open
        if item is None and partial and self.config.turns is None:
            item = self._open_item(event["start"])  # the client commits: text opens the item
        if item is not None and partial:
            # Whole words only: the word being spoken may still change as its frames arrive
            # (and beam search may revise it), a word followed by another rarely does.
            out += self._delta(item, partial[: partial.rfind(" ") + 1])
        return out

    def _client_commit(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if not self._committed:
            return []
        item = self._committed.popleft()
        final = (event.get("transcript") or {}).get("final")
        return [] if item.cleared else self._complete(item, final)

    def _open_item(self, at: float) -> Item:
        if self._open is None:
            self._items += 1
            self._open = Item(f"item_{self._items:06d}", at)
        return self._open

    def _take_open(self, at: float) -> Item:
        item = self._open_item(at)
        self._open = None
        self._turn_end = at
        return item

    def _commit_events(self, item: Item) -> list[dict[str, Any]]:
        previous, self._previous = self._previous, item.id
        self._buffered = 0.0
        added = "conversation.item.created" if self.beta else "conversation.item.added"
        message = {
            "id": item.id, "object": "realtime.item", "type": "message", "status": "completed",
            "role": "user", "content": [{"type": "input_audio", "transcript": None}],
        }  # fmt: skip
        return [
            self._event("input_audio_buffer.committed", item_id=item.id, previous_item_id=previous),
            self._event(added, previous_item_id=previous, item=message),
        ]

    def _delta(self, item: Item, text: str) -> list[dict[str, Any]]:
        if len(text) <= len(item.sent) or not text.startswith(item.sent):
            return []  # nothing new, or a revision: the completed transcript will say
        delta, item.sent = text[len(item.sent) :], text
        return [
            self._event(
                "conversation.item.input_audio_transcription.delta",
                item_id=item.id, content_index=0, delta=delta,
            )
        ]  # fmt: skip

    def _complete(self, item: Item, final: dict[str, Any] | None) -> list[dict[str, Any]]:
        text = final["text"] if final else ""
        seconds = max(0.0, (item.end or item.start) - item.start)
        completed = self._event(
            "conversation.item.input_audio_transcription.completed",
            item_id=item.id, content_index=0, transcript=text,
            usage={"type": "duration", "seconds": round(seconds, 3)},
        )  # fmt: skip
        if final is not None:
            completed["words"] = final.get("words", [])  # ours: the API's clients ignore it
        return [*self._delta(item, text), completed]

    # --- events -------------------------------------------------------------------------------

    def error(self, error: RealtimeError | Any, event_id: str | None = None) -> dict[str, Any]:
        return self._event(
            "error",
            error={
                "type": getattr(error, "kind", "invalid_request_error"),
                "code": error.code,
                "message": error.message,
                "param": getattr(error, "param", None),
                "event_id": event_id,
            },
        )

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._events += 1
        return {"type": kind, "event_id": f"event_{self._events:06d}", **fields}


def _same_time(a: float, b: float | None) -> bool:
    return b is not None and abs(a - b) < 0.0105


# Our error codes that are the server's fault, not the client's (the API's `server_error`).
SERVER_ERRORS = frozenset(
    {"internal_error", "analysis_failed", "store_unavailable", "server_busy", "generation_failed"}
)
