"""The malformed-input scenario's catalogue (docs/protocol.md's error table as cases): bad first
messages with the code and close code each earns, bad messages inside a session with the
non-fatal code each earns (None: accepted, as documented), and the seeded makers of each."""

from __future__ import annotations

import json
import random
import string
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

POLICY, UNSUPPORTED, TOO_BIG, NORMAL = 1008, 1003, 1009, 1000
GEN = "generation"  # resolved from `ready`: generation_unavailable or generation_disabled
MISSING, HUGE = object(), 10**300  # MISSING: the field is left out
NAN, INF = float("nan"), float("inf")

# A start, otherwise valid, with one field wrong: field -> (code, close code, bad values).
BAD_START = {
    "type": ("invalid_start", POLICY, ("stop", "START", " start", "start\n", 1, None, MISSING)),
    "sample_rate": ("unsupported_sample_rate", UNSUPPORTED, (
        7999, 192001, 0, -16000, 16000.0, 44100.5, "16000", True, False, None, MISSING, HUGE,
        -HUGE, 2**63, INF, NAN, [16000], {"hz": 16000})),
    "channels": ("unsupported_channels", UNSUPPORTED,
                 (0, 3, -1, 1.0, 2.0, "1", True, None, MISSING, 2**64, [1])),
    "encoding": ("unsupported_encoding", UNSUPPORTED, (
        "pcm_s24le", "PCM_S16LE", "pcm_s16le ", "pcm_f64le", "", 1, None, MISSING, ["pcm_s16le"])),
    "session": ("invalid_start", POLICY, (
        "", "a" * 65, "x" * 1000, "abc\n", "a b", "\u00e9", "a/b", "../x", "x\x00", "\u0661",
        "a.b", 5, True, [], {})),
    "token": ("invalid_start", POLICY, (5, True, [], {})),
    "resume": ("invalid_start", POLICY, (True, "yes", 1, None, [])),  # True: with no session
    "last_event": ("invalid_start", POLICY, (-1, 1.5, "3", True, None)),
    "x_unknown": ("invalid_start", POLICY, (1, None, "x")),  # a field start does not have
    "config": ("invalid_config", POLICY, ([], "x", 5, None, True)),
}  # fmt: skip
# config.<field> -> bad values, each `invalid_config` (1008).
BAD_CONFIG = {
    "chunk_seconds": (0.05, 30.5, -1, 0, "1", True, NAN, INF, HUGE),
    "left_context_seconds": (30.5, -0.1, "1", NAN),
    "lookahead_seconds": (5.5, -1, [0]),
    "when_behind": ("never", 1, True, ""),
    "embeddings": ("true", 1, 0),
    "timing": ("yes", 1),
    "ctc_decoder": ("viterbi", 1, "GREEDY"),
    "pipeline": (5, [], True, "no-such-pipeline", {"bogus": 1}),
    "generation": ({"steps": 0}, {"seconds": 100}, {"bogus": 1}, {"triggers": ["sometimes"]},
                   {"novelty_on": 0.1, "novelty_off": 0.5}, [], 5),
    "bogus": (1, None),
}  # fmt: skip
# In a session: types the server does not know, `cancel` ids that are not integers, and
# generate/config/cancel messages with wrong fields.
UNKNOWN_TYPES = ("start", "STOP", "pause", "", "generate ", 5, None, True, ["stop"], MISSING)
BAD_IDS = ("3", 3.0, True, None, MISSING, [1], {"id": 1}, 1e3)
BAD_GENERATION = (
    {"type": "generate", "prompt": 5}, {"type": "generate", "seconds": "4"},
    {"type": "generate", "steps": 10.5}, {"type": "generate", "seed": -1},
    {"type": "generate", "bogus": 1}, {"type": "generate", "prompt": "x" * 600},
    {"type": "generate", "guidance": NAN}, {"type": "generate"}, {"type": "config"},
    {"type": "config", "generation": 5}, {"type": "config", "generation": {"steps": "10"}},
    {"type": "config", "generation": {"window_seconds": 5}}, {"type": "cancel", "id": 2**70},
    {"type": "cancel", "id": -5}, {"type": "cancel", "id": 7},
)  # fmt: skip
OUT_OF_RANGE = (1e30, 3.3e38, -3.4e38, 3.4028235e38, 1e5, -2.0, 1.0000001)
POISON = (NAN, INF, -INF, *struct.unpack("<2f", struct.pack("<2I", 0x7F800001, 0xFFC00000)))


def start_message(rng: random.Random, **changes: Any) -> dict[str, Any]:
    """A valid start in a random format, with `changes` (MISSING: left out)."""
    start = {"type": "start", "sample_rate": rng.choice((8000, 16000, 22050, 44100, 48000)),
             "channels": rng.choice((1, 2)), "encoding": rng.choice(("pcm_s16le", "pcm_f32le")),
             "config": {"pipeline": "analyse-only"}, **changes}  # fmt: skip
    return {k: v for k, v in start.items() if v is not MISSING}


def _not_json(rng: random.Random) -> str:
    """Text that is not JSON: garbage after a character no JSON begins with, or a cut start."""
    return rng.choice((
        lambda: rng.choice("~#<)'x") + "".join(rng.choices(string.printable, k=rng.randint(0, 99))),
        lambda: rng.choice("~#<)'x") + rng.randbytes(rng.randint(0, 500)).decode("latin-1"),
        lambda: "", lambda: "{'type': 'start'}",
        lambda: json.dumps(start_message(rng))[: -rng.randint(1, 30)],  # cut short
        lambda: json.dumps(start_message(rng))[:-1] + ",}",  # a trailing comma
    ))()  # fmt: skip


