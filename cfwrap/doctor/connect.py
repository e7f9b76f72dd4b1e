"""Connect to a running agent (or anything speaking TLS) and check what it presents."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfwrap import parsers
from cfwrap.errors import InputError

if TYPE_CHECKING:
    from cryptography import x509

_TIMEOUT = 10.0


@dataclass(frozen=True)
class Presented:
    """The certificate a peer presented, and whether a Nomad-style verified handshake passed."""

    address: str
    certificate_der: bytes | None
    verified: bool
    error: str

    def summary(self) -> dict[str, Any]:
        """Subject, issuer, names and dates of what was presented, for reports."""
        if self.certificate_der is None:
            return {"address": self.address, "verified": False, "error": self.error}
        facts = parsers.certificate_facts(load_der(self.certificate_der))
        return {
            "address": self.address,
            "subject": facts.subject,
            "issuer": facts.issuer,
            "dns_names": list(facts.dns_names),
            "ip_addresses": list(facts.ip_addresses),
            "not_after": facts.not_after.isoformat(),
            "verified": self.verified,
            "error": self.error,
        }


def load_der(data: bytes) -> x509.Certificate:
    """Load a DER certificate."""
    from cryptography import x509

    return x509.load_der_x509_certificate(data)


def parse_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too).

    Raises:
        InputError: no port, or not a number.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(
            f"--connect {text}", "expected HOST:PORT", fix="for example 127.0.0.1:4646"
        )
    return host.strip("[]"), int(port)


def _client_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def connect(
    address: str, *, ca: Path | None, cert: Path | None, key: Path | None, server_name: str
) -> Presented:
    """Fetch the peer's certificate, then try a handshake verified as Nomad's CLI would.

    Raises:
        InputError: the address is malformed.
    """
    host, port = parse_address(address)
    # First look without judging, so a wrong certificate can still be shown and checked.
    look = _client_context(None, cert, key)
    look.check_hostname = False
    look.verify_mode = ssl.CERT_NONE
    der: bytes | None = None
    try:
        with (
            socket.create_connection((host, port), timeout=_TIMEOUT) as raw,
            look.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as e:
        return Presented(address, None, verified=False, error=f"cannot connect: {e}")
    strict = _client_context(ca, cert, key)
    try:
        with (
            socket.create_connection((host, port), timeout=_TIMEOUT) as raw,
            strict.wrap_socket(raw, server_hostname=server_name),
        ):
            pass
    except (OSError, ssl.SSLError) as e:
        return Presented(address, der, verified=False, error=str(e))
    return Presented(address, der, verified=True, error="")
