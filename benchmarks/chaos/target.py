"""The server under attack: `python -m stream serve` as a process of its own, which a scenario
can signal, kill, restart on the same data folder, and measure (RSS, open file descriptors)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

# What every target runs unless a scenario says otherwise: the shipped models, offline, no
# generator (it costs a process and seconds). Its log level stays at info: `start` waits for
# uvicorn's "running on" line.
DEFAULTS = {"--generator": "none"}
START_TIMEOUT_S = 120.0


class Target:
    def __init__(self, *flags: str, data_dir: str | None = None, **settings: Any) -> None:
        """`flags` and `settings` (`max_sessions=4` -> `--max-sessions 4`) for `serve`."""
        options = dict(DEFAULTS)
        for name, value in settings.items():
            options["--" + name.replace("_", "-")] = str(value)
        self.args = [a for pair in options.items() for a in pair] + list(flags)
        self._own_dir = data_dir is None  # made here: removed when the target is done
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="grym-chaos-")
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.log: deque[str] = deque(maxlen=200)  # the server's last lines, for a failure

    # --- life ------------------------------------------------------------------------------

    def start(self) -> Target:
        command = [sys.executable, "-m", "stream", "serve", "--port", "0", "--log-level", "info"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRYM_DATA_DIR": self.data_dir}
        self.proc = subprocess.Popen(
            [*command, *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in self.proc.stdout:
            self.log.append(line)
            if match := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
                threading.Thread(target=self._drain, daemon=True).start()
                break
            if time.monotonic() > deadline:
                break
        else:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        self.wait_ready()
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:  # never let a full pipe stall the server
            self.log.append(line)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        """Seconds until /readyz says 200."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if self.get("/readyz")[0] == 200:
                return time.monotonic() - began
            time.sleep(0.05)
        raise TimeoutError("the server did not become ready")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL if it hangs); returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(10)

    def __enter__(self) -> Target:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # --- where and how much ------------------------------------------------------------------

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, JSON body or None); status 0 when the server does not answer."""
        request = urllib.request.Request(self.http + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _json(error.read())
        except OSError:
            return 0, None

    def rss_mib(self) -> float:
        """The server process's resident memory (its own, not the generation worker's)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def children(self) -> list[int]:
        """Pids of the server's child processes (the generation worker)."""
        found = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            children = (task / "children").read_text().split()
            found += [int(pid) for pid in children]
        return found


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None
