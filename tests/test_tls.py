"""HTTPS and WSS: a self-signed certificate made once, or the user's own files."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

from stream.web.tls import self_signed
from tests.conftest import run_server


def test_self_signed_certificate_is_made_once_and_names_this_host(tmp_path: Path) -> None:
    from cryptography import x509

    cert, key, fingerprint = self_signed(tmp_path, "192.168.1.20")
    again = self_signed(tmp_path, "192.168.1.20")
    assert again == (cert, key, fingerprint) and len(fingerprint.split(":")) == 32
    assert key.stat().st_mode & 0o077 == 0  # the key is readable by its owner only
    names = (
        x509.load_pem_x509_certificate(cert.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    addresses = {str(a) for a in names.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", "192.168.1.20"} <= addresses
    assert "localhost" in names.get_values_for_type(x509.DNSName)


async def test_https_page_and_wss_session(tmp_path: Path) -> None:
    with run_server(tls="self-signed", cache_dir=str(tmp_path)) as server:
        base = f"https://127.0.0.1:{server.port}"
        cert = next((tmp_path / "tls").glob("*.crt"))
        trust = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(base_url=base, verify=trust) as http:
            assert (await http.get("/healthz")).json()["status"] == "ok"
            assert "grym-stream" in (await http.get("/")).text
        url = f"wss://127.0.0.1:{server.port}/v1/stream"
        async with connect(url, ssl=trust) as ws:
            start = {"type": "start", "sample_rate": 16000, "channels": 1, "encoding": "pcm_s16le"}
            await ws.send(json.dumps(start))
            assert json.loads(await ws.recv())["type"] == "ready"
        # Plain HTTP is not served on a TLS port.
        async with httpx.AsyncClient() as http:
            try:
                await http.get(f"http://127.0.0.1:{server.port}/healthz")
                raise AssertionError("plain HTTP was answered")
            except httpx.HTTPError:
                pass
