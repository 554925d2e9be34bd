"""PCM decoding and validation: wire bytes -> float32 mono.

The whole frame is checked before any of it is used: a frame that is not a whole number of
sample frames, or that carries NaN/inf, is rejected whole so the session timeline never holds
half a frame or poison values. Float samples beyond full scale are clipped to [-1, 1], as a
sound card would: values near the float maximum would otherwise overflow every feature.
G.711 mu-law and A-law (telephony's 8-bit codes, g711.py) are encodings like the others, one
byte per sample; every byte decodes to a finite value within full scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from stream.core.audio.g711 import decode_alaw, decode_mulaw, encode_alaw, encode_mulaw


class Encoding(StrEnum):
    PCM_S16LE = "pcm_s16le"
    PCM_F32LE = "pcm_f32le"
    PCM_MULAW = "pcm_mulaw"  # G.711 mu-law (North American and Japanese telephony)
    PCM_ALAW = "pcm_alaw"  # G.711 A-law (telephony elsewhere)

    @property
    def bytes_per_sample(self) -> int:
        return self.dtype.itemsize

    @property
    def dtype(self) -> np.dtype:
        return _DTYPES[self]


_DTYPES = {
    Encoding.PCM_S16LE: np.dtype("<i2"),
    Encoding.PCM_F32LE: np.dtype("<f4"),
    Encoding.PCM_MULAW: np.dtype("u1"),
    Encoding.PCM_ALAW: np.dtype("u1"),
}


class PcmError(ValueError):
    """A frame that cannot be decoded; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PcmFormat:
    sample_rate: int
    channels: int
    encoding: Encoding

    @property
    def frame_bytes(self) -> int:
        """Bytes in one sample frame: one sample for each channel."""
        return self.channels * self.encoding.bytes_per_sample

    def bytes_for(self, seconds: float) -> int:
        return int(round(seconds * self.sample_rate)) * self.frame_bytes


def decode(data: bytes, fmt: PcmFormat) -> np.ndarray:
    """Decode interleaved PCM into float32 of shape (frames, channels), values in [-1, 1]
    (floats beyond are clipped).

    Raises PcmError for a partial sample frame or non-finite floats.
    """
    if len(data) % fmt.frame_bytes:
        raise PcmError(
            "partial_frame",
            f"binary frame of {len(data)} bytes is not a whole number of sample frames "
            f"({fmt.channels} channel(s) x {fmt.encoding.bytes_per_sample} bytes = "
            f"{fmt.frame_bytes} bytes each); the frame was rejected, resend it whole",
        )
    if fmt.encoding is Encoding.PCM_MULAW:
        return decode_mulaw(data).reshape(-1, fmt.channels)
    if fmt.encoding is Encoding.PCM_ALAW:
        return decode_alaw(data).reshape(-1, fmt.channels)
    samples = np.frombuffer(data, dtype=fmt.encoding.dtype)
    if fmt.encoding is Encoding.PCM_S16LE:
        audio = samples.astype(np.float32) * np.float32(1.0 / 32768.0)
    else:
        audio = samples.astype(np.float32)
        if not np.isfinite(audio).all():
            bad = int(np.count_nonzero(~np.isfinite(audio)))
            raise PcmError(
                "non_finite_samples",
                f"frame holds {bad} NaN or infinite float sample(s); the frame was rejected, "
                "send finite values (normally within [-1, 1])",
            )
        np.clip(audio, -1.0, 1.0, out=audio)
    return audio.reshape(-1, fmt.channels)


def downmix(audio: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,) by averaging channels; mono passes through."""
    if audio.shape[1] == 1:
        return audio[:, 0]
    return audio.mean(axis=1, dtype=np.float32)


def encode(audio: np.ndarray, encoding: Encoding) -> bytes:
    """float32 (frames,) or (frames, channels) -> interleaved PCM bytes (for clients and tests)."""
    audio = np.asarray(audio, dtype=np.float32)
    if encoding is Encoding.PCM_MULAW:
        return encode_mulaw(audio)
    if encoding is Encoding.PCM_ALAW:
        return encode_alaw(audio)
    if encoding is Encoding.PCM_S16LE:
        ints = np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")
        return ints.tobytes()
    return audio.astype("<f4").tobytes()
