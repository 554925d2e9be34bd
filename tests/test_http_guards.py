"""The HTTP routes' guards on a real server with a token and an Origin allow-list: every
protected route refuses every wrong way in, before it reads anything; odd input is a 4xx."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from benchmarks.chaos.access import (
    BAD_ORIGIN,
    GOOD_ORIGIN,
    OFFER,
    RIGHT,
    RIGHT_WAYS,
    ROUTES,
    TOKEN,
    WRONG,
)
from stream.transports.webrtc import OFFER_MAX_BYTES
from tests.conftest import RunningServer, run_server

# The matrix is the chaos suite's (one list of protected routes and of the ways in).
PROTECTED = ROUTES


@pytest.fixture(scope="module")
def strict() -> Iterator[RunningServer]:
    with run_server(token=TOKEN, allowed_origins=GOOD_ORIGIN) as running:
        yield running


def request(
    server: RunningServer, method: str, path: str, headers: dict[str, str], body: Any = OFFER
) -> httpx.Response:
    content = json.dumps(body).encode() if method == "POST" else None
    return httpx.request(method, server.http + path, headers=headers, content=content, timeout=10)


@pytest.mark.parametrize("way", list(WRONG))
@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_protected_route_refuses_every_wrong_way_in(
    strict: RunningServer, method: str, path: str, way: str
) -> None:
    headers, query, status, code = WRONG[way]
    response = request(strict, method, path + query, headers)
    assert response.status_code == status, response.text
    error = response.json()
    assert (error["type"], error["code"]) == ("error", code)
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    assert not strict.app.state.sessions.sessions  # the refused offer opened nothing


@pytest.mark.parametrize("way", list(RIGHT_WAYS))
@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_the_right_token_is_let_through(
    strict: RunningServer, method: str, path: str, way: str
) -> None:
    headers, query = RIGHT_WAYS[way]
    response = request(strict, method, path + query, headers)
    # Past the guard: what the route itself says (x is no session; the SDP is nonsense).
    assert response.status_code not in (401, 403), response.text
    assert response.status_code < 500


def test_the_offer_may_carry_its_token_in_its_body(strict: RunningServer) -> None:
    response = request(strict, "POST", "/v1/webrtc/offer", {}, {**OFFER, "token": TOKEN})
    assert (response.status_code, response.json()["code"]) == (400, "invalid_offer")
    for token in ("nope", 5, None, ["s3cret"]):  # a wrong one, or not a string: 401, not 500
        response = request(strict, "POST", "/v1/webrtc/offer", {}, {**OFFER, "token": token})
        assert (response.status_code, response.json()["code"]) == (401, "unauthorized")
    assert not strict.app.state.sessions.sessions


def test_open_routes_stay_open(strict: RunningServer) -> None:
    for path in ("/healthz", "/readyz", "/", "/status.html"):
        response = httpx.get(strict.http + path, headers={"Origin": BAD_ORIGIN}, timeout=10)
        assert response.status_code == 200, path


async def test_healthz_shows_no_session_id_and_status_does(strict: RunningServer) -> None:
    start = {"type": "start", "sample_rate": 16000, "channels": 1, "encoding": "pcm_s16le"}
    async with connect(strict.ws + f"?token={TOKEN}") as ws:
        await ws.send(json.dumps({**start, "session": "guarded-session-id"}))
        assert json.loads(await ws.recv())["type"] == "ready"
        async with httpx.AsyncClient(base_url=strict.http, timeout=10) as http:
            health = (await http.get("/healthz")).text
            status = (await http.get("/v1/status", headers=RIGHT)).text
        await ws.send(json.dumps({"type": "stop"}))
        async for message in ws:
            if json.loads(message)["type"] == "end":
                break
    assert "guarded-session-id" not in health and "guarded-session-id" in status
    for _ in range(100):  # the session is released (the tests after this one look)
        if not strict.app.state.sessions.sessions:
            break
        time.sleep(0.05)


def raw_exchange(server: RunningServer, head: list[str], body: bytes) -> tuple[int, dict[str, Any]]:
    """Send a request's head and `body` as they are, then read one response (5 s at most: a
    server that waits for a body it was promised but never sent fails the test)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(("\r\n".join([*head, f"Host: 127.0.0.1:{server.port}", "", ""])).encode())
        sock.sendall(body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536) or b"<closed>"
        header, _, rest = data.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in lines[1:])
        while len(rest) < int(fields["content-length"]):
            rest += sock.recv(65536) or b"<closed>"
    return int(lines[0].split()[1]), json.loads(rest)


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ([], 413, "offer_too_large"),  # the token may be in the body: too large to read it
        ([f"Authorization: Bearer {TOKEN}"], 413, "offer_too_large"),
        (["Authorization: Bearer nope"], 401, "unauthorized"),
        ([f"Origin: {BAD_ORIGIN}", f"Authorization: Bearer {TOKEN}"], 403, "origin_not_allowed"),
    ],
)
def test_nothing_of_the_offer_is_read_before_the_checks(
    strict: RunningServer, headers: list[str], status: int, code: str
) -> None:
    # 8 MB promised, a few bytes sent: a server that read the body would wait for the rest.
    head = ["POST /v1/webrtc/offer HTTP/1.1", "Content-Type: application/json", *headers]
    began = time.monotonic()
    got = raw_exchange(strict, [*head, f"Content-Length: {8 << 20}"], b'{"type": "offer"')
    assert (got[0], got[1]["code"]) == (status, code)
    assert time.monotonic() - began < 3


