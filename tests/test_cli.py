"""The command line as a user runs it: `python -m stream serve` and `grym-stream client`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

GRYM = str(Path(sys.executable).with_name("grym-stream"))


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """A server process started the way the README says, on an ephemeral port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream", "serve", "--port", "0", "--chunk-seconds", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    banner, port = [], None
    deadline = time.monotonic() + 60
    while port is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        banner.append(line)
        if match := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
            port = int(match.group(1))
    assert port, "server did not start:\n" + "".join(banner)
    text = "".join(banner)
    assert "chunk_seconds          0.5" in text and "token                  (off)" in text
    # Offline, the default generator is the tiny one, and the server says so loudly.
    assert re.search(r"WARNING.*generator tiny: built-in tiny generator", text)
    # Keep reading its log so that a full pipe can never stall the server.
    drain = threading.Thread(target=lambda: banner.extend(proc.stdout), daemon=True)
    drain.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does: a graceful shutdown
        status = proc.wait(30)
        drain.join(5)
        proc.stdout.close()
        log = "".join(banner)
        # After a graceful shutdown the exit status says it was interrupted, as Ctrl-C should.
        assert status == 130, f"exit status {status}; the server's log:\n{log[-3000:]}"
        assert "Finished server process" in log


def client(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRYM, "client", *args], capture_output=True, text=True, timeout=timeout)


def test_health_of_the_served_process(served: str) -> None:
    assert httpx.get(f"http://{served}/healthz").json()["status"] == "ok"


def test_client_streams_a_file_and_prints_events(served: str, speech_wav: Path) -> None:
    done = client("--server", f"ws://{served}/v1/stream", "--file", str(speech_wav), "--fast")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    analysis = [line for line in lines if line.startswith("[")]
    assert len(analysis) >= 8  # ~5 s of speech in 0.5 s chunks
    assert any("speech yes" in line for line in analysis)
    # The transcript: the utterance so far on the analysis lines, each final on its own line.
    assert any(re.search(r'end-to-end  "[A-Z]', line) for line in analysis)
    assert any(re.match(r"final  \[ *\d+\.\d+- *\d+\.\d+ s\] [A-Z']", line) for line in lines)
    assert re.search(r"^end: \d+\.\d+ s received \(\d+ samples\)", lines[-2])
    assert lines[-1].startswith("latency over")


def test_client_json_output_is_one_event_per_line(served: str, speech_wav: Path) -> None:
    done = client(
        "--server",
        f"ws://{served}/v1/stream",
        "--file",
        str(speech_wav),
        "--fast",
        "--json",
        "--encoding",
        "pcm_f32le",
        "--chunk-seconds",
        "1.0",
        "--decoder",
        "greedy",
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1]["type"] == "end"
    # --decoder reached the server as start.config.ctc_decoder (a bad one would be refused).
    assert all("transcript" in e for e in events if e["type"] == "analysis")
    assert all(e["end"] - e["start"] <= 1.0 for e in events if e["type"] == "analysis")
    # Finals carry their words, each with its times (seconds on the session's timeline).
    finals = [e["transcript"]["final"] for e in events if (e.get("transcript") or {}).get("final")]
    words = [w for final in finals for w in final["words"]]
    assert words and [w["word"] for w in words] == " ".join(f["text"] for f in finals).split()
    assert all(0 <= w["start"] < w["end"] for w in words)


