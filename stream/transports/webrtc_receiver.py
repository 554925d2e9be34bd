"""A low-latency receive buffer for inbound WebRTC audio tracks (aiortc).

aiortc's `RTCRtpReceiver` gives every audio track `JitterBuffer(capacity=16, prefetch=4)`, which
hands a packet to the decoder only once four later ones have arrived: 80 ms at 20 ms packets
before any audio reaches the session (and even `prefetch=0` waits for the next packet, because
that buffer only knows a frame is complete when a packet with another timestamp follows). That
buffer was the largest part of the WebRTC transport's share of latency in `grym-stream bench`.
It also never catches up: it returns at most one frame per packet added, so after a lost packet
(the gap stalls it until it overflows) it lags 14 packets (280 ms) for the rest of the session.

Opus sends one whole frame per RTP packet, so audio needs no reassembly, and a server that
analyses audio (rather than playing it to a loudspeaker) gains nothing from smoothing arrival
jitter: `AudioReceiveBuffer` passes each packet on as it arrives, in sequence order. A packet
that arrives after a later one has been passed on is dropped (late for the decoder), as is a
duplicate; a lost packet is simply missing (20 ms less audio; the Opus decoder goes on). With
`hold=1` it keeps the newest packet back until the next one arrives, so one packet swapped with
its neighbour on the way is still decoded in order, at one packet time of latency.

aiortc offers no hook for the receiver's buffer: it builds the receiver inside
`RTCPeerConnection`, and the buffer is the private attribute `RTCRtpReceiver.__jitter_buffer`.
`use_audio_receive_buffer` replaces that one attribute on the audio receivers of one peer
connection (nothing global, nothing at import time), before any packet arrives. It is checked
against aiortc 1.16 (`ASSUMED_AIORTC_RECEIVER`); `check_aiortc_receiver` fails loudly where a
receiver does not look as assumed, and tests/test_webrtc_receiver.py runs packets through a real
aiortc receiver with the buffer swapped, so an aiortc upgrade that changes this breaks a test.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
# The name-mangled attribute of aiortc's RTCRtpReceiver that holds its jitter buffer, and what it
# holds for audio in the versions this module was checked against.
BUFFER_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"
ASSUMED_AIORTC_RECEIVER = {"versions": ("1.16",), "capacity": 16, "prefetch": 4}
MAX_MISORDER = 100  # as aiortc's own buffer: a packet this far behind means the sender restarted


class AiortcReceiverChanged(RuntimeError):
    """aiortc's receiver no longer keeps its audio jitter buffer where this module replaces it."""


class AudioReceiveBuffer:
    """Drop-in for aiortc's `JitterBuffer` on audio receivers: `add(packet)` returns
    `(pli_flag, JitterFrame | None)` as the receiver expects, the frame as soon as the packet is
    the next one in sequence (`hold=0`), or one packet later (`hold=1`)."""

    def __init__(self, hold: int = 0) -> None:
        if hold not in (0, 1):
            raise ValueError("hold is 0 or 1 packets")
        self.hold = hold
        self._last: int | None = None  # sequence number of the last packet passed on
        self._held: Any = None  # hold=1: the newest packet, not yet passed on
        self.passed = 0
        self.dropped = 0  # late or duplicate packets

    def add(self, packet: Any) -> tuple[bool, Any]:
        from aiortc.utils import uint16_add, uint16_gt

        seq = packet.sequence_number
        if self._last is not None and not uint16_gt(seq, self._last):
            if uint16_add(self._last, -seq) < MAX_MISORDER:
                self.dropped += 1  # late (a later packet is already decoded) or a duplicate
                return False, None
            self._last, self._held = None, None  # far behind: the sender restarted its sequence
        if self.hold == 0:
            return False, self._pass(packet)
        held = self._held
        if held is None:
            self._held = packet
            return False, None
        if seq == held.sequence_number:
            self.dropped += 1
            return False, None
        if uint16_gt(seq, held.sequence_number):
            self._held = packet  # the newer one waits; the held one goes
            return False, self._pass(held)
        return False, self._pass(packet)  # between the last passed and the held one: in order

    def _pass(self, packet: Any) -> Any:
        from aiortc.jitterbuffer import JitterFrame

        self._last = packet.sequence_number
        data = getattr(packet, "_data", packet.payload)  # the receiver's depayloaded frame
        if not data:  # an empty packet (padding): nothing to decode
            return None
        self.passed += 1
        return JitterFrame(data=data, timestamp=packet.timestamp)


def check_aiortc_receiver(receiver: Any) -> None:
    """Raise AiortcReceiverChanged unless `receiver` keeps aiortc's stock audio buffer (or ours)
    at BUFFER_ATTRIBUTE."""
    from aiortc.jitterbuffer import JitterBuffer

    buffer = getattr(receiver, BUFFER_ATTRIBUTE, None)
    if isinstance(buffer, AudioReceiveBuffer):
        return
    if not isinstance(buffer, JitterBuffer) or not callable(getattr(buffer, "add", None)):
        import aiortc

        raise AiortcReceiverChanged(
            f"aiortc {aiortc.__version__}: RTCRtpReceiver has no {BUFFER_ATTRIBUTE} JitterBuffer "
            f"(checked against {ASSUMED_AIORTC_RECEIVER['versions']}): revisit "
            "stream/transports/webrtc_receiver.py"
        )


def use_audio_receive_buffer(pc: Any, hold: int = 0) -> int:
    """Give the audio receivers of `pc` an AudioReceiveBuffer; how many were changed. Call it
    when the transceivers exist and before media flows: on the answering side after
    `setRemoteDescription(offer)`, on the offering side after `addTrack` (before the offer).
    Where aiortc's receiver is not as assumed, it logs a warning and leaves aiortc's buffer (the
    session works, with aiortc's latency); the tests fail loudly instead."""
    changed = 0
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind != "audio" or receiver is None:
            continue
        try:
            check_aiortc_receiver(receiver)
        except AiortcReceiverChanged as exc:
            log.warning("%s; keeping aiortc's own audio jitter buffer", exc)
            continue
        if not isinstance(getattr(receiver, BUFFER_ATTRIBUTE), AudioReceiveBuffer):
            setattr(receiver, BUFFER_ATTRIBUTE, AudioReceiveBuffer(hold))
            changed += 1
    return changed
