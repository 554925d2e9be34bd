"""A throwaway one-node Ray cluster, for tests, benchmarks and `grym-stream cluster`.

`ray start --head --block` in a process group of its own, on 127.0.0.1 and a free port, with
the dashboard off (it idles at about 300 MB) and a temp folder of its own; stopped by ending that
process group, so that `ray stop` (which stops every cluster on the machine) is never needed and
a developer's own cluster is left alone.

    with RayCluster(cpus=4) as ray_cluster:
        ray_cluster.address  # 127.0.0.1:PORT, for --ray-address
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from grym.cluster import free_port
from stream.engines.ray.cluster import answers


def ray_command() -> str:
    """The `ray` script of this Python's environment (the `ray` extra), else PATH's."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if found is None:
        raise FileNotFoundError("Ray is not installed: pip install 'grym-stream[ray]'")
    return found


class RayCluster:
    def __init__(self, cpus: int = 2, port: int | None = None, start_timeout: float = 60.0):
        self.cpus, self.port = cpus, port or free_port()
        self.start_timeout = start_timeout
        # Short: Ray puts its sockets under it (a Unix socket path has at most 107 bytes).
        self.folder = Path(tempfile.mkdtemp(prefix="grym-ray-", dir="/tmp"))
        self.log = self.folder / "ray-start.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RayCluster:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        command = [
            ray_command(), "start", "--head", "--block", "--port", str(self.port),
            "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus), "--num-gpus", "0",
            "--include-dashboard=false", "--disable-usage-stats",
            "--temp-dir", str(self.folder / "t"),
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout
        while not answers(self.address, timeout=0.5):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start failed:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            # A throwaway cluster has nothing to save: a short grace, then SIGKILL. (Its
            # workers run in process groups of their own; they exit once the raylet is gone.)
            for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            _kill_group(process.pid)  # workers that outlived `ray start`
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
