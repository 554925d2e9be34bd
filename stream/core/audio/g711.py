"""G.711 (ITU-T): mu-law and A-law, the 8-bit companded audio of telephone networks.

Python 3.13 removed `audioop`, which Python code used for this; the codec is small enough to
write from the standard with numpy alone. Each byte is a sign, a 3-bit segment (exponent) and a
4-bit step within it (mantissa), so decoding is a 256-entry table per law. Encoding is the
standard's integer arithmetic on 16-bit samples, worked out once for all 65536 of them into a
table too: both directions then cost one numpy indexing operation per frame.

Values are on the 16-bit scale the standard's reference code uses (mu-law's 14-bit and A-law's
13-bit linear codes shifted to the top of an int16), so they are compatible with every other
implementation, libsndfile's included. Float audio in [-1, 1] maps to them as in pcm.py
(x * 32768).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# mu-law (G.711 table 2a): a bias of 33 on the 14-bit scale, 132 on the 16-bit one, is added
# before the segment is found, so that segment 0 starts at zero without a special case; the
# largest magnitude that still fits the top segment once biased is 32635. Every bit of the code
# is inverted on the line (an idle channel of small values was then rich in ones, which old
# transmission systems needed for their clock).
MULAW_BIAS = 0x84
MULAW_CLIP = 32635
# A-law (G.711 table 1a): the even bits are inverted on the line, for the same reason.
ALAW_INVERT = 0x55
# The mu-law codes of zero: +0 (0xFF) and -0 (0x7F). Both decode to 0; a float -0.0 keeps the
# sign, so decoding and encoding float audio gives every one of the 256 codes back.
MULAW_ZERO, MULAW_NEGATIVE_ZERO = 0xFF, 0x7F


def _bit_length(values: np.ndarray) -> np.ndarray:
    """int.bit_length of each non-negative integer (frexp is exact for these)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int32)


def _mulaw_decode_table() -> np.ndarray:
    code = ~np.arange(256, dtype=np.int32) & 0xFF  # undo the line inversion
    exponent, mantissa = (code >> 4) & 0x07, code & 0x0F
    magnitude = (((mantissa << 3) + MULAW_BIAS) << exponent) - MULAW_BIAS
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    code = np.arange(256, dtype=np.int32) ^ ALAW_INVERT
    exponent, mantissa = (code >> 4) & 0x07, code & 0x0F
    # Segments 0 and 1 have the same step; each decodes to the middle of its interval, so A-law
    # has no zero: the smallest values are +-8.
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)  # sign bit 1: positive


def _mulaw_encode(x: np.ndarray) -> np.ndarray:
    """int32 16-bit samples -> codes, as the standard's reference encoder: sign and magnitude,
    bias, segment from the highest bit, the 4 bits below it, every bit inverted. Truncating
    there is rounding to the nearest level, since each level decodes to its interval's middle."""
    sign = np.where(x < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(x), MULAW_CLIP) + MULAW_BIAS
    exponent = _bit_length(magnitude >> 7) - 1
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _alaw_encode(x: np.ndarray) -> np.ndarray:
    """int32 16-bit samples -> codes: a negative value is coded from its one's complement
    (-x - 1), as the standard does, so that the two signs' levels mirror each other."""
    negative = x < 0
    magnitude = np.where(negative, ~x, x) >> 3  # the 13-bit linear code, 0..4095
    exponent = np.maximum(_bit_length(magnitude) - 5, 0)
    mantissa = np.where(exponent < 2, magnitude >> 1, magnitude >> exponent) & 0x0F
    sign = np.where(negative, 0, 0x80)
    return (sign | (exponent << 4) | mantissa) ^ ALAW_INVERT


def _encode_table(encode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The codes of all 65536 int16 values, indexed by the value's bits read as uint16."""
    values = np.arange(-32768, 32768, dtype=np.int32)
    table = np.empty(65536, np.uint8)
    table[values.astype(np.int16).view(np.uint16)] = encode(values)
    return table


# 16-bit linear value of each code, and those values as float32 in [-1, 1).
MULAW_TO_INT16 = _mulaw_decode_table()
ALAW_TO_INT16 = _alaw_decode_table()
_MULAW_TO_FLOAT = MULAW_TO_INT16.astype(np.float32) / np.float32(32768.0)
_MULAW_TO_FLOAT[MULAW_NEGATIVE_ZERO] = np.float32(-0.0)
_ALAW_TO_FLOAT = ALAW_TO_INT16.astype(np.float32) / np.float32(32768.0)
_MULAW_FROM_INT16 = _encode_table(_mulaw_encode)
_ALAW_FROM_INT16 = _encode_table(_alaw_encode)
for _table in (MULAW_TO_INT16, ALAW_TO_INT16, _MULAW_TO_FLOAT, _ALAW_TO_FLOAT):
    _table.setflags(write=False)


def decode_mulaw(data: bytes) -> np.ndarray:
    """mu-law bytes -> float32 in [-1, 1], one sample per byte."""
    return _MULAW_TO_FLOAT[np.frombuffer(data, np.uint8)]


def decode_alaw(data: bytes) -> np.ndarray:
    """A-law bytes -> float32 in [-1, 1], one sample per byte."""
    return _ALAW_TO_FLOAT[np.frombuffer(data, np.uint8)]


def encode_mulaw(samples: np.ndarray) -> bytes:
    """int16 samples, or floats in [-1, 1] (beyond: clipped; NaN: silence) -> mu-law bytes."""
    ints, floats = _as_int16(samples)
    codes = _MULAW_FROM_INT16[ints.view(np.uint16)]
    if floats is not None:  # a negative value that rounds to 0 is -0: the standard's 0x7F
        codes[(ints == 0) & np.signbit(floats)] = MULAW_NEGATIVE_ZERO
    return codes.tobytes()


def encode_alaw(samples: np.ndarray) -> bytes:
    """int16 samples, or floats in [-1, 1] (beyond: clipped; NaN: silence) -> A-law bytes."""
    ints, _ = _as_int16(samples)
    return _ALAW_FROM_INT16[ints.view(np.uint16)].tobytes()


def _as_int16(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples as int16 (floats scaled and rounded as pcm.py's s16 encoder does), and the
    floats themselves (None for integer input)."""
    samples = np.asarray(samples)
    if samples.dtype == np.int16:
        return np.ascontiguousarray(samples).reshape(-1), None
    if not np.issubdtype(samples.dtype, np.floating):
        raise TypeError(f"G.711 encodes int16 or float samples, not {samples.dtype}")
    floats = samples.astype(np.float32, copy=False).reshape(-1)
    floats = np.clip(np.nan_to_num(floats, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    ints = np.minimum(np.round(floats * np.float32(32768.0)), 32767).astype(np.int16)
    return ints, floats
