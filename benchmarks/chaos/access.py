"""Access: every protected route and the WebSocket refuse every wrong way in, before reading.

A server with a token and an Origin allow-list. Every protected route (docs/protocol.md section
1) is asked with no token, a wrong token in the header, a wrong token in the query, and the right
token from a bad Origin: each must be a typed refusal (401 `unauthorized` with `WWW-Authenticate:
Bearer`, 403 `origin_not_allowed`; on the WebSocket an `error` event and close 1008). The same
requests again promise an 8 MB body and send 16 bytes of it: the refusal must come at once, since
a server that read the body first would wait for the rest (the offer without any token is 413 at
once: its token could be in the body, which is too large to read). Then the right token, in the
header, the query, `start` or the offer's body, must be let through, so that the refusals are
the check's doing and not a broken route's.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from benchmarks.chaos.outcome import Outcome, Plan
from benchmarks.chaos.target import Target

NEEDS_PROCESS = True
TOKEN = "chaos-token"
GOOD_ORIGIN, BAD_ORIGIN = "http://good.example", "http://evil.example"
RIGHT = {"Authorization": f"Bearer {TOKEN}"}
PROMISED = 8 << 20  # the body a request promises and never sends
PROMPT_S = 1.0  # a refusal later than this waited for something
OFFER = {"type": "offer", "sdp": "v=0 nonsense"}  # past access, not past aiortc
START = {"type": "start", "sample_rate": 16000, "channels": 1, "encoding": "pcm_s16le"}

# Every protected route (docs/protocol.md section 1); "x" is no session, which is fine.
ROUTES = [
    ("GET", "/v1/status"),
    ("GET", "/metrics"),
    ("GET", "/v1/pipelines"),
    ("GET", "/v1/sessions"),
    ("GET", "/v1/sessions/x"),
    ("GET", "/v1/sessions/x/timeline"),
    ("GET", "/v1/sessions/x/generations/1.wav"),
    ("DELETE", "/v1/sessions/x"),
    ("POST", "/v1/webrtc/offer"),
]
# The wrong ways in: headers, query, and the status and code they must earn.
WRONG = {
    "no token": ({}, "", 401, "unauthorized"),
    "wrong token in header": ({"Authorization": "Bearer nope"}, "", 401, "unauthorized"),
    "wrong token in query": ({}, "?token=nope", 401, "unauthorized"),
    "bad Origin, right token": ({**RIGHT, "Origin": BAD_ORIGIN}, "", 403, "origin_not_allowed"),
}
RIGHT_WAYS = {
    "header": (RIGHT, ""),
    "query": ({}, f"?token={TOKEN}"),
    "header and query, allowed Origin": ({**RIGHT, "Origin": GOOD_ORIGIN}, f"?token={TOKEN}"),
}


Result = tuple[str, bool, float, str]  # (tally, ok, seconds, what was asked)


@dataclass
class Reply:
    status: int  # 0: no answer within the timeout
    body: Any
    headers: dict[str, str]
    seconds: float


async def run(plan: Plan) -> Outcome:
    outcome = Outcome("access")
    rounds = plan.size(5, 1)
    tally = {"refused": [0, 0], "before read": [0, 0], "let through": [0, 0]}
    misses: list[str] = []
    slowest = 0.0
    with Target(token=TOKEN, allowed_origins=GOOD_ORIGIN) as target:
        for round_ in range(rounds):
            plan.progress(f"access: round {round_ + 1}/{rounds}")
            results = await http_matrix(target.port) + await websocket_matrix(target.ws)
            for name, ok, seconds, label in results:
                tally[name][0] += ok
                tally[name][1] += 1
                if not ok:
                    misses.append(f"{name}: {label} ({seconds:.2f} s)")
                if name == "before read":
                    slowest = max(slowest, seconds)
        leftover = await sessions_left(target.port)
    outcome.figures.update(
        rounds=rounds,
        routes=len(ROUTES) + 1,  # and the WebSocket
        slowest_refusal_before_read_s=round(slowest, 3),
        sessions_left_open=leftover,
        misses=misses[:20],
    )
    for name, what, target_text in (
        ("refused", "wrong ways in refused with a typed error", "100%"),
        ("before read", "refused before the body / start was read", f"100%, each < {PROMPT_S:g} s"),
        ("let through", "the right token let through (not 401/403)", "100%"),
    ):
        ok, n = tally[name]
        outcome.check(what, f"{ok}/{n}", target_text, n > 0 and ok == n)
    outcome.exactly("sessions left open after the matrix", leftover, 0)
    outcome.summary = (
        f"{len(ROUTES)} routes and the WebSocket x {len(WRONG)} wrong ways in, x {rounds}: "
        f"{tally['refused'][0]}/{tally['refused'][1]} refused, "
        f"{tally['before read'][0]}/{tally['before read'][1]} before reading (slowest "
        f"{slowest * 1000:.0f} ms); the right token let through "
        f"{tally['let through'][0]}/{tally['let through'][1]}"
    )
    return outcome


async def sessions_left(port: int) -> int | None:
    """Sessions not ended once the matrix is over (the admitted ones end with `stop`, and an
    ended one may be kept a few seconds for a client that lost its `end`): none may stay open,
    and no refused offer may have opened one."""
    for _ in range(40):
        status = await exchange(port, "GET", "/v1/status", RIGHT)
        if status.status != 200:
            return None
        open_ = [s for s in status.body["sessions"] if s["state"] != "ended"]
        if not open_:
            return 0
        await asyncio.sleep(0.05)
    return len(open_)


# --- HTTP -----------------------------------------------------------------------------------


async def http_matrix(port: int) -> list[Result]:
    """Every route x every way in, wrong and right."""
    results = []
    for method, path in ROUTES:
        body = json.dumps(OFFER).encode() if method == "POST" else b""
        for way, (headers, query, status, code) in WRONG.items():
            label = f"{method} {path}, {way}"
            # A whole request: the refusal itself.
            reply = await exchange(port, method, path + query, headers, body)
            results.append(("refused", is_refusal(reply, status, code), reply.seconds,
                            f"{label}: {answer(reply)}"))  # fmt: skip
            # The body promised and never sent: the refusal must not wait for it. The offer
            # without a token would read its body for one; too large to read: 413 at once.
            if method == "POST" and way == "no token":
                status, code = 413, "offer_too_large"
            reply = await exchange(port, method, path + query, headers, body[:16], PROMISED)
            ok = is_refusal(reply, status, code) and reply.seconds < PROMPT_S
            results.append(
                ("before read", ok, reply.seconds, f"{label}, body promised: {answer(reply)}")
            )
        for way, (headers, query) in RIGHT_WAYS.items():
            reply = await exchange(port, method, path + query, headers, body)
            label = f"{method} {path}, {way}: {reply.status}"
            results.append(("let through", is_let_through(reply), reply.seconds, label))
    # The offer may carry its token in its body: the right one passes, a wrong one does not.
    offer = "/v1/webrtc/offer"
    right = await exchange(port, "POST", offer, {}, json.dumps({**OFFER, "token": TOKEN}).encode())
    wrong = await exchange(port, "POST", offer, {}, json.dumps({**OFFER, "token": "nope"}).encode())
    results.append(("let through", is_let_through(right), right.seconds, "offer, body token"))
    results.append(("refused", is_refusal(wrong, 401, "unauthorized"), wrong.seconds,
                    "offer, wrong body token"))  # fmt: skip
    return results


def is_refusal(reply: Reply, status: int, code: str) -> bool:
    typed = isinstance(reply.body, dict) and reply.body.get("type") == "error"
    if not (reply.status == status and typed and reply.body.get("code") == code):
        return False
    return status != 401 or reply.headers.get("www-authenticate") == "Bearer"


def answer(reply: Reply) -> str:
    code = reply.body.get("code") if isinstance(reply.body, dict) else None
    return f"{reply.status} {code}" if reply.status else "no answer"


def is_let_through(reply: Reply) -> bool:
    # Past the guard: whatever the route says ("x" is no session, the SDP is nonsense), no 5xx.
    return 200 <= reply.status < 500 and reply.status not in (401, 403)


async def exchange(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes = b"",
    promised: int | None = None,
    timeout: float = 5.0,
) -> Reply:
    """One request over a raw connection: its head, `Content-Length: promised` (the body's own
    length by default) and `body`; then one response, timed from the request's sending."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body) if promised is None else promised}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    began = time.monotonic()
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            seconds = time.monotonic() - began
            pairs = (line.split(": ", 1) for line in head[1:] if line)
            fields = {name.lower(): value for name, value in pairs}
            content = await reader.readexactly(int(fields.get("content-length", 0)))
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return Reply(0, None, {}, time.monotonic() - began)
    finally:
        writer.close()
    return Reply(int(head[0].split()[1]), decode_json(content), fields, seconds)


