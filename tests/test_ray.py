"""Models on Ray Serve (`--inference ray`), on a real one-node Ray cluster started for this module
(grym/cluster/ray.py: `ray start --head` on 127.0.0.1, dashboard off), with real deployments,
real front-ends and real clients: the same analysis as in-process, windows of two front-ends in
one replica batch, generation streamed and cancelled on a replica, replicas killed under load.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import soxr

from clients.stream_client import StreamClient, StreamResult
from grym.cluster import free_port
from grym.cluster.ray import RayCluster
from models.base import decode_embedding
from stream.core.audio.pcm import Encoding
from tests.conftest import RunningServer, run_server

RATE = 16_000
# fp32: results that batching cannot change, so that local and remote compare exactly.
MODEL = {"analysis_model": "tiny", "analysis_variant": "fp32", "analysis_threads": 1}
# A replica batch waits up to 150 ms for more windows: the two front-ends' windows meet.
RAY = {**MODEL, "inference": "ray", "ray_batch_wait_ms": 150.0, "persist": False}
TIMING = {"timing": True, "when_behind": "wait"}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    with RayCluster(cpus=4) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def frontends(ray_cluster: RayCluster) -> Iterator[list[RunningServer]]:
    """Two front-ends on the cluster; the first deploys both applications (tiny generator),
    the second finds them running."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                run_server(
                    ray_address=ray_cluster.address, frontend_id=name, generator="tiny", **RAY
                )
            )
            for name in ("a", "b")
        ]


@pytest.fixture(scope="module")
def speech(speech_wav: Path) -> np.ndarray:
    audio, rate = sf.read(speech_wav, dtype="float32")
    return soxr.resample(audio, rate, RATE).astype(np.float32)


async def blocks(audio: np.ndarray, block: float = 0.25) -> AsyncIterator[np.ndarray]:
    step = int(block * RATE)
    for i in range(0, len(audio), step):
        yield audio[i : i + step]


async def stream(
    server: RunningServer,
    audio: np.ndarray,
    config: dict[str, Any] | None = None,
    realtime: bool = False,
    on_event: Any = None,
) -> StreamResult:
    client = StreamClient(server.ws, RATE, 1, Encoding.PCM_S16LE, config=config)
    if on_event is not None:
        client.on_event = lambda event: on_event(client, event)
    return await client.run(blocks(audio), realtime=realtime)


def comparable(event: dict[str, Any]) -> dict[str, Any]:
    """An analysis event without what differs between runs (timings, ids, latency)."""
    return {
        k: v
        for k, v in event.items()
        if k not in ("timing", "n", "session", "latency_ms", "client_time", "client_latency_ms")
    }


def assert_close(got: Any, want: Any, where: str = "") -> None:
    """Equal, but for floats: as close as fp32 rows batched differently can be."""
    if isinstance(want, dict) and "base64" in want:  # an embedding
        np.testing.assert_allclose(decode_embedding(got), decode_embedding(want), atol=2e-3)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-4), where
    else:
        assert got == want, where


def assert_same_analysis(got: StreamResult, want: StreamResult) -> None:
    assert [e["seq"] for e in got.analysis] == [e["seq"] for e in want.analysis]
    for mine, theirs in zip(got.analysis, want.analysis):
        assert_close(comparable(mine), comparable(theirs), f"seq {theirs['seq']}")
    assert got.transcript == want.transcript


async def test_two_front_ends_share_one_deployment_and_analyse_as_in_process(
    frontends: list[RunningServer], speech: np.ndarray
) -> None:
    with run_server(**MODEL) as local:
        want = await stream(local, speech, TIMING)
    a, b = frontends
    got_a, got_b = await asyncio.gather(
        stream(a, speech, TIMING, realtime=True), stream(b, speech, TIMING, realtime=True)
    )
    assert want.transcript.strip()
    for got in (got_a, got_b):
        assert got.end is not None and not got.errors
        assert_same_analysis(got, want)
        assert got.ready["models"]["wav2vec2"]["model"] == want.ready["models"]["wav2vec2"]["model"]
    # Every event says what Ray cost it, and some replica batches held both front-ends' windows.
    remote = [e["timing"]["engines"]["wav2vec2"]["remote"] for e in got_a.analysis + got_b.analysis]
    assert all(r["replica_queue_ms"] >= 0 and r["replica_inference_ms"] > 0 for r in remote)
    assert all(r["transfer_ms"] >= 0 for r in remote)
    together = [r for r in remote if r["replica_frontends"] == 2]
    assert together and all(r["replica_batch"] >= 2 for r in together)
    local_timing = want.analysis[0]["timing"]["engines"]["wav2vec2"]
    assert "remote" not in local_timing


