"""The container image (deploy/Containerfile), built by deploy/image.py (what `make image`
runs) and served a speech file over the WebSocket protocol, like a deployed one.

Needs root and Debian's podman, runc and debootstrap, which `make system-deps` installs: where
they are missing the test fails and says so (it is never skipped). The first build on a machine
takes a few minutes (a debootstrapped base, the wheelhouse, the image's layers); later ones reuse
what did not change.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile as sf

from clients.stream_client import StreamClient
from grym.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "image.py"
TOOLS = ("podman", "runc", "debootstrap")

pytestmark = pytest.mark.timeout(1200)  # a build from nothing: a few minutes


def _check_tools() -> None:
    """The image is built with root podman, runc and debootstrap, which `make system-deps`
    installs on Debian as root (as CI runs): where they are missing the test fails, saying so."""
    if os.geteuid() != 0:
        pytest.fail("the image test builds with root podman and debootstrap: run it as root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `make system-deps` (Debian, root)")


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_image", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[ModuleType, str]]:
    """The image's tag, built by the script `make image` runs (progress in the test's output)."""
    _check_tools()
    script = _load_script()
    start = time.monotonic()
    subprocess.run([sys.executable, str(SCRIPT)], check=True, cwd=ROOT, timeout=1100)
    print(f"image built in {time.monotonic() - start:.1f} s")
    tag = f"{script.IMAGE}:latest"
    yield script, tag


def _podman(script: ModuleType, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], env=script.podman_env(), check=check, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def container(image: tuple[ModuleType, str]) -> Iterator[tuple[str, int]]:
    """A container of the image, with its own CMD, on a free port of the host's network; healthy
    by the image's own health check. Removed afterwards, its anonymous /data volume too."""
    script, tag = image
    name, port = f"grym-test-{uuid.uuid4().hex[:8]}", free_port()
    _podman(
        script, "run", "--detach", "--name", name, "--runtime", "runc", "--network", "host",
        # The port by GRYM_PORT, which the server and the health check both read; the host
        # loopback only (host network).
        "--env", f"GRYM_PORT={port}", "--env", "GRYM_HOST=127.0.0.1",
        tag,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _podman(script, "healthcheck", "run", name, check=False).returncode != 0:
            state = _podman(script, "inspect", name, "--format", "{{.State.Status}}").stdout
            if state.strip() != "running" or time.monotonic() > deadline:
                logs = _podman(script, "logs", name, check=False)
                pytest.fail(f"container {state.strip()}, not healthy:\n{logs.stdout}{logs.stderr}")
            time.sleep(0.5)
        yield name, port
    finally:
        _podman(script, "stop", "--time", "20", name, check=False)
        _podman(script, "rm", "--force", "--volumes", name, check=False)


def _logs(script: ModuleType, name: str) -> str:
    done = _podman(script, "logs", name)
    return done.stdout + done.stderr


async def test_a_container_of_the_image_analyses_a_speech_file(
    image: tuple[ModuleType, str], container: tuple[str, int], speech_wav: Path
) -> None:
    script, _ = image
    name, port = container
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
        assert response.status == 200 and json.load(response)["ready"] is True
    audio, rate = sf.read(speech_wav, dtype="float32", always_2d=True)

    async def blocks() -> AsyncIterator[np.ndarray]:
        for i in range(0, len(audio), 2205):  # 100 ms frames
            yield audio[i : i + 2205]

    client = StreamClient(
        f"ws://127.0.0.1:{port}/v1/stream", rate, 1, config={"when_behind": "wait"}
    )
    result = await client.run(blocks(), realtime=False)

    assert result.end is not None and not result.errors, result.errors
    assert result.end["samples_received"] == len(audio)
    # Every chunk analysed, by the model exported into the image: `auto` with no network falls
    # back to the shipped tiny model, trained on espeak-ng speech, so its words come back.
    assert result.analysis and len(result.analysis) == result.end["chunks"]
    assert "wav2vec2" in result.ready["analysers"] and result.ready["trained"] is True
    print("transcript:", result.transcript)
    assert {"QUICK", "BROWN", "LAZY"} <= set(result.transcript.upper().split()), result.transcript
    logs = _logs(script, name)
    assert "loading PyTorch model" not in logs, "the model was exported at start, not at build"
    # The session's context went to the /data volume, written by the image's unprivileged user.
    listing = _podman(script, "exec", name, "ls", "-A", "/data").stdout.split()
    assert listing, "nothing written to /data"


def test_the_image_runs_unprivileged_with_a_health_check(
    image: tuple[ModuleType, str], container: tuple[str, int]
) -> None:
    script, tag = image
    name, _ = container
    (inspected,) = json.loads(_podman(script, "image", "inspect", tag).stdout)
    config = inspected["Config"]
    assert config["User"] not in ("", "0", "root")
    assert _podman(script, "exec", name, "id", "-u").stdout.strip() != "0"
    check = inspected.get("Healthcheck") or {}
    assert "/readyz" in " ".join(check.get("Test", [])), inspected
    assert config["Entrypoint"] == ["grym-stream"] and config["Cmd"] == ["serve"]
    assert "/data" in config["Volumes"] and "8765/tcp" in config["ExposedPorts"]
    # No compiler, no browser, no network at run time needed: the image carries its model.
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HF_HUB_OFFLINE"] == "1" and env["GRYM_CACHE_DIR"].startswith("/opt/")
    found = _podman(script, "exec", name, "sh", "-c", "command -v gcc cc chromium", check=False)
    assert not found.stdout.strip(), found.stdout