def _not_object(rng: random.Random) -> str:
    return json.dumps(rng.choice(([start_message(rng)], 5, "start", None, True, [], 1.5)))


def _deep(rng: random.Random, depth: int) -> str:
    return rng.choice(("[" * depth + "1" + "]" * depth, '{"a":' * depth + "1" + "}" * depth))


def _nested(rng: random.Random) -> str:
    """Deeper than 32 levels (up to 5000): bare, or in a start or a control message."""
    depth = rng.randint(33, 5000)
    return rng.choice((lambda: _deep(rng, depth),
                       lambda: '{"type":"start","config":{"pipeline":' + _deep(rng, depth) + "}}",
                       lambda: '{"type":"stop","x":' + _deep(rng, depth) + "}"))()  # fmt: skip


def _long(rng: random.Random, chars: int, kind: str = "start") -> str:
    """A message of exactly `chars` characters (non-ASCII too: the limit counts characters)."""
    text = json.dumps({"type": kind, "pad": ""})
    return text[:-2] + rng.choice("a\u00e9\u4e2d") * (chars - len(text)) + '"}'


def pcm_frame(rng: random.Random, fmt: dict[str, Any], seconds: float, values: Any = None) -> bytes:
    """`seconds` of noise in the session's format, or of `values` (floats, for f32)."""
    n, noise = max(1, int(seconds * fmt["sample_rate"])), np.random.default_rng(rng.getrandbits(64))
    if fmt["encoding"] == "pcm_s16le":
        return noise.bytes(2 * n * fmt["channels"])
    shape = (n, fmt["channels"])
    samples = noise.uniform(-1, 1, shape) if values is None else noise.choice(values, shape)
    return samples.astype("<f4").tobytes()


def _poisoned(rng: random.Random, fmt: dict[str, Any]) -> bytes:
    data = bytearray(pcm_frame(rng, fmt, rng.uniform(0.001, 0.1)))
    at = 4 * rng.randrange(len(data) // 4)
    data[at : at + 4] = struct.pack("<f", rng.choice(POISON))
    return bytes(data)


def partial_frame(rng: random.Random, fmt: dict[str, Any]) -> bytes:
    frame = fmt["channels"] * (4 if fmt["encoding"] == "pcm_f32le" else 2)
    return pcm_frame(rng, fmt, rng.uniform(0, 0.1)) + rng.randbytes(rng.randint(1, frame - 1))


Make = Callable[[random.Random], str | bytes]
FIRST: list[tuple[str, str, int, Make]] = [  # kind, code, close code, the message
    ("binary", "start_required", POLICY, lambda r: r.randbytes(r.randint(0, 4096))),
    ("not JSON", "invalid_start", POLICY, _not_json),
    ("not an object", "invalid_start", POLICY, _not_object),
    ("nested > 32 levels", "invalid_start", POLICY, _nested),
    ("> 65,536 chars", "invalid_start", POLICY, lambda r: _long(r, r.randint(65_537, 300_000))),
    ("resume of an unknown id", "session_not_found", POLICY, lambda r: json.dumps(start_message(
        r, session="".join(r.choices(string.ascii_letters, k=24)), resume=True))),
    *[(f"config.{name}", "invalid_config", POLICY, lambda r, name=name: json.dumps(start_message(
        r, config={"pipeline": "analyse-only", name: r.choice(BAD_CONFIG[name])})))
      for name in BAD_CONFIG],
    *[(name, code, close, lambda r, name=name, values=values: json.dumps(
        start_message(r, **{name: r.choice(values)}), ensure_ascii=r.random() < 0.5))
      for name, (code, close, values) in BAD_START.items()],
]  # fmt: skip
IN_SESSION: list[tuple[str, str | None, Callable[[random.Random, dict[str, Any]], Any]]] = [
    ("text: not JSON", "invalid_message", lambda r, f: _not_json(r)),
    ("text: not an object", "invalid_message", lambda r, f: _not_object(r)),
    ("text: nested > 32 levels", "invalid_message", lambda r, f: _nested(r)),
    ("text: > 65,536 chars", "invalid_message", lambda r, f: _long(r, r.randint(65_537, 300_000))),
    ("text: at the size/depth limits, unknown type", "unknown_message_type", lambda r, f: r.choice(
        ('{"type":"x","a":' + _deep(r, 31) + "}", _long(r, 65_536, "x")))),
    ("text: unknown type", "unknown_message_type", lambda r, f: json.dumps(
        start_message(r, type=r.choice(UNKNOWN_TYPES)))),
    ("text: cancel id not an integer", "invalid_message", lambda r, f: json.dumps(
        {"type": "cancel"} | ({} if (i := r.choice(BAD_IDS)) is MISSING else {"id": i}))),
    ("text: generate/config/cancel", GEN, lambda r, f: json.dumps(r.choice(BAD_GENERATION))),
    ("pcm: partial sample frame", "partial_frame", partial_frame),
    ("pcm: empty frame", None, lambda r, f: b""),
    ("valid: audio", None, lambda r, f: pcm_frame(r, f, r.uniform(0.001, 0.1))),
    ("pcm: NaN or infinity", "non_finite_samples", _poisoned),  # f32 only, from here on
    ("pcm: floats beyond full scale (clipped)", None,
     lambda r, f: pcm_frame(r, f, 0.05, OUT_OF_RANGE)),
]  # fmt: skip
F32_ONLY = 2  # the last entries of IN_SESSION
