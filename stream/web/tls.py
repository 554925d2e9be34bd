"""HTTPS/WSS: the certificate the server listens with.

Browsers give a page the microphone only in a secure context: `localhost`, or HTTPS. For a page
opened from another machine the server needs TLS: `--tls-cert` and `--tls-key` (a real
certificate), or `--tls self-signed` for a LAN or a demo: a certificate for this host made once
and kept in the cache folder; browsers warn about it once, and the fingerprint printed at
start-up lets the user check it is this server's.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

SELF_SIGNED_DAYS = 365


def self_signed(folder: Path, host: str) -> tuple[Path, Path, str]:
    """(cert, key, SHA-256 fingerprint) of a self-signed certificate for this machine: made
    once per folder and host, reused while valid."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    safe = host.replace(":", "_").replace("/", "_") or "any"
    cert_path, key_path = folder / f"{safe}.crt", folder / f"{safe}.key"
    now = datetime.datetime.now(datetime.UTC)
    if cert_path.is_file() and key_path.is_file():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if cert.not_valid_after_utc > now + datetime.timedelta(days=1):
            return cert_path, key_path, _fingerprint(cert)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname())]
    addresses = {"127.0.0.1", "::1"}
    if host not in ("", "0.0.0.0", "::"):
        addresses.add(host)
    for address in sorted(addresses):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:  # a host name, not an address
            names.append(x509.DNSName(address))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"grym-stream {host}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path, _fingerprint(cert)


def _fingerprint(cert: object) -> str:
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex(":").upper()  # type: ignore[attr-defined]
