"""Joining a Ray cluster from a driver process (the analysis bridge, the generation worker),
finding or deploying an application on it, and leaving when it goes away.

Only the driver processes import this (it imports Ray); the front-end's own process never does.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stream.engines.ray.wire import ClusterUnavailable

log = logging.getLogger(__name__)

# A driver whose cluster stopped answering exits with this status; its parent starts it again.
CLUSTER_LOST_EXIT = 75
WATCH_INTERVAL_S = 1.0
WATCH_MISSES = 3  # consecutive unanswered probes before the driver gives up on its cluster


def gcs_address(address: str) -> str:
    """host:port of the cluster's GCS; `auto`: the one `ray start` on this machine wrote down
    (or RAY_ADDRESS). ClusterUnavailable when there is none."""
    if address != "auto":
        return address.removeprefix("ray://") if address.startswith("ray://") else address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        return current.read_text().strip()
    except OSError:
        raise ClusterUnavailable(
            "no local Ray cluster (--ray-address auto): start one with `ray start --head`, or "
            "give --ray-address host:port"
        ) from None


def answers(gcs: str, timeout: float = 1.0) -> bool:
    """The GCS accepts a TCP connection: the cluster is there (its head node at least)."""
    host, _, port = gcs.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout):
            return True
    except (OSError, ValueError):
        return False


def join(address: str) -> str:
    """Connect this process to the cluster as a driver; its GCS address. Checks first that
    the GCS answers at all (ray.init waits for minutes on an address where nothing listens)."""
    gcs = gcs_address(address)
    if not answers(gcs, timeout=3.0):
        raise ClusterUnavailable(f"no Ray cluster answers at {gcs} (--ray-address {address})")
    import ray

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its start-up chatter
    ray.init(
        address=gcs,
        namespace="grym-stream",
        logging_level=logging.WARNING,
        log_to_driver=False,  # the replicas' logs stay in Ray's log files, not ours
        configure_logging=False,
    )
    return gcs


def watch(gcs: str, interval: float = WATCH_INTERVAL_S, misses: int = WATCH_MISSES) -> None:
    """A daemon thread that ends this process (CLUSTER_LOST_EXIT) once the GCS has not answered
    `misses` probes in a row: a Ray driver cannot move to a cluster started again, and Ray
    itself would end it a minute later; the parent starts a fresh driver instead."""

    def probe() -> None:
        missed = 0
        while True:
            time.sleep(interval)
            missed = 0 if answers(gcs, timeout=interval) else missed + 1
            if missed >= misses:
                log.error("the Ray cluster at %s stopped answering: leaving it", gcs)
                os._exit(CLUSTER_LOST_EXIT)

    threading.Thread(target=probe, name="ray-cluster-watch", daemon=True).start()


def application(name: str, build: Callable[[], Any], wait_s: float = 300.0) -> Any:
    """A handle on the Serve application `name`: the running one (`serve deploy` of
    deploy/ray-serve.yaml, or another front-end's), or else the one that `build()` makes,
    deployed now, without Serve's HTTP proxy (front-ends call handles)."""
    from ray import serve

    running = serve.status().applications.get(name)
    if running is None or str(running.status).endswith(("DEPLOY_FAILED", "DELETING")):
        log.info("deploying the Serve application %s", name)
        _start_serve_without_proxy()
        serve.run(build(), name=name, route_prefix=None, blocking=False)
    deadline = time.monotonic() + wait_s
    while True:  # one deployed by someone else may still be starting its replicas
        state = str(serve.status().applications[name].status)
        if state.endswith("RUNNING"):
            return serve.get_app_handle(name)
        if state.endswith("DEPLOY_FAILED") or time.monotonic() > deadline:
            message = serve.status().applications[name].message
            raise ClusterUnavailable(f"the Serve application {name} is {state}: {message}")
        time.sleep(0.2)


def _start_serve_without_proxy() -> None:
    from ray import serve
    from ray.serve.config import ProxyLocation

    try:
        serve.start(proxy_location=ProxyLocation.Disabled)
    except Exception:  # noqa: BLE001 - already started (with whatever proxies its owner chose)
        log.debug("Serve was already running", exc_info=True)
