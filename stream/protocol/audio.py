"""Server -> client: generated audio as binary frames, a fixed little-endian header then the
PCM."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stream.core.audio.pcm import Encoding

AUDIO_MAGIC = b"GRYA"
AUDIO_VERSION = 1
# magic, version, encoding (1 s16le, 2 f32le, 3 G.711 mu-law, 4 G.711 A-law), flags (bit 0:
# last chunk), generation id, chunk index, sample rate, first sample of the chunk within the
# clip; then the PCM, mono.
AUDIO_HEADER = struct.Struct("<4sBBHIIIQ")
_ENCODING_CODES = {
    Encoding.PCM_S16LE: 1,
    Encoding.PCM_F32LE: 2,
    Encoding.PCM_MULAW: 3,
    Encoding.PCM_ALAW: 4,
}
_ENCODINGS = {code: encoding for encoding, code in _ENCODING_CODES.items()}


@dataclass(frozen=True)
class AudioHeader:
    generation: int
    index: int
    sample_rate: int
    start: int
    encoding: Encoding
    last: bool


def pack_audio(header: AudioHeader, pcm: bytes) -> bytes:
    return (
        AUDIO_HEADER.pack(
            AUDIO_MAGIC, AUDIO_VERSION, _ENCODING_CODES[header.encoding], int(header.last),
            header.generation, header.index, header.sample_rate, header.start,
        )
        + pcm
    )  # fmt: skip


def unpack_audio(frame: bytes) -> tuple[AudioHeader, bytes]:
    """A binary frame from the server -> (header, PCM bytes); ValueError if it is not one."""
    if len(frame) < AUDIO_HEADER.size or frame[:4] != AUDIO_MAGIC:
        raise ValueError("not a generated-audio frame")
    _, version, code, flags, generation, index, rate, start = AUDIO_HEADER.unpack_from(frame)
    if version != AUDIO_VERSION:
        raise ValueError(f"audio frame version {version} is not {AUDIO_VERSION}")
    encoding = _ENCODINGS.get(code)
    if encoding is None:
        raise ValueError(f"audio frame encoding code {code} is not one this client knows")
    header = AudioHeader(generation, index, rate, start, encoding, bool(flags & 1))
    return header, frame[AUDIO_HEADER.size :]
