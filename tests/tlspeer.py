"""Real TLS handshakes between issued certificates, on loopback, with Nomad's settings.

The server requires a client certificate from its CA and TLS >= 1.2; the client checks the
server's chain and the name it dials (like Nomad with ``verify_server_hostname``). Under TLS 1.3
a client sees its handshake finish before the server rejects its certificate, so both sides
exchange a byte and report what happened.

This deliberately does not reuse ``cfwrap.doctor.probe``: the tests need a TLS peer written
independently of the code whose certificates (and whose probe) they judge.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Party:
    """One side's certificate, key and trusted CA."""

    cert: Path | None
    key: Path | None
    ca: Path


@dataclass(frozen=True)
class Outcome:
    """Both sides' view of one connection."""

    ok: bool
    server_error: str | None
    client_error: str | None


def _context(purpose: ssl.Purpose, party: Party) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cafile=str(party.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if party.cert is not None and party.key is not None:
        ctx.load_cert_chain(str(party.cert), str(party.key))
    if purpose is ssl.Purpose.CLIENT_AUTH:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def handshake(server: Party, client: Party, server_name: str) -> Outcome:
    """Connect ``client`` to ``server`` over loopback, dialling ``server_name``."""
    server_ctx = _context(ssl.Purpose.CLIENT_AUTH, server)
    client_ctx = _context(ssl.Purpose.SERVER_AUTH, client)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    errors: dict[str, str | None] = {"server": None}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                data = tls.recv(4)
                tls.sendall(data)
        except (OSError, ssl.SSLError) as e:
            errors["server"] = str(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_error = None
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            tls.sendall(b"ping")
            if tls.recv(4) != b"ping":
                client_error = "no echo"
    except (OSError, ssl.SSLError) as e:
        client_error = str(e)
    thread.join(10)
    listener.close()
    ok = client_error is None and errors["server"] is None
    return Outcome(ok, errors["server"], client_error)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, *, seconds: float = 10) -> None:
    """Wait until something accepts connections on a loopback port."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def openssl_verify(ca: Path, cert: Path, hostname: str) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of a certificate against a CA, for a hostname."""
    return subprocess.run(
        ["openssl", "verify", "-CAfile", ca, "-verify_hostname", hostname, cert],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
