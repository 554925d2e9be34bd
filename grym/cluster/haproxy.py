"""HAProxy in front of several front-ends: its configuration, and a process of it for tests,
benchmarks and `grym-stream cluster`.

The configuration comes from one template (haproxy.cfg beside this file); deploy/haproxy.cfg is
it rendered for two local front-ends (a test keeps the two the same).

    with Balancer(port, [("a", 8766), ("b", 8767)]) as balancer:
        balancer.url  # ws://127.0.0.1:PORT/v1/stream
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path
from string import Template
from types import TracebackType

# deploy/haproxy.cfg: the template rendered with these.
EXAMPLE = {"listen": "0.0.0.0:8765", "servers": [("edge-1", "127.0.0.1", 8766),
                                                  ("edge-2", "127.0.0.1", 8767)]}  # fmt: skip


def render(listen: str, servers: list[tuple[str, str, int]], check_inter: str = "1s") -> str:
    """The configuration: clients connect to `listen` (host:port); `servers` are (name, host,
    port) of the front-ends; `check_inter` how often each one's /readyz is asked."""
    template = Template(resources.files("grym.cluster").joinpath("haproxy.cfg").read_text())
    lines = "\n".join(f"    server {name} {host}:{port} check" for name, host, port in servers)
    return template.substitute(listen=listen, servers=lines, check_inter=check_inter)


class Balancer:
    def __init__(
        self, port: int, frontends: list[tuple[str, int]], check_inter: str = "300ms"
    ) -> None:
        """`frontends`: (name, port) of servers on 127.0.0.1."""
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise FileNotFoundError("HAProxy is not installed (Debian: apt-get install haproxy)")
        self.binary, self.port = binary, port
        self.folder = Path(tempfile.mkdtemp(prefix="grym-haproxy-"))
        self.config = self.folder / "haproxy.cfg"
        servers = [(name, "127.0.0.1", p) for name, p in frontends]
        self.config.write_text(render(f"127.0.0.1:{port}", servers, check_inter))
        self.log = self.folder / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Balancer:
        subprocess.run([self.binary, "-c", "-q", "-f", str(self.config)], check=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-db", "-f", str(self.config)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError("HAProxy did not start:\n" + self.log.read_text())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Balancer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
