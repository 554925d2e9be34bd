"""The floods of the floods scenario, as the attackers run them: in a process of their own at the
lowest priority (`flood_in_process`), standing in for a remote attacker, each returning what
its clients saw."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import resource
import socket
import time
from collections import Counter
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from benchmarks.load import CONFIG, RATE, speech_like
from clients.stream_client import StreamClient, percentile
from stream.core.audio.pcm import Encoding, encode

BLOCK = RATE // 10  # the flooders' frames: 100 ms (20 ms frames at 10x would be 500 a second)
START = {"type": "start", "sample_rate": RATE, "channels": 1, "encoding": Encoding.PCM_S16LE.value}
# The 1-sample flooders come from an address of their own, as a remote attacker would: through
# 127.0.0.1 with X-Forwarded-For, which the server trusts from there (uvicorn's default
# --forwarded-allow-ips). The server refuses an address that keeps flooding at the door, so
# sharing the well-behaved clients' address would lock them out with it.
ATTACKER = {"X-Forwarded-For": "203.0.113.7"}


# --- the floods: each runs in the flood process and returns what its clients saw -------------


async def ten_x(url: str, seconds: float, clients: int) -> dict[str, Any]:
    """`clients` sessions paced at 10x real time (`when_behind: skip`, the live default)."""

    async def paced(audio: np.ndarray) -> Any:
        began = time.monotonic()
        for i in range(0, len(audio), BLOCK):
            await asyncio.sleep(max(0.0, began + (i + BLOCK) / RATE / 10 - time.monotonic()))
            yield audio[i : i + BLOCK, None]

    async def one(i: int) -> dict[str, Any]:
        config = {**CONFIG, "timing": False}
        client = StreamClient(url, RATE, 1, Encoding.PCM_S16LE, config, resume_seconds=0)
        result = await client.run(paced(speech_like(seconds * 10, 100 + i)), realtime=False)
        end = result.end or {}
        errors = [e["code"] for e in result.errors]
        return {"audio_s": round(result.samples_sent / RATE), "ended": bool(end),
                "errors": errors, "skipped": end.get("skipped")}  # fmt: skip

    return {"sessions": await asyncio.gather(*(one(i) for i in range(clients)))}


async def one_sample(url: str, seconds: float, clients: int) -> dict[str, Any]:
    """`clients` flooders of 1-sample frames, each reconnecting at once when refused."""

    async def connection() -> tuple[str | None, int | None, float | None]:
        error = refused_after = None
        began = time.monotonic()
        async with connect(url, additional_headers=ATTACKER) as ws:
            await ws.send(json.dumps(START))
            ready = json.loads(await ws.recv())
            if ready["type"] == "error":  # refused at the door: the address kept flooding
                refused_after = time.monotonic() - began

            async def spam() -> None:
                for sent in itertools.count():
                    await ws.send(b"\0\0")  # one s16le sample
                    if sent % 64 == 0:
                        await asyncio.sleep(0)  # let the reader see the refusal

            spammer = asyncio.create_task(spam())
            try:
                async with asyncio.timeout(10):  # never refused: counted as such
                    async for message in ws:
                        event = json.loads(message) if isinstance(message, str) else {}
                        if event.get("type") == "error" and error is None:
                            error, refused_after = event["code"], time.monotonic() - began
            except ConnectionClosed:  # 1008 ends the iteration with an exception
                pass
            finally:
                spammer.cancel()
                await asyncio.gather(spammer, return_exceptions=True)
        return (ready["code"] if ready["type"] == "error" else error), ws.close_code, refused_after

    async def flooder() -> None:
        while time.monotonic() < deadline:
            try:
                ends.append(await connection())
            except Exception as exc:  # not even a session (or never refused): an ending too
                ends.append((type(exc).__name__, None, None))

    ends: list[tuple[str | None, int | None, float | None]] = []
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(flooder() for _ in range(clients)))
    refused = [after for code, close, after in ends if (code, close) == ("rate_limited", 1008)]
    at_door = [after for code, close, after in ends if (code, close) == ("rate_limited", 1013)]
    return {
        "connections": len(ends),
        "refused_rate_limited_1008": len(refused),
        "refused_at_the_door_1013": len(at_door),
        "other_endings": dict(Counter(f"{c} {cl}" for c, cl, _ in ends if c != "rate_limited")),
        # In session: how soon the flood was cut off (the door answers after a set pause).
        "refused_after_s": {"p50": percentile(refused, 50), "p95": percentile(refused, 95)},
    }


async def never_reading(url: str, seconds: float, clients: int) -> dict[str, Any]:
    """`clients` sessions that stream at real time and never read; when the server ended each
    (the first send that fails), and its last words if they reached the receive buffer."""
    loop = asyncio.get_running_loop()
    audio = encode(speech_like(BLOCK / RATE, 0)[:, None], Encoding.PCM_S16LE)

    async def one(i: int) -> dict[str, Any]:
        # Starts spread over a chunk, as load.py's: 20 aligned chunk boundaries would measure
        # batch collisions, not clients that do not read.
        await asyncio.sleep(i / clients)
        try:
            sock, protocol = await _websocket(url)
        except OSError as exc:
            return {"ended_after_s": None, "error": str(exc), "close": None}
        began, ended = time.monotonic(), None
        protocol.send_text(json.dumps(START).encode())
        try:
            while time.monotonic() - began < seconds:
                for data in protocol.data_to_send():
                    async with asyncio.timeout(5):  # the server stopped reading: not ended
                        await loop.sock_sendall(sock, data)
                await asyncio.sleep(BLOCK / RATE)
                protocol.send_binary(audio)
        except OSError:  # reset: the server has closed the connection
            ended = time.monotonic() - began
        except TimeoutError:
            pass
        last_words = _drain(sock, protocol)
        sock.close()
        return {"ended_after_s": ended, **last_words}

    runs = await asyncio.gather(*(one(i) for i in range(clients)))
    ends = [r["ended_after_s"] for r in runs if r["ended_after_s"] is not None]
    return {
        "clients": clients,
        "closed_by_server": len(ends),
        "closed_after_s": {"min": min(ends, default=None), "max": max(ends, default=None)},
        "error_seen": dict(Counter(str(r["error"]) for r in runs)),
        "close_code_seen": dict(Counter(str(r["close"]) for r in runs)),
    }


async def half_open(url: str, seconds: float, pairs: int) -> dict[str, Any]:
    """`pairs` connections that send half an upgrade request, and `pairs` that send nothing;
    how long until the server closed each (None: still open after `seconds`)."""
    loop = asyncio.get_running_loop()
    port = parse_uri(url).port
    partial = f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"

    async def hold(data: bytes) -> float | None:
        with socket.socket() as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            opened = time.monotonic()
            await loop.sock_sendall(sock, data)
            try:
                async with asyncio.timeout(seconds):
                    while await loop.sock_recv(sock, 1024):
                        pass
            except ConnectionResetError:
                pass
            except TimeoutError:
                return None
            return time.monotonic() - opened

    held = []
    for i in range(pairs):  # 50 pairs at a time: a burst would overflow the listen backlog
        held += [asyncio.create_task(hold(partial.encode())), asyncio.create_task(hold(b""))]
        if i % 50 == 49:
            await asyncio.sleep(0.02)
    closed = [s for s in await asyncio.gather(*held) if s is not None]
    return {
        "connections": len(held),
        "closed_by_server": len(closed),
        "closed_after_s": {"p50": percentile(closed, 50), "max": max(closed, default=None)},
    }


FLOODS = {"ten_x": ten_x, "one_sample": one_sample, "never_reading": never_reading,
          "half_open": half_open}  # fmt: skip


def flood_in_process(url: str, kind: str, seconds: float, size: int) -> dict[str, Any]:
    """The flood process's entry point (spawned: it shares nothing with the measuring side)."""
    if not kind:
        return {}  # the warm-up call: the process exists before anything is timed
    raise_fd_limit()
    os.nice(19)  # a remote attacker: the flood costs the server, its own CPU does not
    return asyncio.run(FLOODS[kind](url, seconds, size))


