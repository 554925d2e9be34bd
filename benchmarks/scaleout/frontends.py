"""The front-ends: real `python -m stream serve` processes on fixed ports, started together and
stopped together, their server settings (the bench's), and the wait until one answers /readyz."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from grym.cluster import free_port

START_TIMEOUT_S = 300.0  # a first start may export the model


class Frontend:
    """One `python -m stream serve` on a fixed port (so that it can be started again where the
    balancer expects it), its log in a file of its folder."""

    def __init__(self, name: str, folder: Path, flags: list[str]) -> None:
        self.name, self.flags = name, flags
        self.folder = folder / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = self.folder / "server.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log_from = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Frontend:
        return self.launch().wait_started()

    def launch(self) -> Frontend:
        """The process, started (wait_started: until it listens)."""
        self._log_from = self.log.stat().st_size if self.log.exists() else 0
        command = [sys.executable, "-m", "stream", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "info", "--frontend-id", self.name,
                   "--data-dir", str(self.folder), *self.flags]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
            )  # fmt: skip
        return self

    def wait_started(self) -> Frontend:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if b"Uvicorn running on" in self.log.read_bytes()[self._log_from :]:
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"front-end {self.name} did not start:\n{self.log.read_text()[-3000:]}")

    def signal(self, how: signal.Signals) -> None:
        assert self.process is not None
        os.kill(self.process.pid, how)

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def stop(self) -> None:
        """SIGTERM (it drains and exits), then SIGKILL to its process group if it lingers."""
        if self.process is None:
            return
        self.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:  # anything it started (its own session's group)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(10)


@contextmanager
def frontends(folder: Path, flags: dict[str, list[str]]) -> Iterator[list[Frontend]]:
    """Started together (each loads its model while the others do), stopped together."""
    started: list[Frontend] = []
    try:
        for name, its_flags in flags.items():
            started.append(Frontend(name, folder, its_flags).launch())
        for frontend in started:
            frontend.wait_started()
        yield started
    finally:
        for frontend in started:
            frontend.terminate()
        for frontend in started:
            frontend.stop()


def healthy(url: str, timeout: float = 30.0) -> None:
    """Until the front-end answers /readyz with 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, or 503 (HTTPError is an OSError)
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} is not ready")


def analysis_flags(args: argparse.Namespace) -> list[str]:
    """The bench's server settings (benchmarks/bench.py), generation off."""
    return ["--analysis-model", args.model, "--analysis-variant", args.variant,
            "--analysis-threads", str(args.threads), "--max-sessions", "512",
            "--generator", "none"]  # fmt: skip
