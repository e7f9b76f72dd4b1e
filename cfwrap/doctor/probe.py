"""Real TLS handshakes on loopback with Nomad's settings: TLS >= 1.2, client certificate required.

Each probe runs a server and a client in this process (the stdlib ``ssl`` module, OpenSSL
underneath), says what Nomad expects to happen, and what did.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_TIMEOUT = 10.0


@dataclass(frozen=True)
class Side:
    """One side of a probe: its certificate and key (none for an anonymous client)."""

    cert: Path | None
    key: Path | None


@dataclass(frozen=True)
class Probe:
    """One connection to try, and whether Nomad would accept it."""

    name: str
    server: Side
    client: Side
    server_name: str
    expect_ok: bool


@dataclass(frozen=True)
class ProbeResult:
    """What happened."""

    name: str
    server_name: str
    expect_ok: bool
    ok: bool
    error: str

    @property
    def as_expected(self) -> bool:
        """True when the outcome is what Nomad needs."""
        return self.ok == self.expect_ok

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``--json``."""
        return {**asdict(self), "as_expected": self.as_expected}


def _no_pass_phrase() -> bytes:
    """Answer OpenSSL's pass phrase request with nothing: cfwrap never prompts on a terminal."""
    return b""


def context(purpose: ssl.Purpose, ca: Path | None, side: Side) -> ssl.SSLContext:
    """A TLS context as a Nomad agent (or its CLI) sets one up: TLS >= 1.2, ``ca`` trusted.

    Raises:
        OSError: a file is not a regular file (a FIFO would block), or cannot be read.
        ssl.SSLError: a file is not what it should be (an encrypted key, a key that does not
            belong to the certificate).
    """
    for path in (ca, side.cert, side.key):
        if path is not None and not path.is_file():
            raise OSError(f"{path} is not a regular file")
    ctx = ssl.create_default_context(purpose, cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if side.cert is not None and side.key is not None:
        ctx.load_cert_chain(str(side.cert), str(side.key), password=_no_pass_phrase)
    if purpose is ssl.Purpose.CLIENT_AUTH:
        ctx.verify_mode = ssl.CERT_REQUIRED  # Nomad's RPC always wants a client certificate
    return ctx


def run(probe: Probe, ca: Path) -> ProbeResult:
    """Run one probe over loopback; under TLS 1.3 a byte is echoed so late rejections show."""
    try:
        server_ctx = context(ssl.Purpose.CLIENT_AUTH, ca, probe.server)
        client_ctx = context(ssl.Purpose.SERVER_AUTH, ca, probe.client)
    except (OSError, ssl.SSLError) as e:  # ssl.SSLError is an OSError; named for the reader
        return ProbeResult(
            probe.name, probe.server_name, probe.expect_ok, False, f"cannot load: {e}"
        )
    server_error: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(_TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(1))
            except (OSError, ssl.SSLError) as e:
                server_error.append(f"server: {e}")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client_error = ""
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=_TIMEOUT) as raw,
                client_ctx.wrap_socket(raw, server_hostname=probe.server_name) as tls,
            ):
                tls.sendall(b"!")
                if tls.recv(1) != b"!":
                    client_error = "client: connection closed by the server"
        except (OSError, ssl.SSLError) as e:
            client_error = f"client: {e}"
        thread.join(_TIMEOUT)
    errors = [e for e in (client_error, *server_error) if e]
    return ProbeResult(
        probe.name, probe.server_name, probe.expect_ok, not errors, "; ".join(errors)
    )


def nomad_probes(
    *, region: str, server: Side | None, client: Side | None, cli: Side | None
) -> list[Probe]:
    """The connections a Nomad cluster makes, and the ones it must refuse."""
    probes = []
    server_name = f"server.{region}.nomad"
    if server and client:
        probes.append(Probe("rpc: client agent -> server", server, client, server_name, True))
        probes.append(
            Probe(
                "must fail: client certificate posing as a server",
                client,
                client,
                server_name,
                False,
            )
        )
        probes.append(
            Probe(
                "must fail: server dialled for another region",
                server,
                client,
                f"server.not-{region}.nomad",
                False,
            )
        )
        probes.append(
            Probe("must fail: no client certificate", server, Side(None, None), server_name, False)
        )
    if server and cli:
        for host in ("localhost", "127.0.0.1"):
            probes.append(Probe(f"https: cli -> server as {host}", server, cli, host, True))
    if client and cli:
        probes.append(
            Probe("api: cli -> client agent", client, cli, f"client.{region}.nomad", True)
        )
    if cli and client:
        probes.append(
            Probe("must fail: cli certificate serving", cli, client, f"cli.{region}.nomad", False)
        )
    return probes
