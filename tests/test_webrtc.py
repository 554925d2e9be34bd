"""The WebRTC transport with a real aiortc client (no browser): Opus audio in, events on the data
channel, generated audio on the server's track, refusals, and nothing left behind."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import soxr

from clients.webrtc_client import FRAME, TAIL_FRAMES, WebRtcClient, _post_json
from models.training.synth import synthesize
from tests.conftest import RunningServer, run_server, tone
from tests.test_trained_model import MIN_WORD_RECALL, SENTENCES, VOICE, word_recall


@pytest.fixture(scope="module")
def rtc_server() -> Iterator[RunningServer]:
    with run_server(generator="tiny", analysis_model="tiny", max_sessions=2) as running:
        yield running


def offer_url(server: RunningServer) -> str:
    return server.http + "/v1/webrtc/offer"


async def test_held_out_speech_through_opus_is_transcribed(rtc_server: RunningServer) -> None:
    """Two sentences of unseen text (never trained on), 48 kHz stereo through Opus: the finals hold
    most of their words (the same threshold as over WebSocket, tests/test_trained_model.py).
    The pause after each is long enough for a chunk without speech, so each is an utterance."""
    texts = SENTENCES[3:5]
    pause = np.zeros(int(1.6 * 16000), np.float32)
    speech = np.concatenate([part for text in texts for part in (synthesize(text, VOICE), pause)])
    wire = soxr.resample(speech, 16000, 48000).astype(np.float32)
    result = await WebRtcClient(offer_url(rtc_server), {}).run(
        np.repeat(wire[:, None], 2, 1), 48000
    )
    assert not result.errors and result.end is not None
    reference = " ".join(texts)
    assert word_recall(reference, result.transcript) >= MIN_WORD_RECALL["auto"], (
        reference,
        result.transcript,
    )


async def test_a_session_over_webrtc(rtc_server: RunningServer, speech_wav: Any) -> None:
    import soundfile as sf

    speech, rate = sf.read(speech_wav, dtype="float32", always_2d=True)
    stereo = np.repeat(speech, 2, axis=1)
    config = {
        "chunk_seconds": 1.0,
        "generation": {"triggers": ["interval"], "interval_seconds": 2.0, "seconds": 1.0},
    }
    result = await WebRtcClient(offer_url(rtc_server), config).run(stereo, rate)

    assert result.events[0]["type"] == "ready"
    assert result.ready["sample_rate"] == 48_000 and result.ready["generator"]["model"] == "tiny"
    # Opus over UDP: everything sent arrived, plus at most the silent tail (whole 20 ms frames:
    # the last one padded). The server holds no packet back (webrtc_receiver.py).
    sent = result.samples_sent
    received = result.end["samples_received"]
    assert sent <= received <= sent + (TAIL_FRAMES + 1) * FRAME
    analysis = result.analysis
    assert len(analysis) == result.end["chunks"] >= int(len(speech) / rate)
    assert [e["seq"] for e in analysis] == list(range(len(analysis)))
    assert result.transcript  # the trained tiny model heard words through Opus
    # Generated audio came back on the track: the frames played carry sound.
    done = [e for e in result.events if e["type"] == "generation.done"]
    assert done and all(e["sample_rate"] == 48_000 for e in done)
    played = result.played_audio
    frames = np.abs(played[: len(played) // FRAME * FRAME]).reshape(-1, FRAME)
    loud_frames = int((frames.max(axis=1) > 1e-3).sum())
    assert loud_frames >= 40  # at least 0.8 s of the 1 s clips made it out


async def test_control_messages_on_the_data_channel(rtc_server: RunningServer) -> None:
    client = WebRtcClient(offer_url(rtc_server))

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "analysis" and event["seq"] == 0:
            message = {"type": "generate", "prompt": "bells", "seconds": 1.0, "seed": 3}
            asyncio.ensure_future(client.send_control(message))
            asyncio.ensure_future(client.send_control({"type": "dance"}))

    client.on_event = on_event
    result = await client.run(tone(2.5, 16_000), 16_000)
    kinds = [e["type"] for e in result.events]
    assert "generation.done" in kinds and kinds[-1] == "end"
    assert [e["code"] for e in result.errors] == ["unknown_message_type"]


def test_refusals_are_json_errors_with_http_status(rtc_server: RunningServer) -> None:
    url = offer_url(rtc_server)
    # The module's earlier sessions may still be closing (their last utterance decoded, their
    # context written): let them go first, so that anything left afterwards is the refusals'.
    state = rtc_server.app.state
    for _ in range(100):
        if not state.sessions.sessions and not state.webrtc_peers:
            break
        time.sleep(0.1)
    assert not state.sessions.sessions and not state.webrtc_peers
    bad = urllib.request.Request(url, b"not json", {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad, timeout=10)
    assert info.value.code == 400
    assert json.loads(info.value.read())["code"] == "invalid_offer"
    answer = _post_json(url, {"type": "offer", "sdp": "v=0 nonsense"})
    assert answer["type"] == "error" and answer["code"] == "invalid_offer"
    answer = _post_json(url, {"type": "offer", "sdp": "x", "config": {"chunk_seconds": 99}})
    assert answer["code"] == "invalid_config"
    # Nothing was left behind by the refusals.
    assert not state.sessions.sessions and not state.webrtc_peers


def test_token_and_session_limit() -> None:
    with run_server(token="s3cret", max_sessions=1) as server:
        url = offer_url(server)
        answer = _post_json(url, {"type": "offer", "sdp": "x"})
        assert answer["code"] == "unauthorized"


async def test_peers_tasks_and_threads_are_released() -> None:
    before = {t.ident for t in threading.enumerate()}
    with run_server() as server:
        # A first session starts the pools that live as long as the server (the engines'
        # executors, asyncio's default executor); after it, sessions must add no threads.
        await WebRtcClient(offer_url(server)).run(tone(1.0, 48_000), 48_000)
        loop_threads = {t.ident for t in threading.enumerate()}
        for _ in range(2):
            result = await WebRtcClient(offer_url(server)).run(tone(1.0, 48_000), 48_000)
            assert result.end is not None
        manager, peers = server.app.state.sessions, server.app.state.webrtc_peers
        for _ in range(50):
            if not peers and not manager.sessions:
                break
            await asyncio.sleep(0.1)
        assert not peers and not manager.sessions
        # No thread outlives its session. (asyncio's default executor may add a worker when
        # it is busy: a bounded pool, not a leak.)
        time.sleep(0.5)
        extra = [
            t.name
            for t in threading.enumerate()
            if t.ident not in loop_threads and not t.name.startswith("asyncio_")
        ]
        assert not extra
    # And the server's own are gone with it (this test's own loop keeps its executor thread).
    time.sleep(0.5)
    left = [t.name for t in threading.enumerate() if t.ident not in before]
    assert all(name.startswith("asyncio_") for name in left), left


async def open_raw_peer(server: RunningServer) -> tuple[Any, Any, asyncio.Event]:
    """An aiortc peer that connects, streams a tone, and never says stop."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from clients.webrtc_client import _FileTrack

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(_FileTrack(tone(30.0, 48_000)).track)
    channel = pc.createDataChannel("events")
    ready = asyncio.Event()
    channel.on("message", lambda m: ready.set() if json.loads(m)["type"] == "ready" else None)
    await pc.setLocalDescription(await pc.createOffer())
    body = {"type": "offer", "sdp": pc.localDescription.sdp}
    answer = await asyncio.to_thread(_post_json, offer_url(server), body)
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
    await asyncio.wait_for(ready.wait(), 20)
    return pc, channel, ready


async def test_a_client_that_vanishes_and_a_server_that_shuts_down() -> None:
    with run_server() as server:
        manager, peers = server.app.state.sessions, server.app.state.webrtc_peers
        pc, _, _ = await open_raw_peer(server)
        assert len(peers) == 1
        await pc.close()  # gone without a stop
        for _ in range(100):
            if not peers and not manager.sessions:
                break
            await asyncio.sleep(0.1)
        assert not peers and not manager.sessions

        pc, channel, _ = await open_raw_peer(server)
        closed = asyncio.Event()
        pc.on(
            "connectionstatechange",
            lambda: closed.set() if pc.connectionState in ("closed", "failed") else None,
        )
        channel.on("close", closed.set)
        server.server.should_exit = True  # a graceful shutdown with a live WebRTC session
        server.thread.join(30)
        assert not server.thread.is_alive()
        await asyncio.wait_for(closed.wait(), 30)  # the server closed its side
        await pc.close()
