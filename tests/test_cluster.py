"""`grym-stream cluster`: one command starts PostgreSQL, two front-ends and HAProxy here (and
with `--ray`, a Ray cluster that runs the models); a client streams through it; SIGTERM stops
everything it started."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import soundfile as sf

from clients.stream_client import StreamClient
from grym.cluster import free_port
from tests.test_resume import paced

ROOT = Path(__file__).resolve().parents[1]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("ray", [False, True], ids=["models-in-front-ends", "models-on-ray"])
async def test_one_command_starts_a_cluster_that_streams_and_stops_clean(
    speech_wav: Path, ray: bool
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="grym-cluster-"))
    folder.chmod(0o755)  # PostgreSQL runs as its own user and must reach its folder
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "grym", "cluster", "--frontends", "2", "--port", str(port),
         "--folder", str(folder), *(["--ray", "--ray-cpus", "4"] if ray else []),
         "--", "--analysis-model", "tiny-random", "--generator", "none"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                break
        assert any(line.startswith("ready:") for line in lines), "".join(lines)
        audio, rate = sf.read(speech_wav, dtype="float32")
        client = StreamClient(f"ws://127.0.0.1:{port}/v1/stream", rate, 1)
        result = await client.run(paced(audio[:, None], rate // 10, 4.0), realtime=False)
        assert result.end is not None and result.end["samples_received"] == len(audio)
        assert result.ready["frontend"] in ("edge-1", "edge-2") and result.analysis
        assert all("wav2vec2" in e for e in result.analysis)
        gcs = [int(p) for p in re.findall(r"^ray: 127\.0\.0\.1:(\d+)$", "".join(lines), re.M)]
        assert len(gcs) == (1 if ray else 0) and all(listening(p) for p in gcs)
        frontends = [int(p) for p in re.findall(r"on port (\d+)", "".join(lines))]
        assert len(frontends) == 2 and all(listening(p) for p in frontends)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=90)[0]
        assert proc.returncode == 0, rest
        # Everything it started is gone: the balancer, both front-ends, the database.
        assert not listening(port) and not any(listening(p) for p in [*frontends, *gcs])
        assert not (folder / "postgres" / "data" / "postmaster.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