def test_a_chunked_offer_is_cut_off_at_the_limit(strict: RunningServer) -> None:
    # Chunks past the limit, and no last chunk: the server stops reading at the limit.
    head = ["POST /v1/webrtc/offer HTTP/1.1", "Transfer-Encoding: chunked"]
    chunk = b"%x\r\n%s\r\n" % (8192, b" " * 8192)
    status, error = raw_exchange(strict, head, chunk * (OFFER_MAX_BYTES // 8192 + 2))
    assert (status, error["code"]) == (413, "offer_too_large")
    assert not strict.app.state.sessions.sessions


def test_odd_offers_are_400_not_500(strict: RunningServer) -> None:
    url = strict.http + "/v1/webrtc/offer"
    deep = '{"type": "offer", "sdp": "x", "config": ' + "[" * 5000 + "]" * 5000 + "}"
    nested: Any = 1
    for _ in range(40):  # within what json parses, past what an offer may nest
        nested = {"a": nested}
    odd = {
        deep: "invalid_offer",
        json.dumps({**OFFER, "config": nested}): "invalid_offer",
        json.dumps({**OFFER, "config": 5}): "invalid_config",
        json.dumps({**OFFER, "config": "ab"}): "invalid_config",
        json.dumps({**OFFER, "session": 5}): "invalid_start",
        json.dumps([OFFER]): "invalid_offer",
        "\xff\xfe not json": "invalid_offer",
    }
    for body, code in odd.items():
        response = httpx.post(url, content=body.encode("latin-1"), headers=RIGHT, timeout=10)
        assert (response.status_code, response.json()["code"]) == (400, code), body[:80]
    assert not strict.app.state.sessions.sessions


def test_odd_paths_and_ranges_are_4xx_not_500(strict: RunningServer) -> None:
    odd = {
        f"/v1/sessions/x/generations/{10**30}.wav": (404, "not_found"),
        f"/v1/sessions/x/generations/{2**32}.wav": (404, "not_found"),
        "/v1/sessions/x/generations/-1.wav": (404, "not_found"),
        "/v1/sessions/x/generations/1e3.wav": (404, "not_found"),
        "/v1/sessions/" + "a" * 5000: (404, "not_found"),
        "/v1/sessions/%00": (404, "not_found"),
        "/v1/sessions/" + "a" * 5000 + "/timeline": (404, "not_found"),
        "/v1/sessions/" + "a" * 5000 + "/generations/1.wav": (404, "not_found"),
        "/v1/sessions/x/timeline?from=nan": (400, "invalid_range"),
        "/v1/sessions/x/timeline?to=NaN": (400, "invalid_range"),
        "/v1/sessions/x/timeline?from=soon": (400, "invalid_range"),
    }
    with httpx.Client(base_url=strict.http, headers=RIGHT, timeout=10) as http:
        for path, (status, code) in odd.items():
            response = http.get(path)
            assert (response.status_code, response.json()["code"]) == (status, code), path[:80]
            assert len(response.text) < 300  # a long id is not echoed back
        deleted = http.delete("/v1/sessions/" + "a" * 5000)
        assert (deleted.status_code, deleted.json()["code"]) == (404, "not_found")
        # Infinite bounds are bounds: an empty timeline, not an error.
        for query in ("from=inf", "from=-inf&to=inf", f"from={'1' * 400}"):
            response = http.get(f"/v1/sessions/x/timeline?{query}")
            assert (response.status_code, response.json()) == (200, []), query
