"""Failover through a real balancer: two front-end processes on one PostgreSQL behind HAProxy
(all real processes on 127.0.0.1, started by grym/cluster). A client streams a speech file
through the balancer; the front-end serving it is killed (SIGKILL) or stopped (SIGTERM) mid-
stream; the client resumes through the balancer on the other front-end, and the session ends
with every sample received once and every chunk analysed once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from clients.stream_client import StreamClient, StreamResult
from grym.cluster import free_port
from grym.cluster.haproxy import Balancer
from tests.conftest import serve_process
from tests.test_resume import paced

CHUNK_S = 0.5


@dataclass
class Cluster:
    balancer: Balancer
    frontends: dict[str, tuple[subprocess.Popen[bytes], int]]  # name -> (process, port)

    def http(self, name: str) -> str:
        return f"http://127.0.0.1:{self.frontends[name][1]}"


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path) -> Iterator[Cluster]:
    frontends = {}
    try:
        for name in ("a", "b"):
            folder = tmp_path / name
            folder.mkdir()
            frontends[name] = serve_process(
                folder, "--store", pg_url, "--frontend-id", name, "--lease-seconds", "2",
                "--drain-seconds", "1", "--analysis-model", "tiny-random", "--generator", "none",
                "--chunk-seconds", str(CHUNK_S), "--left-context-seconds", "0.5",
            )  # fmt: skip
        ports = [(name, port) for name, (_, port) in frontends.items()]
        with Balancer(free_port(), ports) as balancer:
            yield Cluster(balancer, frontends)
    finally:
        for proc, _ in frontends.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


def hold_out(speech_wav: Path) -> tuple[np.ndarray, int]:
    """The speech file twice, with a pause: about 12 s, mono."""
    audio, rate = sf.read(speech_wav, dtype="float32")
    pause = np.zeros(rate // 2, np.float32)
    return np.concatenate([audio, pause, audio])[:, None], rate


async def serving(cluster: Cluster, session: str) -> str:
    """The front-end whose status lists the session as attached."""
    async with httpx.AsyncClient() as http:
        for _ in range(100):
            for name in cluster.frontends:
                status = (await http.get(f"{cluster.http(name)}/v1/status")).json()
                if any(s["id"] == session and s["attached"] for s in status["sessions"]):
                    return name
            await asyncio.sleep(0.05)
    raise AssertionError(f"no front-end serves {session}")


async def stream_and_interrupt(
    cluster: Cluster, speech_wav: Path, how: signal.Signals
) -> tuple[StreamResult, StreamClient, np.ndarray, str, str]:
    audio, rate = hold_out(speech_wav)
    client = StreamClient(
        cluster.balancer.url, rate, 1, config={"when_behind": "wait"}, resume_seconds=60
    )
    running = asyncio.create_task(client.run(paced(audio, rate // 10, speed=2.0), realtime=False))
    while client.acked < 2 * rate:  # some of it safe, the rest in flight
        await asyncio.sleep(0.02)
    first = await serving(cluster, client.session)
    proc = cluster.frontends[first][0]
    os.kill(proc.pid, how)
    result = await asyncio.wait_for(running, 120)
    (second,) = [name for name in cluster.frontends if name != first]
    return result, client, audio, first, second


async def timeline(cluster: Cluster, name: str, session: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{cluster.http(name)}/v1/sessions/{session}/timeline")
        assert response.status_code == 200
        return response.json()


def assert_once_and_whole(
    result: StreamResult, entries: list[dict[str, Any]], audio: np.ndarray, rate: int
) -> None:
    # Every sample arrived once: the count is exact (the resent audio starts where the new
    # front-end said, not where the client had got to).
    assert result.end is not None and result.close_code == 1000
    assert result.end["samples_received"] == len(audio) == result.samples_sent
    chunks = -(-len(audio) * 16_000 // rate // int(CHUNK_S * 16_000))  # ceil, at 16 kHz
    # Every chunk once, in order, tiling the audio, in the store both front-ends share.
    assert [e["seq"] for e in entries] == list(range(chunks)) == list(range(result.end["chunks"]))
    assert all(b["start"] == a["end"] for a, b in zip(entries, entries[1:]))
    assert entries[-1]["end"] == pytest.approx(len(audio) / rate, abs=1e-3)
    # What the client saw: events numbered on without a repeat; every chunk reported (a chunk
    # analysed again after the failover replaces what was lost with the old front-end).
    numbers = [e["n"] for e in result.events if "n" in e]
    assert numbers == sorted(set(numbers))
    assert sorted({e["seq"] for e in result.analysis}) == list(range(chunks))


async def test_a_front_end_killed_mid_stream_loses_no_sample(
    cluster: Cluster, speech_wav: Path
) -> None:
    result, client, audio, first, second = await stream_and_interrupt(
        cluster, speech_wav, signal.SIGKILL
    )
    assert result.resumes >= 1 and result.ready["frontend"] == first
    assert_once_and_whole(result, await timeline(cluster, second, client.session), audio, 22050)
    resumed = [e for e in result.events if e["type"] == "analysis"]
    assert resumed and all(e["n"] > 0 for e in resumed)


async def test_a_front_end_stopped_mid_stream_hands_its_session_over(
    cluster: Cluster, speech_wav: Path
) -> None:
    result, client, audio, first, second = await stream_and_interrupt(
        cluster, speech_wav, signal.SIGTERM
    )
    assert result.resumes == 1
    # Drained, handed over, exited by itself (uvicorn re-raises SIGTERM after a clean shutdown).
    assert cluster.frontends[first][0].wait(30) == -signal.SIGTERM
    assert_once_and_whole(result, await timeline(cluster, second, client.session), audio, 22050)


def test_the_shipped_balancer_config_is_the_template_rendered() -> None:
    """deploy/haproxy.cfg is what grym/cluster/haproxy.cfg gives for two local front-ends."""
    from grym.cluster.haproxy import EXAMPLE, render

    shipped = Path(__file__).resolve().parents[1] / "deploy" / "haproxy.cfg"
    assert shipped.read_text() == render(EXAMPLE["listen"], EXAMPLE["servers"]) + "\n"  # type: ignore[arg-type]
    checked = subprocess.run(["haproxy", "-c", "-f", str(shipped)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