def test_client_generates_and_saves_clips(served: str, speech_wav: Path, tmp_path: Path) -> None:
    import soundfile as sf

    done = client(
        "--server", f"ws://{served}/v1/stream", "--file", str(speech_wav), "--fast",
        "--generate", "interval", "--every", "2", "--gen-seconds", "1", "--steps", "2",
        "--seed", "3", "--prompt", "bells", "--save-dir", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(
        r"^generation 1 started: interval at 2\.00 s, seed 3, 1 s: 'bells, ", done.stdout, re.M
    )
    assert re.search(r"^generation 1 done: 1\.00 s of audio", done.stdout, re.M)
    saved = sorted(tmp_path.glob("*-gen*.wav"))
    assert saved and all(f"saved {path}" in done.stdout for path in saved)
    audio, rate = sf.read(saved[0])
    assert rate == 16_000 and len(audio) == 16_000


def test_client_saves_a_continuous_stream(served: str, speech_wav: Path, tmp_path: Path) -> None:
    import soundfile as sf

    done = client(
        "--server", f"ws://{served}/v1/stream", "--file", str(speech_wav), "--generate",
        "continuous", "--gen-seconds", "2", "--hop-seconds", "1", "--steps", "2", "--seed", "3",
        "--save-dir", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.search(
        r"^generation 1 started: start at 0\.50 s, seed 3, continuous, 2 s segments adding 1 s "
        r"each: '", done.stdout, re.M,
    )  # fmt: skip
    segments = re.findall(r"^generation 1 segment (\d+): (\d+) samples from (\d+)", done.stdout,
                          re.M)  # fmt: skip
    assert len(segments) >= 3 and [int(k) for k, _, _ in segments] == list(range(len(segments)))
    ended = re.search(r"^generation 1 done: ([\d.]+) s of audio in \d+ chunks, (\d+) segments$",
                      done.stdout, re.M)  # fmt: skip
    assert ended and int(ended.group(2)) == len(segments)
    audio, rate = sf.read(sorted(tmp_path.glob("*-gen1.wav"))[0])
    assert rate == 16_000 and abs(len(audio) / rate - float(ended.group(1))) < 0.01
    # Each segment starts where the one before ended; the saved stream holds them all.
    assert [int(start) for _, _, start in segments[1:]] == [
        int(start) + int(n) for _, n, start in segments[:-1]
    ]


def test_client_over_webrtc(served: str, speech_wav: Path) -> None:
    done = client("--server", f"ws://{served}/v1/stream", "--file", str(speech_wav), "--webrtc")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sum(line.startswith("[") for line in lines) >= 8  # ~5 s of speech in 0.5 s chunks
    assert re.search(r"^end: \d+\.\d+ s received", lines[-2], re.M)
    assert client("--server", f"ws://{served}/v1/stream", "--webrtc").returncode == 2


def test_ctrl_c_stops_the_stream_cleanly(served: str, speech_wav: Path) -> None:
    proc = subprocess.Popen(
        [GRYM, "client", "--server", f"ws://{served}/v1/stream", "--file", str(speech_wav)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    seconds = float(re.search(r"^end: (\d+\.\d+) s received", out, re.M).group(1))
    assert 0.5 < seconds < 4.0  # stopped part-way through the ~5 s file


def test_client_without_a_microphone_says_what_to_do(served: str) -> None:
    done = client("--server", f"ws://{served}/v1/stream", "--device", "no-such-device-xyz")
    assert done.returncode == 2
    assert "no microphone" in done.stderr and "--file" in done.stderr


def test_client_reports_a_refused_stream(served: str, speech_wav: Path) -> None:
    done = client(
        "--server", f"ws://{served}/v1/stream", "--file", str(speech_wav), "--chunk-seconds", "0.01"
    )
    assert done.returncode == 1 and "refused" in done.stderr and "chunk_seconds" in done.stderr


def test_client_reports_an_unreachable_server(speech_wav: Path) -> None:
    done = client("--server", "ws://127.0.0.1:9/v1/stream", "--file", str(speech_wav))
    assert done.returncode == 1 and "cannot reach" in done.stderr


def test_serve_rejects_bad_settings() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream", "serve", "--port", "not-a-port"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "port" in done.stderr


@pytest.mark.parametrize(
    ("model", "expected"),
    [("/no/such/checkpoint", "does not exist"), ("not-a-preset-offline", "not a preset")],
)
def test_serve_explains_a_bad_model_at_start_up(model: str, expected: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream", "serve", "--port", "0", "--analysis-model", model],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "cannot load the analysis model" in done.stderr and expected in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("generator", "expected"),
    [("/no/such/audioldm", "does not exist"), ("someone/not-cached", "not in the local")],
)
def test_serve_explains_a_bad_generator_at_start_up(generator: str, expected: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream", "serve", "--port", "0", "--generator", generator],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2
    assert "cannot load the generator" in done.stderr and expected in done.stderr
    assert "Traceback" not in done.stderr


def test_json_logs_carry_session_ids(speech_wav: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream", "serve", "--port", "0", "--log-format", "json",
         "--analysis-model", "none", "--generator", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    port = None
    for line in proc.stdout:
        lines.append(line)
        if match := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
            port = int(match.group(1))
            break
    assert port, "".join(lines)
    done = client(
        "--server", f"ws://127.0.0.1:{port}/v1/stream", "--file", str(speech_wav), "--fast"
    )
    assert done.returncode == 0, done.stderr
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    output = [line for line in lines + rest.splitlines() if line.strip()]
    # Every line the server printed is JSON.
    records = [json.loads(line) for line in output]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    opened = [r for r in records if r["message"].startswith("session opened")]
    closed = [r for r in records if r["message"].startswith("session closed")]
    assert len(opened) == len(closed) == 1
    assert opened[0]["session"] == closed[0]["session"] and opened[0]["session"]


async def test_sigterm_finishes_live_sessions_with_end_and_1001(speech_wav: Path) -> None:
    import asyncio

    import soundfile as sf

    from clients.stream_client import StreamClient

    proc = subprocess.Popen(
        [sys.executable, "-m", "stream", "serve", "--port", "0", "--generator", "none",
         "--analysis-model", "tiny-random"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    port = None
    for line in proc.stdout:
        if match := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
            port = int(match.group(1))
            break
    assert port
    drain = threading.Thread(target=proc.stdout.read, daemon=True)
    drain.start()
    audio, rate = sf.read(speech_wav, dtype="float32", always_2d=True)
    looped = np.concatenate([audio] * 4)  # ~20 s: still streaming when the server stops

    async def blocks():
        for i in range(0, len(looped), 2205):
            yield looped[i : i + 2205]

    client = StreamClient(f"ws://127.0.0.1:{port}/v1/stream", rate, 1)
    running = asyncio.ensure_future(client.run(blocks(), realtime=True))
    await asyncio.sleep(3.0)
    proc.send_signal(signal.SIGTERM)
    result = await asyncio.wait_for(running, 30)
    # uvicorn re-raises SIGTERM once it has shut down gracefully: the usual exit status.
    assert proc.wait(30) == -signal.SIGTERM
    drain.join(5)
    proc.stdout.close()
    # The session was told: its analysis so far, then `end`, then 1001 (going away).
    assert result.end is not None and result.close_code == 1001
    assert 2.0 < result.end["seconds"] < 6.0 and result.end["chunks"] >= 2
    assert not result.errors


def test_serve_flags_are_never_guessed_from_a_prefix() -> None:
    """`--store-batch` is not `--store-batch-seconds`, nor is `--stor` `--store`: an error."""
    for flag in ("--store-batch", "--stor"):
        done = subprocess.run(
            [sys.executable, "-m", "stream", "serve", flag, "1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2 and "unrecognized arguments" in done.stderr, flag
    wrong = subprocess.run(
        [sys.executable, "-m", "stream", "serve", "--store", "mysql://x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert wrong.returncode == 2 and "postgresql:// URL" in wrong.stderr