def replica_pids(application: str) -> list[int]:
    """Processes of the Serve replicas of `application` (Ray titles them
    ray::ServeReplica:<application>:<deployment>)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if title.startswith(f"ray::ServeReplica:{application}:"):
                found.append(int(entry.name))
    return found


async def test_a_killed_analysis_replica_is_restarted_and_no_window_is_lost(
    frontends: list[RunningServer], speech: np.ndarray
) -> None:
    a, _ = frontends
    [pid] = replica_pids("wav2vec2-analysis")
    killed: list[int] = []

    def on_event(client: StreamClient, event: dict[str, Any]) -> None:
        if event["type"] == "analysis" and event["seq"] == 1 and not killed:
            # The sessions' next windows are on the replica 50 ms from now, waiting 150 ms for
            # their batch to fill: the replica's actor dies with them in hand.
            asyncio.get_running_loop().call_later(0.05, os.kill, pid, signal.SIGKILL)
            killed.append(pid)

    # Sent as fast as the server takes it: the replica always has windows in hand.
    audio = np.concatenate([speech, speech])
    results = await asyncio.gather(
        stream(a, audio, TIMING, on_event=on_event), stream(a, audio, TIMING),
        stream(a, audio, TIMING),
    )  # fmt: skip
    assert killed
    chunks = len(results[0].analysis)
    for result in results:
        assert result.end is not None and not result.errors, result.errors
        assert [e["seq"] for e in result.analysis] == list(range(chunks))
        assert all("wav2vec2" in e for e in result.analysis)
        assert result.end.get("skipped_chunks", 0) == 0
    # Ray started a new replica; the engine retried what the dead one held.
    [new] = replica_pids("wav2vec2-analysis")
    assert new != pid
    async with httpx.AsyncClient(base_url=a.http) as http:
        health = (await http.get("/healthz")).json()
        assert health["analysis"]["wav2vec2"]["retries"] >= 1
        assert (await http.get("/readyz")).status_code == 200


def test_an_unreachable_cluster_is_a_clear_start_up_error() -> None:
    port = free_port()  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "stream", "serve", "--port", "0", "--persist", "false",
         "--inference", "ray", "--ray-address", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "cannot run the models on Ray" in done.stderr
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in done.stderr


def test_the_default_install_never_imports_ray() -> None:
    """`--inference local` (the default) loads no part of Ray: the extra is optional."""
    code = (
        "import sys; from stream.settings import Settings; from stream.wiring import "
        "default_analysers; import stream.web.app, stream.cli; "
        "default_analysers(Settings(analysis_model='tiny-random', generator='none')); "
        "assert 'ray' not in sys.modules, 'ray was imported'; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def kinds(result: StreamResult, number: int) -> list[str]:
    return [e["type"].removeprefix("generation.") for e in result.generation(number)]


async def test_generation_streams_from_a_replica_and_cancel_and_supersede_hold(
    frontends: list[RunningServer], speech: np.ndarray
) -> None:
    a, _ = frontends
    sent: list[str] = []

    def on_event(client: StreamClient, event: dict[str, Any]) -> None:
        long = {"type": "generate", "seconds": 8.0, "steps": 60, "auto_prompt": False}
        short = {"type": "generate", "seconds": 1.5, "steps": 3, "auto_prompt": False}
        if event["type"] == "analysis" and event["seq"] == 0 and not sent:
            sent.append("whole")
            asyncio.ensure_future(client.send_control({**short, "prompt": "whole"}))
        elif event["type"] == "generation.done" and event["id"] == 1:
            asyncio.ensure_future(client.send_control({**long, "prompt": "long"}))
        elif event["type"] == "generation.progress" and event["id"] == 2 and len(sent) == 1:
            # While 2 runs on the replica: 3 queues, 4 supersedes it; then 2 is cancelled.
            sent.append("more")
            asyncio.ensure_future(client.send_control({**short, "prompt": "three"}))
            asyncio.ensure_future(client.send_control({**short, "prompt": "four"}))
            asyncio.ensure_future(client.send_control({"type": "cancel", "id": 2}))

    config = {"generation": {"sample_rate": 16_000, "encoding": "pcm_f32le"}}
    result = await stream(a, speech, config, realtime=True, on_event=on_event)
    assert result.ready["generator"]["model"] == "tiny"
    # 1: every block of the clip, in order, adding up to what `done` announces.
    assert kinds(result, 1) == ["queued", "started", "progress", "progress", "progress", "done"]
    frames = result.audio[1]
    assert [h.index for h, _ in frames] == list(range(len(frames))) and frames[-1][0].last
    assert result.generation(1)[-1]["samples"] == len(result.clip(1)) == 24_000
    # 2: cancelled on the replica within a step of the request; 3 superseded; 4 made.
    assert kinds(result, 2)[-1] == "cancelled" and result.generation(2)[-1]["reason"] == "client"
    steps = [e["step"] for e in result.generation(2) if e["type"] == "generation.progress"]
    assert steps and max(steps) < 60
    assert kinds(result, 3) == ["queued", "cancelled"]
    assert result.generation(3)[-1]["reason"] == "superseded"
    assert kinds(result, 4)[-1] == "done" and len(result.clip(4)) == 24_000


async def test_a_killed_generation_replica_fails_its_clip_and_the_next_one_runs(
    frontends: list[RunningServer], speech: np.ndarray
) -> None:
    _, b = frontends
    killed: list[int] = []

    def on_event(client: StreamClient, event: dict[str, Any]) -> None:
        long = {"type": "generate", "seconds": 8.0, "steps": 60, "auto_prompt": False}
        if event["type"] == "analysis" and event["seq"] == 0:
            asyncio.ensure_future(client.send_control({**long, "prompt": "doomed"}))
        elif event["type"] == "generation.progress" and event["id"] == 1 and not killed:
            [pid] = replica_pids("audioldm-generation")
            os.kill(pid, signal.SIGKILL)  # mid-clip
            killed.append(pid)
        elif event["type"] == "generation.failed" and event["id"] == 1:
            short = {"type": "generate", "seconds": 1.0, "steps": 2, "auto_prompt": False}
            asyncio.ensure_future(client.send_control({**short, "prompt": "after"}))

    config = {"generation": {"sample_rate": 16_000, "encoding": "pcm_f32le"}}
    result = await stream(b, np.concatenate([speech, speech]), config, True, on_event)
    assert killed and result.end is not None
    failed = result.generation(1)[-1]
    assert failed["type"] == "generation.failed" and failed["code"] == "generation_failed"
    assert "replica" in failed["message"]
    # Ray started the replica again; the front-end stayed up and the next clip was made there.
    assert kinds(result, 2)[-1] == "done" and len(result.clip(2)) == 16_000
    assert replica_pids("audioldm-generation") != killed


async def until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"not {what} within {seconds:g} s"
        await asyncio.sleep(0.25)


async def test_a_cluster_that_goes_away_is_reported_and_comes_back_on_its_own(
    speech: np.ndarray,
) -> None:
    """Sessions get typed errors (not a hang) and /readyz 503 while the cluster is gone; once a
    cluster answers at the address again, the front-end deploys and uses it, unrestarted."""
    port = free_port()
    async with AsyncExitStack() as stack:
        first = stack.enter_context(RayCluster(cpus=3, port=port))
        settings = {**RAY, "ray_address": first.address, "generator": "tiny"}
        server = stack.enter_context(run_server(**settings))
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=server.http))

        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        async def unready() -> bool:
            response = await http.get("/readyz")
            body = response.json()
            return response.status_code == 503 and not body["inference"] and not body["generator"]

        assert await ready()
        stopped: list[bool] = []

        def on_event(client: StreamClient, event: dict[str, Any]) -> None:
            if event["type"] == "analysis" and event["seq"] == 1 and not stopped:
                stopped.append(True)
                asyncio.get_running_loop().run_in_executor(None, first.stop)

        audio = np.concatenate([speech] * 2)
        during = await stream(server, audio, {"when_behind": "wait"}, True, on_event)
        assert during.end is not None  # the session went on to its end
        failed = [e for e in during.errors if e["code"] == "analysis_failed"]
        assert failed and all(not e["fatal"] for e in failed)
        assert "wav2vec2" in during.analysis[0] and "wav2vec2" not in during.analysis[-1]
        assert all("features" in e for e in during.analysis)  # DSP stays on the front-end
        await until(unready, 30, "503 while the cluster is gone")

        stack.enter_context(RayCluster(cpus=3, port=port))
        await until(ready, 90, "ready again once the cluster is back")
        after = await stream(server, speech, {"when_behind": "wait"})
        assert not after.errors and all("wav2vec2" in e for e in after.analysis)
        assert after.transcript.strip()


async def test_the_shipped_serve_config_deploys_and_front_ends_use_it(speech: np.ndarray) -> None:
    """deploy/ray-serve.yaml, deployed by Ray's own CLI; a front-end finds its applications by
    name and runs on them (their int8 model, not the fp32 one of its own settings)."""
    config = Path(__file__).resolve().parents[1] / "deploy" / "ray-serve.yaml"
    serve_cli = str(Path(sys.executable).parent / "serve")
    with RayCluster(cpus=4) as cluster:
        done = subprocess.run(
            [serve_cli, "run", "--non-blocking", "-a", cluster.address, str(config)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        with run_server(**{**RAY, "ray_address": cluster.address, "generator": "tiny"}) as server:
            result = await stream(server, speech)
    assert result.ready["models"]["wav2vec2"]["model"].endswith(":int8")
    assert result.ready["generator"]["model"] == "tiny"
    assert not result.errors and all("wav2vec2" in e for e in result.analysis)
