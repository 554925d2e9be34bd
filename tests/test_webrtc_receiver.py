"""The low-latency audio receive buffer (stream/transports/webrtc_receiver.py), and the aiortc
internals it relies on: these tests fail loudly when an aiortc upgrade moves or changes them."""

from __future__ import annotations

import asyncio
import fractions
from types import SimpleNamespace
from typing import Any

import aiortc
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.codecs.opus import OpusEncoder
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtcrtpparameters import RTCRtpCodecParameters, RTCRtpReceiveParameters
from aiortc.rtcrtpreceiver import RemoteStreamTrack, RTCRtpReceiver
from aiortc.rtp import RtpPacket

from stream.transports.webrtc_receiver import (
    ASSUMED_AIORTC_RECEIVER,
    BUFFER_ATTRIBUTE,
    AiortcReceiverChanged,
    AudioReceiveBuffer,
    check_aiortc_receiver,
    use_audio_receive_buffer,
)


def packet(seq: int, payload: bytes = b"x") -> RtpPacket:
    p = RtpPacket(payload_type=96, sequence_number=seq % 65536, timestamp=seq * 960 % 2**32)
    p._data = payload  # type: ignore[attr-defined]  # what the receiver sets before add()
    return p


def run(buffer: AudioReceiveBuffer, seqs: list[int]) -> list[int | None]:
    """What each add() passes on: the frame's sequence (via its timestamp), or None."""
    out: list[int | None] = []
    for seq in seqs:
        pli, frame = buffer.add(packet(seq))
        assert pli is False
        out.append(None if frame is None else frame.timestamp // 960 % 65536)
    return out


def test_each_packet_passes_on_as_it_arrives_in_sequence_order() -> None:
    buffer = AudioReceiveBuffer()
    assert run(buffer, [10, 11, 12]) == [10, 11, 12]
    # 13 lost, 15 before 14: each newer one passes at once; the late 14 and a duplicate do not.
    assert run(buffer, [15, 14, 16, 16, 17]) == [15, None, 16, None, 17]
    assert buffer.dropped == 2 and buffer.passed == 6
    assert run(buffer, [17 - 99]) == [None]  # still a late packet, not a new sequence
    # Far behind: the sender started a new sequence; it is followed from there.
    assert run(buffer, [40000, 40001]) == [40000, 40001]
    # An empty packet (padding) uses its number but has nothing to decode.
    pli, frame = buffer.add(packet(40002, b""))
    assert frame is None and run(buffer, [40003]) == [40003]
    # The sequence number wraps.
    wrapping = AudioReceiveBuffer()
    assert run(wrapping, [65534, 65535, 65536, 65535, 65537]) == [65534, 65535, 0, None, 1]


def test_holding_one_packet_puts_a_swapped_pair_back_in_order() -> None:
    buffer = AudioReceiveBuffer(hold=1)
    assert run(buffer, [1, 2, 4, 3, 5, 6]) == [None, 1, 2, 3, 4, 5]
    assert run(buffer, [8, 7, 9]) == [6, 7, 8]  # 7 arrives after 8: still in time
    assert run(buffer, [9, 11, 12, 10]) == [None, 9, 11, None]  # a duplicate; 10 too late
    with pytest.raises(ValueError):
        AudioReceiveBuffer(hold=2)


def fake_transport() -> Any:
    """Just enough of an RTCDtlsTransport for a receiver that is fed packets by hand."""
    return SimpleNamespace(
        state="connected",
        _register_rtp_receiver=lambda receiver, parameters: None,
        _unregister_rtp_receiver=lambda receiver: None,
    )


def opus_packets(count: int) -> list[RtpPacket]:
    """`count` 20 ms Opus packets of a tone, as a sender puts them on the wire."""
    import av

    encoder = OpusEncoder()
    packets = []
    t = np.arange(960 * count) / 48000
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    for i in range(count):
        frame = av.AudioFrame.from_ndarray(pcm[None, i * 960 : (i + 1) * 960], "s16", "mono")
        frame.sample_rate, frame.pts = 48000, i * 960
        frame.time_base = fractions.Fraction(1, 48000)
        payloads, timestamp = encoder.encode(frame)
        packets += [
            RtpPacket(payload_type=96, sequence_number=i, timestamp=timestamp, payload=p)
            for p in payloads
        ]
    return packets


async def frames_after_each_packet(receiver: RTCRtpReceiver, count: int) -> list[int]:
    """Feed `count` Opus packets to a real aiortc receiver, one at a time; after each, how many
    decoded frames its track has delivered so far."""
    track = receiver._track = RemoteStreamTrack(kind="audio")
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=96)
    await receiver.receive(RTCRtpReceiveParameters(codecs=[opus]))
    delivered, counts = 0, []
    try:
        for p in opus_packets(count):
            await receiver._handle_rtp_packet(p, arrival_time_ms=0)
            while True:
                try:
                    frame = await asyncio.wait_for(track.recv(), 0.3)
                except TimeoutError:
                    break
                assert frame.sample_rate == 48000 and frame.samples == 960
                delivered += 1
            counts.append(delivered)
    finally:
        await receiver.stop()
    return counts


async def test_aiortc_receiver_internals_are_as_assumed() -> None:
    """What the swap relies on, in the aiortc installed: the audio receiver keeps a JitterBuffer
    (capacity 16, prefetch 4) at BUFFER_ATTRIBUTE, calls its add() per packet, and decodes what
    it returns. With it, no audio leaves before the 5th packet; with ours, every packet at once."""
    assert aiortc.__version__.rsplit(".", 1)[0] in ASSUMED_AIORTC_RECEIVER["versions"], (
        f"aiortc {aiortc.__version__}: check stream/transports/webrtc_receiver.py against it "
        "and add the version to ASSUMED_AIORTC_RECEIVER"
    )
    stock = RTCRtpReceiver("audio", fake_transport())
    buffer = getattr(stock, BUFFER_ATTRIBUTE)
    assert isinstance(buffer, JitterBuffer)
    assert buffer.capacity == ASSUMED_AIORTC_RECEIVER["capacity"]
    assert buffer._prefetch == ASSUMED_AIORTC_RECEIVER["prefetch"]
    assert await frames_after_each_packet(stock, 6) == [0, 0, 0, 0, 1, 2]

    ours = RTCRtpReceiver("audio", fake_transport())
    setattr(ours, BUFFER_ATTRIBUTE, AudioReceiveBuffer())
    check_aiortc_receiver(ours)
    assert await frames_after_each_packet(ours, 6) == [1, 2, 3, 4, 5, 6]

    with pytest.raises(AiortcReceiverChanged):
        check_aiortc_receiver(SimpleNamespace())  # a receiver without that attribute


async def test_a_peer_connection_gets_it_on_audio_receivers_only() -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio")
        pc.addTransceiver("video")
        assert use_audio_receive_buffer(pc) == 1
        assert use_audio_receive_buffer(pc) == 0  # already done
        kinds = {t.kind: getattr(t.receiver, BUFFER_ATTRIBUTE) for t in pc.getTransceivers()}
        assert isinstance(kinds["audio"], AudioReceiveBuffer)
        assert not isinstance(kinds["video"], AudioReceiveBuffer)
    finally:
        await pc.close()


async def test_a_changed_receiver_keeps_its_buffer_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = SimpleNamespace()
    pc = SimpleNamespace(getTransceivers=lambda: [SimpleNamespace(kind="audio", receiver=receiver)])
    assert use_audio_receive_buffer(pc) == 0
    assert not hasattr(receiver, BUFFER_ATTRIBUTE)
    assert "keeping aiortc's own audio jitter buffer" in caplog.text
