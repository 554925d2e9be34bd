"""G.711 mu-law and A-law: the tables against the standard and libsndfile, and telephone audio
streamed to a real server as encodings of the protocol."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from websockets.asyncio.client import connect

from clients.stream_client import StreamClient
from stream.core.audio import g711
from stream.core.audio.pcm import Encoding, PcmError, PcmFormat, decode, encode
from stream.protocol import AudioHeader, pack_audio, parse_start, unpack_audio
from tests.conftest import RunningServer, tone

G711 = [Encoding.PCM_MULAW, Encoding.PCM_ALAW]
# libsndfile's name for each, and our decode table and encoder.
LAWS = {
    Encoding.PCM_MULAW: ("ULAW", g711.MULAW_TO_INT16, g711.encode_mulaw, g711.decode_mulaw),
    Encoding.PCM_ALAW: ("ALAW", g711.ALAW_TO_INT16, g711.encode_alaw, g711.decode_alaw),
}
ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)


def libsndfile_decode(data: bytes, law: str, dtype: str) -> np.ndarray:
    audio, _ = sf.read(
        io.BytesIO(data), format="RAW", subtype=law, samplerate=8000, channels=1, dtype=dtype
    )
    return audio


def libsndfile_encode(samples: np.ndarray, law: str) -> np.ndarray:
    buffer = io.BytesIO()
    sf.write(buffer, samples, 8000, format="RAW", subtype=law)
    return np.frombuffer(buffer.getvalue(), np.uint8)


# --- the codec -----------------------------------------------------------------------------


def test_decode_tables_follow_the_standard() -> None:
    mu, a = g711.MULAW_TO_INT16, g711.ALAW_TO_INT16
    # mu-law: bits inverted on the line; 0x00 is the most negative value, 0x80 the most
    # positive, and both zeros (0xFF +0, 0x7F -0) decode to 0.
    assert (mu[0x00], mu[0x80], mu[0xFF], mu[0x7F]) == (-32124, 32124, 0, 0)
    assert (mu[0xFE], mu[0x7E]) == (8, -8)  # the smallest steps
    # A-law: even bits inverted; sign bit set means positive; no zero, the smallest are +-8.
    assert (a[0xD5], a[0x55], a[0xAA], a[0x2A]) == (8, -8, 32256, -32256)
    assert sorted(set(np.abs(a.astype(int)))) == sorted(set(a[a > 0].astype(int)))  # symmetric
    assert len(set(a.tolist())) == 256 and len(set(mu.tolist())) == 255  # mu-law: one 0 twice


@pytest.mark.parametrize("encoding", G711)
def test_every_code_decodes_and_encodes_to_itself(encoding: Encoding) -> None:
    _, table, encoder, decoder = LAWS[encoding]
    codes = bytes(range(256))
    assert encoder(decoder(codes)) == codes  # float: mu-law's 0x7F decodes to -0.0
    assert encode(decode(codes, PcmFormat(8000, 1, encoding))[:, 0], encoding) == codes
    from_ints = np.frombuffer(encoder(table), np.uint8)
    if encoding is Encoding.PCM_MULAW:
        # An int16 has no -0: the standard's negative zero comes back as the positive one,
        # which decodes to the same value; every other code is itself.
        assert from_ints[0x7F] == 0xFF
        from_ints = np.delete(from_ints, 0x7F)
        assert np.array_equal(from_ints, np.delete(np.arange(256), 0x7F))
        assert np.signbit(decoder(b"\x7f\xff")).tolist() == [True, False]  # -0.0, +0.0
    else:
        assert np.array_equal(from_ints, np.arange(256))


@pytest.mark.parametrize("encoding", G711)
def test_decoding_agrees_with_libsndfile(encoding: Encoding) -> None:
    law, table, _, decoder = LAWS[encoding]
    codes = bytes(range(256))
    assert np.array_equal(libsndfile_decode(codes, law, "int16"), table)
    assert np.array_equal(libsndfile_decode(codes, law, "float32"), decoder(codes))
    # What libsndfile writes from a sweep, decoded by both.
    written = libsndfile_encode(ALL_INT16[::7], law).tobytes()
    assert np.array_equal(libsndfile_decode(written, law, "float32"), decoder(written))


@pytest.mark.parametrize("encoding", G711)
def test_encoding_every_int16_agrees_with_libsndfile(encoding: Encoding) -> None:
    law, table, encoder, _ = LAWS[encoding]
    ours = np.frombuffer(encoder(ALL_INT16), np.uint8)
    theirs = libsndfile_encode(ALL_INT16, law)
    if encoding is Encoding.PCM_MULAW:
        assert np.array_equal(ours, theirs)
        return
    # A-law: libsndfile codes a negative value from its magnitude, G.711's reference encoder
    # (and ours) from its one's complement (-x - 1), so they part only on the exact decision
    # value between two levels, at 127 negative values; there ours is never the farther.
    differ = ours != theirs
    assert differ.sum() == 127 and (ALL_INT16[differ] < 0).all()
    x = ALL_INT16[differ].astype(int)
    ours_error = np.abs(table[ours[differ]] - x)
    theirs_error = np.abs(table[theirs[differ]] - x)
    assert (ours_error <= theirs_error).all()


@pytest.mark.parametrize("encoding", G711)
def test_encoding_floats_is_encoding_their_int16(encoding: Encoding) -> None:
    law, table, encoder, _ = LAWS[encoding]
    sweep = np.linspace(-1.0, 1.0, 100_001, dtype=np.float32)
    ints = np.clip(np.round(sweep * 32768.0), -32768, 32767).astype(np.int16)
    ours = np.frombuffer(encoder(sweep), np.uint8)
    from_ints = np.frombuffer(encoder(ints), np.uint8)
    negative_zero = (ints == 0) & np.signbit(sweep)
    assert np.array_equal(ours[~negative_zero], from_ints[~negative_zero])
    # libsndfile scales floats by 32767 and truncates: it is never closer to the input.
    theirs = libsndfile_encode(sweep, law)
    wanted = sweep.astype(np.float64) * 32768.0
    ours_error = np.abs(table[ours] - wanted)
    theirs_error = np.abs(table[theirs] - wanted)
    assert (ours_error <= theirs_error + 1.0).all() and ours_error.mean() < theirs_error.mean()
    # Beyond full scale clips; NaN is silence.
    loud = np.frombuffer(encoder(np.array([2.0, -2.0, np.inf, np.nan], np.float32)), np.uint8)
    assert table[loud].tolist()[:3] == [table.max(), table.min(), table.max()]
    assert abs(int(table[loud[3]])) <= 8


@pytest.mark.parametrize("encoding", G711)
def test_round_trip_error_is_within_half_a_step(encoding: Encoding) -> None:
    audio = np.random.default_rng(3).uniform(-0.95, 0.95, 20_000).astype(np.float32)
    fmt = PcmFormat(8000, 1, encoding)
    wire = encode(audio, encoding)
    assert len(wire) == len(audio)  # one byte per sample
    back = decode(wire, fmt)[:, 0]
    # Companding: the error grows with the level, at most half the top segment's step (1024
    # on the 16-bit scale) and about 3% of the value.
    error = np.abs(back - audio)
    assert error.max() <= 512.5 / 32768 + 1e-6  # (and half an int16 step of rounding)
    assert (error <= 0.032 * np.abs(audio) + 16 / 32768).all()
    # A sine survives at about telephone quality (G.711: 35-38 dB SNR).
    sine = tone(1.0, 8000, freq=440, amplitude=0.5)[:, 0]
    noise = decode(encode(sine, encoding), fmt)[:, 0] - sine
    assert 10 * np.log10(np.mean(sine**2) / np.mean(noise**2)) > 35


def test_g711_formats_count_bytes_as_samples() -> None:
    for encoding in G711:
        assert encoding.bytes_per_sample == 1
        mono, stereo = PcmFormat(8000, 1, encoding), PcmFormat(8000, 2, encoding)
        assert decode(b"\x01\x02\x03", mono).shape == (3, 1)  # any length is whole frames
        with pytest.raises(PcmError) as err:
            decode(b"\x01\x02\x03", stereo)
        assert err.value.code == "partial_frame"
        assert mono.bytes_for(0.02) == 160
        start = {"type": "start", "sample_rate": 8000, "channels": 1, "encoding": encoding.value}
        assert parse_start(json.dumps(start)).format == mono
        generation = {"generation": {"encoding": encoding.value, "sample_rate": 8000}}
        assert parse_start(json.dumps({**start, "config": generation})).config.generation


@pytest.mark.parametrize(("encoding", "code"), [(Encoding.PCM_MULAW, 3), (Encoding.PCM_ALAW, 4)])
def test_generated_audio_frames_carry_the_g711_codes(encoding: Encoding, code: int) -> None:
    header = AudioHeader(2, 0, 8000, 0, encoding, True)
    frame = pack_audio(header, b"\xff\x7f")
    assert frame[5] == code and unpack_audio(frame) == (header, b"\xff\x7f")
    with pytest.raises(ValueError):
        unpack_audio(frame[:5] + bytes([9]) + frame[6:])


# --- against a real server -----------------------------------------------------------------


def speech_at_8k(path: Path) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32")
    return soxr.resample(audio, rate, 8000).astype(np.float32)


async def blocks_of(audio: np.ndarray, frame: int) -> AsyncIterator[np.ndarray]:
    for i in range(0, len(audio), frame):
        yield audio[i : i + frame, None]


@pytest.mark.parametrize("encoding", G711)
async def test_telephone_speech_is_analysed_and_counted_exactly(
    server: RunningServer, speech_wav: Path, encoding: Encoding
) -> None:
    speech = speech_at_8k(speech_wav)
    client = StreamClient(server.ws, 8000, 1, encoding, config={"when_behind": "wait"})
    result = await client.run(blocks_of(speech, 160), realtime=False)
    assert result.close_code == 1000 and not result.errors
    assert result.ready["encoding"] == encoding.value and result.ready["sample_rate"] == 8000
    assert result.end["samples_received"] == len(speech) == result.samples_sent
    assert result.analysis and result.analysis[-1]["end"] == pytest.approx(len(speech) / 8000)
    assert any(e["vad"]["speech"] for e in result.analysis)
    assert result.transcript.strip()


@pytest.mark.parametrize("encoding", G711)
async def test_frames_of_any_length_are_whole_samples(
    server: RunningServer, encoding: Encoding
) -> None:
    wire = encode(tone(1.0, 8000)[:, 0], encoding)
    sizes = [1, 161, 7, 333, 2, 999]
    async with connect(server.ws) as ws:
        start = {"type": "start", "sample_rate": 8000, "channels": 1,
                 "encoding": encoding.value, "config": {"when_behind": "wait"}}  # fmt: skip
        await ws.send(json.dumps(start))
        assert json.loads(await ws.recv())["type"] == "ready"
        pos = k = 0
        while pos < len(wire):
            await ws.send(wire[pos : pos + sizes[k % len(sizes)]])
            pos, k = pos + sizes[k % len(sizes)], k + 1
        await ws.send(json.dumps({"type": "stop"}))
        events = [json.loads(m) async for m in ws]
    assert ws.close_code == 1000
    assert not [e for e in events if e["type"] == "error"]
    assert events[-1]["type"] == "end" and events[-1]["samples_received"] == len(wire) == 8000
    tones = [e for e in events if e["type"] == "analysis"]
    assert tones and all(e["features"]["pitch_hz"] == pytest.approx(440, rel=0.01) for e in tones)


def test_the_client_command_sends_a_file_as_telephone_audio(
    server: RunningServer, speech_wav: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`grym-stream client --encoding pcm_mulaw --rate 8000 FILE`: resampled, then encoded."""
    from clients.mic import main

    args = ["--server", server.ws, "--encoding", "pcm_mulaw", "--rate", "8000", "--fast"]
    assert main([*args, "--json", str(speech_wav)]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    end, info = events[-1], sf.info(speech_wav)
    assert end["type"] == "end" and end["seconds"] == end["samples_received"] / 8000
    assert abs(end["samples_received"] - info.frames * 8000 / info.samplerate) <= 1
    assert any(e["type"] == "analysis" for e in events)
    assert not [e for e in events if e["type"] == "error"]