def decode_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


# --- WebSocket ------------------------------------------------------------------------------


async def websocket_matrix(url: str) -> list[Result]:
    results: list[Result] = []
    # Refused before `start` is read: nothing is sent, the refusal must come by itself.
    for way, (headers, query, _, code) in list(WRONG.items())[1:]:
        ok, seconds = await ws_refused(url + query, headers, None, code)
        results.append(("refused", ok, seconds, f"WebSocket, {way}"))
        results.append(("before read", ok and seconds < PROMPT_S, seconds, f"WebSocket, {way}"))
    # No token with the request: the documented place to look next is `start`.
    for way, start in (("no token", START), ("wrong token in start", {**START, "token": "nope"})):
        ok, seconds = await ws_refused(url, {}, start, "unauthorized")
        results.append(("refused", ok, seconds, f"WebSocket, {way}"))
    for way, (headers, query) in RIGHT_WAYS.items():
        ok = await ws_admitted(url + query, headers, START)
        results.append(("let through", ok, 0.0, f"WebSocket, {way}"))
    ok = await ws_admitted(url, {"Origin": GOOD_ORIGIN}, {**START, "token": TOKEN})
    results.append(("let through", ok, 0.0, "WebSocket, token in start, allowed Origin"))
    return results


async def ws_refused(
    url: str, headers: dict[str, str], start: dict[str, Any] | None, code: str
) -> tuple[bool, float]:
    """Whether the connection got the `code` error and close 1008, and how long it took from
    the handshake (or the `start`, when one is sent) to the error."""
    began = time.monotonic()
    try:
        async with asyncio.timeout(5), connect(url, additional_headers=headers) as ws:
            began = time.monotonic()
            if start is not None:
                await ws.send(json.dumps(start))
            event = json.loads(await ws.recv())
            seconds = time.monotonic() - began
            try:
                await ws.recv()
            except ConnectionClosed:
                pass
            typed = event.get("type") == "error" and event.get("code") == code
            return typed and ws.close_code == 1008, seconds
    except (TimeoutError, OSError, ConnectionClosed, ValueError):
        return False, time.monotonic() - began


async def ws_admitted(url: str, headers: dict[str, str], start: dict[str, Any]) -> bool:
    try:
        async with asyncio.timeout(5), connect(url, additional_headers=headers) as ws:
            await ws.send(json.dumps(start))
            ready = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "stop"}))
            async for message in ws:  # until `end` and the close: the session is over
                if json.loads(message)["type"] == "end":
                    break
            return ready.get("type") == "ready"
    except (TimeoutError, OSError, ConnectionClosed, ValueError):
        return False