async def _websocket(url: str) -> tuple[socket.socket, ClientProtocol]:
    """A WebSocket on a plain socket with a small receive buffer (websockets' sans-I/O
    protocol), read only for the handshake: nothing else comes before `start`."""
    loop, uri = asyncio.get_running_loop(), parse_uri(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (uri.host, uri.port))
    protocol = ClientProtocol(uri)
    protocol.send_request(protocol.connect())
    await loop.sock_sendall(sock, b"".join(protocol.data_to_send()))
    while protocol.state is not State.OPEN:
        data = await loop.sock_recv(sock, 4096)
        protocol.receive_data(data)
        if protocol.handshake_exc or not data:
            sock.close()
            raise ConnectionError(f"handshake: {protocol.handshake_exc or 'closed'}")
    return sock, protocol


def _drain(sock: socket.socket, protocol: ClientProtocol) -> dict[str, Any]:
    """The last error event and the close code among what is left to read."""
    error = None
    try:
        while data := sock.recv(65536, socket.MSG_DONTWAIT):
            protocol.receive_data(data)
    except OSError:
        pass
    for frame in protocol.events_received():
        if isinstance(frame, Frame) and frame.opcode is Opcode.TEXT:
            event = json.loads(frame.data)
            error = event["code"] if event.get("type") == "error" else error
    return {"error": error, "close": protocol.close_rcvd.code if protocol.close_rcvd else None}


def raise_fd_limit() -> int:
    """The soft limit on open files up to the hard one: the half-open flood needs thousands."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
