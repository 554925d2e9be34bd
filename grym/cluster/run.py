"""`grym-stream cluster`: several front-ends, one PostgreSQL and a balancer on this machine, for
trying the scale-out set-up with one command (docs/deployment.md). Ctrl-C (or SIGTERM) stops it
all: the balancer first, then each front-end (which drains), then the database.

    grym-stream cluster --frontends 2 --port 8765    # clients: ws://127.0.0.1:8765/v1/stream

PostgreSQL is a throwaway cluster in `--folder` (kept between runs, so sessions survive a
restart of the whole set-up) unless `--store` names one. Front-ends are processes of this
installation, or containers of the image (`--image`, `make image` first). With `--ray`, a
one-node Ray cluster starts here too and the models run on it as Ray Serve applications
(`--inference ray`; the first front-end deploys them, the others find them). Every other flag
after `--` goes to each front-end's `serve`.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from grym.cluster import free_port
from grym.cluster.haproxy import Balancer
from grym.cluster.postgres import Postgres
from grym.cluster.ray import RayCluster

START_TIMEOUT_S = 300  # a first start may export the models


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grym-stream cluster", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    p.add_argument("--frontends", type=int, default=2, help="how many front-end servers (2)")
    p.add_argument("--port", type=int, default=8765, help="the balancer's port (8765)")
    p.add_argument("--folder", type=Path, default=Path("data/cluster"),
                   help="the database and the logs (data/cluster)")  # fmt: skip
    p.add_argument("--store", help="an existing postgresql:// URL instead of a local database")
    p.add_argument("--image", help="run front-ends as containers of this image (podman)")
    p.add_argument("--ray", action="store_true",
                   help="run the models on a Ray cluster started here (pip install "
                        "'grym-stream[ray]')")  # fmt: skip
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2,
                   help="logical CPUs of that Ray cluster (this machine's)")  # fmt: skip
    p.add_argument("serve", nargs=argparse.REMAINDER, help="-- then flags for each `serve`")
    return p


class Frontend:
    """One `grym-stream serve` (a process, or a container of the image), its log in a file."""

    def __init__(self, name: str, port: int, store: str, folder: Path, image: str | None,
                 extra: list[str]) -> None:  # fmt: skip
        self.name, self.port = name, port
        self.log = folder / f"{name}.log"
        serve = ["serve", "--host", "127.0.0.1", "--port", str(port), "--store", store,
                 "--frontend-id", name, "--drain-seconds", "2", *extra]  # fmt: skip
        if image is None:
            (folder / name).mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "grym", *serve, "--data-dir", str(folder / name)]
        else:
            conf = Path(__file__).resolve().parents[2] / "deploy" / "containers.conf"
            os.environ.setdefault("CONTAINERS_CONF", str(conf))
            command = ["podman", "run", "--rm", "--runtime", "runc", "--network", "host",
                       "--name", f"grym-{name}", image, *serve]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if re.search(rb"Uvicorn running on", self.log.read_bytes()):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"front-end {self.name} did not start; see {self.log}")

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # it drains, lets its sessions go, exits

    def stop(self) -> None:
        self.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.ray and args.image:
        parser().error("--ray runs front-end processes (the image has no Ray): drop --image")
    extra = [a for a in args.serve if a != "--"]
    folder = args.folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    database = None if args.store else Postgres(folder / "postgres", port=free_port())
    frontends: list[Frontend] = []
    balancer: Balancer | None = None
    ray_cluster = RayCluster(cpus=args.ray_cpus) if args.ray else None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if database is not None:
            print(f"starting PostgreSQL in {database.folder} ...", flush=True)
            database.start()
        store = args.store or database.url  # type: ignore[union-attr]
        if ray_cluster is not None:
            print("starting a Ray cluster ...", flush=True)
            ray_cluster.start()
            print(f"ray: {ray_cluster.address}", flush=True)
            extra = ["--inference", "ray", "--ray-address", ray_cluster.address, *extra]
        names = [f"edge-{i + 1}" for i in range(args.frontends)]
        for name in names:
            frontends.append(Frontend(name, free_port(), store, folder, args.image, extra))
            print(f"starting front-end {name} on port {frontends[-1].port} ...", flush=True)
            if ray_cluster is not None and len(frontends) == 1:
                frontends[0].wait_started()  # it deploys the applications; the rest find them
        for frontend in frontends:
            frontend.wait_started()
        balancer = Balancer(args.port, [(f.name, f.port) for f in frontends], "1s").start()
        print(f"\nready: ws://127.0.0.1:{args.port}/v1/stream (the balancer; the browser page "
              f"at http://127.0.0.1:{args.port}/)\nstore: {store}\nlogs: {folder}\n"
              "Ctrl-C stops everything.", flush=True)  # fmt: skip
        while not stop.wait(1.0):
            for frontend in frontends:
                if frontend.process.poll() is not None:
                    print(f"front-end {frontend.name} exited; see {frontend.log}", flush=True)
                    stop.set()
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping ...", flush=True)
        if balancer is not None:
            balancer.stop()
        for frontend in frontends:  # all at once: each drains for its own --drain-seconds
            frontend.terminate()
        for frontend in frontends:
            frontend.stop()
        if ray_cluster is not None:
            ray_cluster.stop()
        if database is not None:
            database.stop()
    return 0
