"""cfssl's argv and output: building ``gencert`` calls and checking what comes back.

cfssl does not signal failure reliably (notes/cfssl.md): ``gencert`` can log an error, print
nothing and exit 0, and an unknown ``-profile`` silently becomes the default. So every call here
checks its output before anyone trusts it, and profile names are checked before cfssl runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap.errors import InputError, ToolFailedError
from cfwrap.runner import DEFAULT_TIMEOUT, Call, Result, failure_reason

if TYPE_CHECKING:
    # Types only: the models are loaded where a call is built, so that doctor (which uses
    # key_path) loads no pydantic for a folder made by hand.
    from cfwrap.models import CSR, SigningConfig
    from cfwrap.tools import Tool

_PEM_LABELS = {
    "cert": (b"-----BEGIN CERTIFICATE-----",),
    "csr": (b"-----BEGIN CERTIFICATE REQUEST-----",),
    "key": (
        b"-----BEGIN EC PRIVATE KEY-----",
        b"-----BEGIN RSA PRIVATE KEY-----",
        b"-----BEGIN PRIVATE KEY-----",
    ),
}


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key and its CSR as cfssl returned them (PEM bytes)."""

    cert: bytes
    key: bytes = field(repr=False)
    csr: bytes


def key_path(cert: Path) -> Path:
    """Where ``cfssljson -bare`` puts a certificate's key: ``NAME.pem`` -> ``NAME-key.pem``."""
    return cert.with_name(cert.name.removesuffix(".pem") + "-key.pem")


def keygen_timeout(csr: CSR) -> float:
    """How long a call that makes ``csr``'s key may take.

    An RSA key of 6144 or 8192 bits takes cfssl from seconds to minutes (its primes are found
    by chance), and a kit makes several at once on a small machine: 120 s is not enough.
    """
    if csr.key.algo == "rsa" and csr.key.size > 4096:
        return 1200.0
    if csr.key.algo == "rsa" and csr.key.size > 2048:
        return 300.0
    return DEFAULT_TIMEOUT


def initca(cfssl: Tool, csr: CSR) -> Call:
    """The call that makes a new CA from ``csr`` (``cfssl gencert -initca -``)."""
    from cfwrap.models import to_cfssl_json

    return Call.of(
        [cfssl.path, "gencert", "-initca", "-"],
        stdin=to_cfssl_json(csr),
        timeout=keygen_timeout(csr),
    )


def gencert(
    cfssl: Tool,
    *,
    ca_cert: Path,
    ca_key: Path,
    config_file: Path,
    config: SigningConfig,
    profile: str,
    csr: CSR,
) -> Call:
    """The call that issues a certificate for ``csr`` under ``profile``, signed by the CA.

    ``config`` must be what ``config_file`` holds; it is used to refuse a profile name that cfssl
    would silently replace with the default profile.

    Raises:
        InputError: ``profile`` is not in ``config``.
    """
    if profile not in config.signing.profiles:
        known = ", ".join(sorted(config.signing.profiles)) or "none"
        raise InputError(
            f"profile {profile!r}",
            f"not in the signing config (it has: {known})",
            fix="use one of its profiles; cfssl would silently use the default one instead",
        )
    argv: list[str | Path] = [
        cfssl.path, "gencert",
        "-ca", ca_cert, "-ca-key", ca_key,
        "-config", config_file, "-profile", profile,
        "-",
    ]  # fmt: skip
    from cfwrap.models import to_cfssl_json

    return Call.of(argv, stdin=to_cfssl_json(csr), timeout=keygen_timeout(csr))


def sign(
    cfssl: Tool,
    *,
    ca_cert: Path,
    ca_key: Path,
    config_file: Path,
    config: SigningConfig,
    profile: str,
    csr_pem: bytes,
) -> Call:
    """The call that signs a PEM CSR under ``profile`` (``cfssl sign ... -``).

    Raises:
        InputError: ``profile`` is not in ``config``.
    """
    if profile not in config.signing.profiles:
        raise InputError(f"profile {profile!r}", "not in the signing config")
    argv: list[str | Path] = [
        cfssl.path, "sign",
        "-ca", ca_cert, "-ca-key", ca_key,
        "-config", config_file, "-profile", profile,
        "-",
    ]  # fmt: skip
    return Call.of(argv, stdin=csr_pem)


def parse_signed(result: Result) -> bytes:
    """Read the ``cert`` PEM from ``cfssl sign``'s JSON output, refusing anything less.

    Raises:
        ToolFailedError: empty output, not JSON, or no certificate.
    """
    try:
        data = json.loads(result.stdout) if result.stdout.strip() else None
    except ValueError:
        data = None
    cert = data.get("cert") if isinstance(data, dict) else None
    if not isinstance(cert, str) or not cert.lstrip().startswith(_PEM_LABELS["cert"][0].decode()):
        raise ToolFailedError(
            result.call.tool,
            f"it printed no certificate ({failure_reason(result.stderr)})",
            argv=result.call.argv,
            returncode=result.returncode,
        )
    return cert.encode().strip() + b"\n"


def parse_issued(result: Result) -> Issued:
    """Read ``cert``, ``key`` and ``csr`` from cfssl's JSON output, refusing anything less.

    Raises:
        ToolFailedError: empty output (cfssl's silent failure), not JSON, or a missing or
            malformed field; the message carries cfssl's own error line when it logged one.
    """
    tool = result.call.tool
    if not result.stdout.strip():
        raise ToolFailedError(
            tool,
            f"it exited {result.returncode} but printed nothing ({failure_reason(result.stderr)})",
            argv=result.call.argv,
            returncode=result.returncode,
        )
    try:
        data = json.loads(result.stdout)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ToolFailedError(
            tool,
            "its output is not the JSON object cfssl gencert prints",
            argv=result.call.argv,
            returncode=result.returncode,
            fix=f"check that {result.call.argv[0]} is really cfssl 1.6.5",
        )
    values: dict[str, bytes] = {}
    for name, labels in _PEM_LABELS.items():
        value = data.get(name)
        if not isinstance(value, str) or not value.encode().lstrip().startswith(labels):
            raise ToolFailedError(
                tool,
                f"its output has no valid {name!r} PEM ({failure_reason(result.stderr)})",
                argv=result.call.argv,
                returncode=result.returncode,
            )
        values[name] = value.encode().strip() + b"\n"
    return Issued(cert=values["cert"], key=values["key"], csr=values["csr"])
