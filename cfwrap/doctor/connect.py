"""Connect to a running agent (or anything speaking TLS) and check what it presents."""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfwrap import parsers
from cfwrap.errors import InputError

_TIMEOUT = 10.0


@dataclass(frozen=True)
class Presented:
    """The certificate a peer presented, and whether a Nomad-style verified handshake passed."""

    address: str
    certificate_der: bytes | None
    verified: bool
    error: str
    #: The certificates the peer sent after its own (its intermediates), as it sent them.
    chain_der: tuple[bytes, ...] = ()

    def summary(self) -> dict[str, Any]:
        """Subject, issuer, names and dates of what was presented, for reports."""
        if self.certificate_der is None:
            return {"address": self.address, "verified": False, "error": self.error}
        facts = parsers.certificate_facts(parsers.load_der_certificate(self.certificate_der))
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


_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def parse_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too), refusing a host no resolver would take.

    Raises:
        InputError: no port, not a number, or a host that is neither an address nor a name.
    """
    shown = text if len(text) <= 60 else f"{text[:57]}..."
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit():
        raise InputError(f"--connect {shown!r}", "expected HOST:PORT", fix="e.g. 127.0.0.1:4646")
    if not 0 < int(port) < 65536:
        raise InputError(f"--connect {shown!r}", "the port must be 1 to 65535")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise InputError(
                f"--connect {shown!r}",
                "the host is neither an IP address nor a DNS name (labels of 1-63 letters, "
                "digits and '-')",
                fix="e.g. 127.0.0.1:4646 or nomad.example.com:4646",
            ) from None
    return host, int(port)


def client_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A client context with the CLI's certificate; a bad certificate or key is the user's input.

    Raises:
        InputError: the CA, certificate or key cannot be used (encrypted, mismatched, damaged).
    """
    from cfwrap.doctor.probe import Side, context

    try:
        return context(ssl.Purpose.SERVER_AUTH, ca, Side(cert, key))
    except OSError as e:  # ssl.SSLError included
        reason = getattr(e, "reason", None) or e.strerror or str(e)
        raise InputError(
            "--ca/--cert/--key",
            f"cannot use them for TLS ({reason})",
            fix="give the CA, and the cli certificate with its own unencrypted key",
        ) from None


def connect(
    address: str, *, ca: Path | None, cert: Path | None, key: Path | None, server_name: str
) -> Presented:
    """Fetch the peer's certificate, then try a handshake verified as Nomad's CLI would.

    Raises:
        InputError: the address is malformed.
    """
    host, port = parse_address(address)
    # First look without judging, so a wrong certificate can still be shown and checked.
    look = client_context(None, cert, key)
    look.check_hostname = False
    look.verify_mode = ssl.CERT_NONE
    der: bytes | None = None
    try:
        with (
            socket.create_connection((host, port), timeout=_TIMEOUT) as raw,
            look.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            sent = _sent_chain(tls)
    except (OSError, ssl.SSLError, UnicodeError) as e:
        return Presented(address, None, verified=False, error=f"cannot connect: {e}")
    if der is not None:
        try:
            parsers.load_der_certificate(der)
        except parsers.ParseError as e:
            return Presented(address, None, verified=False, error=f"it presented {e}")
    strict = client_context(ca, cert, key)
    try:
        with (
            socket.create_connection((host, port), timeout=_TIMEOUT) as raw,
            strict.wrap_socket(raw, server_hostname=server_name),
        ):
            pass
    except (OSError, ssl.SSLError, UnicodeError) as e:
        return Presented(address, der, verified=False, error=str(e), chain_der=sent)
    return Presented(address, der, verified=True, error="", chain_der=sent)


def _sent_chain(tls: ssl.SSLSocket) -> tuple[bytes, ...]:
    """The certificates a peer sent after its own, in DER (Python 3.13 names the call)."""
    chain = getattr(tls, "get_unverified_chain", None)
    if chain is None:  # Python 3.11 and 3.12: on the socket's OpenSSL object
        chain = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    if chain is None:
        return ()
    certs = chain() or []
    return tuple(
        c if isinstance(c, bytes) else ssl.PEM_cert_to_DER_cert(c.public_bytes()) for c in certs
    )[1:]
