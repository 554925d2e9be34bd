"""The floor: a bare `websockets` echo server in its own process, and live-paced clients that
measure the round trip of each 20 ms audio frame through it.

A server's WebSocket transport cannot beat one round trip through the same library on the same
machine with the same pacing; what the server's events spend beyond their server-side stages
(`transport_ms`, benchmarks/load.py) is compared with this.

    python -m benchmarks.echo --serve PORT     # the echo server (started by `echo_server()`)
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from clients.stream_client import percentile

FRAME_BYTES = 640  # 20 ms of 16 kHz s16 mono: what the load generator sends


async def _echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def _serve(port: int) -> None:
    async with serve(_echo, "127.0.0.1", port, max_size=None) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"echo listening on {bound}", flush=True)
        await asyncio.Future()


@contextmanager
def echo_server() -> Iterator[str]:
    """The echo server as a separate process (its own loop and GIL, as the real server has);
    yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.echo", "--serve", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("echo listening on "):
            raise RuntimeError(f"echo server did not start: {line!r}")
        yield f"ws://127.0.0.1:{int(line.split()[-1])}"
    finally:
        proc.terminate()
        proc.wait(10)


async def _client(url: str, seconds: float, delay: float) -> list[float]:
    """Frames sent at real-time pace; each one's round trip in ms."""
    await asyncio.sleep(delay)
    frames = int(seconds * 50)
    sent: dict[int, float] = {}
    trips: list[float] = []
    async with connect(url, max_size=None) as ws:

        async def receive() -> None:
            for _ in range(frames):
                message = await ws.recv()
                trips.append(
                    (time.monotonic() - sent[int.from_bytes(message[:4], "little")]) * 1000
                )

        receiver = asyncio.create_task(receive())
        t0 = time.monotonic()
        for i in range(frames):
            await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))
            sent[i] = time.monotonic()
            await ws.send(i.to_bytes(4, "little") + bytes(FRAME_BYTES - 4))
        await asyncio.wait_for(receiver, 30)
    return trips


async def measure(url: str, sessions: int, seconds: float) -> dict[str, Any]:
    """`sessions` live-paced clients at once, staggered over 20 ms."""
    runs = [_client(url, seconds, i * 0.02 / max(sessions, 1)) for i in range(sessions)]
    trips = [t for client in await asyncio.gather(*runs) for t in client]
    return {
        "sessions": sessions,
        "frames": len(trips),
        "p50_ms": percentile(trips, 50),
        "p95_ms": percentile(trips, 95),
        "p99_ms": percentile(trips, 99),
        "max_ms": max(trips, default=float("nan")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, metavar="PORT", help="run the echo server")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.serve is not None:
        asyncio.run(_serve(args.serve))
        return 0
    with echo_server() as url:
        print(asyncio.run(measure(url, args.sessions, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
