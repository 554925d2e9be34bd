"""The OpenAI-Realtime translator without a socket: client events in, requests and the API's
events out; session events (dicts, as the outbox gives them) in, the API's events out."""

from __future__ import annotations

import base64
import json
from typing import Any

from stream.core.audio.turns import TurnSettings
from stream.protocol.realtime import Append, Clear, Commit, Configure, RealtimeConfig, Translator

COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


def translator(**config: Any) -> Translator:
    return Translator("sess_1", RealtimeConfig(**config))


def analysis(start: float, partial: str = "", turns=(), finals=()) -> dict[str, Any]:
    final = finals[0] if len(finals) == 1 else None
    transcript = {"text": "", "partial": partial, "final": final}
    if len(finals) > 1:
        transcript["finals"] = list(finals)
    event = {"type": "analysis", "start": start, "end": start + 1.0, "transcript": transcript}
    if turns:
        event["turns"] = [{"speech": k, "at": at, "detected": at + 0.6} for k, at in turns]
    return event


def final(text: str, end: float) -> dict[str, Any]:
    return {"text": text, "start": 0.0, "end": end, "words": []}


def kinds(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


def test_a_turn_opens_an_item_its_words_stream_and_its_end_completes_it() -> None:
    t = translator()
    out = t.session_event(analysis(0.0, "HELLO WOR", turns=[("started", 0.3)]))
    assert kinds(out) == ["input_audio_buffer.speech_started", DELTA]
    assert out[0]["audio_start_ms"] == 0 and out[1]["delta"] == "HELLO "  # whole words only
    item = out[0]["item_id"]
    out = t.session_event(analysis(1.0, "", turns=[("stopped", 1.7)],
                                   finals=[final("HELLO WORLD", 1.7)]))  # fmt: skip
    assert kinds(out) == [
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "conversation.item.added", DELTA, COMPLETED,
    ]  # fmt: skip
    assert out[0]["audio_end_ms"] == 2300 and {e.get("item_id") for e in out} >= {item}
    assert out[3]["delta"] == "WORLD" and out[4]["transcript"] == "HELLO WORLD"
    assert out[4]["usage"] == {"type": "duration", "seconds": 1.4}
    # The next turn is a new item after this one, its audio padded back to the last end.
    out = t.session_event(analysis(2.0, "", turns=[("started", 1.9)]))
    assert out[0]["item_id"] != item and out[0]["audio_start_ms"] == 1700


def test_a_revised_word_is_not_sent_twice_and_completed_says_the_truth() -> None:
    t = translator()
    t.session_event(analysis(0.0, "THE FORE ", turns=[("started", 0.0)]))
    out = t.session_event(analysis(1.0, "THE FORK BEFORE "))  # beam search revised FORE
    assert out == []
    out = t.session_event(analysis(2.0, turns=[("stopped", 2.5)],
                                   finals=[final("THE FORK BEFORE NIGHT", 2.5)]))  # fmt: skip
    assert DELTA not in kinds(out) and out[-1]["transcript"] == "THE FORK BEFORE NIGHT"


def test_two_turns_in_one_chunk_complete_two_items() -> None:
    t = translator()
    t.session_event(analysis(0.0, turns=[("started", 0.1)]))
    out = t.session_event(analysis(
        1.0, turns=[("stopped", 1.2), ("started", 1.5), ("stopped", 1.8)],
        finals=[final("ONE", 1.2), final("TWO", 1.8)],
    ))  # fmt: skip
    completed = [e for e in out if e["type"] == COMPLETED]
    assert [e["transcript"] for e in completed] == ["ONE", "TWO"]
    assert completed[0]["item_id"] != completed[1]["item_id"]


def test_client_commits_without_vad() -> None:
    t = translator(turns=None)
    requests, replies = t.client_event(json.dumps({"type": "input_audio_buffer.commit"}))
    assert requests == [] and replies[0]["error"]["code"] == "input_audio_buffer_commit_empty"
    audio = base64.b64encode(bytes(4800)).decode()  # 100 ms of PCM16 at 24 kHz
    requests, _ = t.client_event(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
    assert requests == [Append(bytes(4800))]
    assert t.client_event(json.dumps({"type": "input_audio_buffer.commit"}))[0] == [Commit()]
    # Text opens the item; the commit, cut at 1.0 s, commits it; the session's `commit` event
    # (the audio up to the cut analysed) completes it.
    delta = t.session_event(analysis(0.0, "YES "))
    committed = t.committed(1.0)
    assert kinds(committed) == ["input_audio_buffer.committed", "conversation.item.added"]
    done = t.session_event({"type": "commit", "at": 1.0, "turns": [],
                            "transcript": {"final": final("YES", 1.0)}})  # fmt: skip
    ids = [e["item_id"] for e in delta + committed + done if "item_id" in e]
    assert ids == ["item_000001"] * 3 and committed[1]["item"]["id"] == "item_000001"
    assert done[-1]["transcript"] == "YES"


def test_clear_drops_what_was_said() -> None:
    t = translator(turns=None)
    assert t.client_event(json.dumps({"type": "input_audio_buffer.clear"}))[0] == [Clear()]
    t.session_event(analysis(0.0, "NOISE "))
    t.cleared(0.5)
    assert t.session_event({"type": "commit", "at": 0.5, "turns": [], "transcript": {}}) == []


def test_the_older_form_is_answered_in_it() -> None:
    t = translator()
    update = {"type": "transcription_session.update", "session": {
        "input_audio_format": "g711_alaw", "turn_detection": {"type": "server_vad",
        "silence_duration_ms": 900}}}  # fmt: skip
    requests, replies = t.client_event(json.dumps(update))
    (configure,) = requests
    assert isinstance(configure, Configure) and configure.config.sample_rate == 8000
    assert configure.config.turns == TurnSettings(min_silence_ms=900)
    assert replies[0]["type"] == "transcription_session.updated"
    assert replies[0]["session"]["input_audio_format"] == "g711_alaw"


def test_our_events_only_on_request() -> None:
    event = {"type": "ack", "samples": 16000}
    assert translator().session_event(event) == []
    (wrapped,) = translator(grym_events=True).session_event(event)
    assert wrapped["type"] == "grym.event" and wrapped["event"] == event
