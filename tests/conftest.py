"""Shared fixtures: real uvicorn servers on 127.0.0.1 with ephemeral ports, and test audio."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import uvicorn

# No test may reach a model hub, and exported test models are kept between runs in the
# checkout (ignored by git), so only the first run pays for the export.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault(
    "GRYM_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "grym-stream")
)
# Servers the tests start as processes keep their sessions in a throwaway folder.
os.environ.setdefault("GRYM_DATA_DIR", tempfile.mkdtemp(prefix="grym-test-data-"))

from stream.settings import Settings  # noqa: E402
from stream.web.server import Server, server_config  # noqa: E402

# Under xdist (pyproject.toml: -n 2) a module's tests run on one worker, so its module
# fixtures (a built image, a compiled model) are made once; these modules share one worker, one
# after another: each starts a Ray cluster, and Ray takes fixed ports besides the one it is given.
SHARED_WORKER = {
    "tests/test_ray.py": "ray",
    "tests/test_ray_bench.py": "ray",
    "tests/test_cluster.py": "ray",
}
# Modules that need the machine to themselves: audio played, generated or served in real time
# (a stream that must not run dry, a page's player, a generator's restart deadlines), benchmarks,
# the image build (a CPU hog of its own) and the Ray clusters. Beside another worker some of
# them failed (a server's start-up past 30 s, also with a Ray deployment, a player's underrun, a
# continuous stream one segment short, chaos's "identical to a run alone"). `make test` runs
# them after the rest, in one process.
SERIAL = {
    "tests/test_benchmarks.py", "tests/test_browser.py", "tests/test_chaos.py",
    "tests/test_continuous_server.py", "tests/test_generation_restart.py",
    "tests/test_generation_server.py", "tests/test_image.py", "tests/test_webrtc.py",
    "tests/test_ray.py", "tests/test_ray_bench.py", "tests/test_cluster.py",
}  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.split("::", 1)[0] in SERIAL:
            item.add_marker(pytest.mark.serial)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SHARED_WORKER.get(module, module)

    return ByModule(config, log)


class RunningServer:
    def __init__(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread
        self.port = server.servers[0].sockets[0].getsockname()[1]
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def app(self):  # the Starlette app, for looking at live state
        return self.server.config.app


@contextlib.contextmanager
def run_server(
    send_buffer: int | None = None,
    generator_loader: Any = None,
    analysers: Any = None,
    tracer_provider: Any = None,
    **settings: object,
) -> Iterator[RunningServer]:
    """A real server in a thread of its own (its own event loop), like a deployed one.

    `send_buffer` fixes the kernel's send buffer of every accepted connection (Linux copies it
    from the listening socket), standing in for a slow network in front of a slow reader.
    No generator unless asked for (`generator="tiny"`): its worker process costs seconds.
    `analysers` replaces the models the settings name (a function of the settings).
    `tracer_provider`: an OpenTelemetry TracerProvider that traces the sessions.
    """
    settings.setdefault("analysis_model", "tiny-random")
    settings.setdefault("generator", "none")
    settings.setdefault("data_dir", tempfile.mkdtemp(prefix="grym-test-data-"))
    config = server_config(
        Settings(host="127.0.0.1", port=0, log_level="warning", **settings),
        generator_loader=generator_loader,
        tracer_provider=tracer_provider,
        **({"analysers": analysers} if analysers is not None else {}),
    )
    server = Server(config)  # the server's own: sessions finish before it shuts down
    listener = socket.socket()
    if send_buffer:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    listener.bind(("127.0.0.1", 0))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name="test-server", daemon=True
    )
    thread.start()
    for _ in range(600):
        if server.started:
            break
        if not thread.is_alive():
            listener.close()
            raise RuntimeError("test server failed to start")
        thread.join(0.05)
    else:
        listener.close()
        raise RuntimeError("test server did not start within 30 s")
    try:
        yield RunningServer(server, thread)
    finally:
        server.should_exit = True
        thread.join(30)
        listener.close()


def serve_process(data_dir: Path, *args: str, port: int = 0) -> tuple[subprocess.Popen[bytes], int]:
    """`python -m stream serve` on `port` (0: an ephemeral one), keeping context in `data_dir`,
    with `args`; its log goes to data_dir/server.log (a pipe nobody reads could stall it)."""
    log_path = data_dir / "server.log"
    already = log_path.stat().st_size if log_path.exists() else 0  # an earlier server's log
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream", "serve", "--port", str(port), "--data-dir",
             str(data_dir), *args],
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    for _ in range(1200):
        text = log_path.read_bytes()[already:].decode(errors="replace")
        if match := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", text):
            return proc, int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError("the server did not start:\n" + log_path.read_text())


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    with run_server() as running:
        yield running


@dataclass(frozen=True)
class ArrayWindow:
    """An analysis window made by hand (models.base.AnalysisWindow), for analyser tests."""

    audio: np.ndarray
    chunk_start: int
    chunk_end: int
    audio_start: int = 0
    stream: str = ""


def tone(
    seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.5, channels: int = 1
) -> np.ndarray:
    """float32 (frames, channels) sine, identical in every channel."""
    t = np.arange(round(seconds * rate)) / rate
    mono = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(mono[:, None], channels, axis=1)


def espeak(text: str, path: Path) -> Path:
    """Speech made at test time; CI installs espeak-ng (Makefile: system-deps)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is not installed: run `make system-deps` (Debian: espeak-ng)")
    subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 5 s of English speech at espeak's 22050 Hz, mono."""
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    espeak(
        "The quick brown fox jumps over the lazy dog. Streaming audio analysis works "
        "from end to end, one chunk after another.",
        path,
    )
    audio, rate = sf.read(path, dtype="float32")
    assert rate == 22050 and len(audio) > 3 * rate
    return path


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server (Debian's package), started for this test run in a throwaway
    folder on 127.0.0.1 (grym/cluster/postgres.py; `make test` installs the package)."""
    from grym.cluster.postgres import Postgres

    with Postgres() as running:
        yield running


@pytest.fixture
def pg_url(postgres: Any) -> str:
    """A fresh, empty database on the test run's PostgreSQL: its URL."""
    import psycopg

    name = f"t{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(postgres.url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"
