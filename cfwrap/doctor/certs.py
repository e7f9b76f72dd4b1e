"""Certificate and key checks, as a Nomad agent or CLI would meet them.

Each check returns findings that quote the error Nomad (Go's crypto/x509 and crypto/tls) prints,
and the cfwrap command that fixes it. Works on any PEM files, not only cfwrap's.
"""

from __future__ import annotations

import os
import shlex
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap import files, parsers
from cfwrap.cfssl import key_path
from cfwrap.doctor.findings import Finding
from cfwrap.nomad import Role, parse_role_name, role_name

if TYPE_CHECKING:
    from cryptography import x509

_GO_TIME = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Leaf:
    """A role certificate to check: the role and region it is meant for, and its key file."""

    role: Role | None
    region: str
    cert: Path
    key: Path | None


@dataclass(frozen=True)
class LoadedCA:
    """The CA certificate the leaves are checked against."""

    path: Path
    key_path: Path | None
    cert: x509.Certificate
    facts: parsers.CertFacts


def reissue_command(leaf: Leaf, ca: LoadedCA | None) -> str:
    """The cfwrap command that makes a correct certificate in this leaf's place.

    Every value is shell-quoted: paths and the region may come from a file an attacker wrote
    (an agent's HCL), and the line is meant to be pasted into a shell.
    """
    ca_path = ca.path if ca else Path("ca.pem")
    # cfssljson's naming: nomad-agent-ca.pem's key is nomad-agent-ca-key.pem.
    ca_key = (ca.key_path if ca and ca.key_path else None) or key_path(ca_path)
    role = leaf.role or "server"
    return shlex.join(
        ["cfwrap", "cert", "--ca", str(ca_path), "--ca-key", str(ca_key), "--role", role,
         "--region", leaf.region, "--out", str(leaf.cert.parent), "--force"]
    )  # fmt: skip


def go_hostname_error(facts: parsers.CertFacts, host: str) -> str:
    """The message Go's ``VerifyHostname`` gives when ``host`` is not in the certificate."""
    if host.replace(".", "").isdigit() or ":" in host:
        if not facts.ip_addresses:
            return (
                f"x509: cannot validate certificate for {host} because it doesn't contain "
                "any IP SANs"
            )
        return f"x509: certificate is valid for {', '.join(facts.ip_addresses)}, not {host}"
    if not facts.dns_names:
        return "x509: certificate relies on legacy Common Name field, use SANs instead"
    return f"x509: certificate is valid for {', '.join(facts.dns_names)}, not {host}"


def load_ca(path: Path, key_path: Path | None) -> tuple[LoadedCA | None, list[Finding]]:
    """Load the CA certificate; findings when it cannot serve as ``ca_file``."""
    try:
        cert = parsers.load_certificate(files.read_input(path))
    except (OSError, parsers.ParseError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e)
        return None, [
            Finding(
                "error",
                str(path),
                "ca.read",
                f"cannot read the CA: {reason}",
                fix="give the CA certificate (ca.pem) with --ca",
            )
        ]
    facts = parsers.certificate_facts(cert)
    findings = []
    if not facts.is_ca or "key_cert_sign" not in facts.key_usage:
        findings.append(
            Finding(
                "error",
                str(path),
                "ca.constraints",
                f"{facts.subject} is not a CA (needs CA:TRUE and keyCertSign)",
                nomad_error="x509: certificate signed by unknown authority",
                fix="cfwrap ca --out NEW-CA-DIR, then reissue the certificates from it",
            )
        )
    return LoadedCA(path, key_path, cert, facts), findings


def check_dates(
    path: Path, facts: parsers.CertFacts, *, now: datetime, warn_within: timedelta, fix: str
) -> list[Finding]:
    """Expired, not yet valid, or expiring soon."""
    if facts.not_after <= now:
        return [
            Finding(
                "error",
                str(path),
                "dates.expired",
                f"expired on {facts.not_after:%Y-%m-%d %H:%M} UTC",
                nomad_error=(
                    "x509: certificate has expired or is not yet valid: current time "
                    f"{now:{_GO_TIME}} is after {facts.not_after:{_GO_TIME}}"
                ),
                fix=fix,
            )
        ]
    if facts.not_before > now:
        return [
            Finding(
                "error",
                str(path),
                "dates.not-yet-valid",
                f"not valid before {facts.not_before:%Y-%m-%d %H:%M} UTC",
                nomad_error=(
                    "x509: certificate has expired or is not yet valid: current time "
                    f"{now:{_GO_TIME}} is before {facts.not_before:{_GO_TIME}}"
                ),
                fix=f"check this machine's clock, or {fix}",
            )
        ]
    left = facts.not_after - now
    if left <= warn_within:
        return [
            Finding(
                "warning",
                str(path),
                "dates.expiring",
                f"expires in {left.days} days, on {facts.not_after:%Y-%m-%d} (warning window "
                f"{warn_within.days} days)",
                fix=fix,
            )
        ]
    return []


def check_key_file(path: Path) -> list[Finding]:
    """A private key file: not readable by others, owned by whoever runs this."""
    try:
        info = path.stat()
    except OSError as e:
        return [Finding("error", str(path), "key.read", f"cannot read: {e.strerror}")]
    findings = []
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        findings.append(
            Finding(
                "error",
                str(path),
                "key.mode",
                f"mode {mode:04o} lets other users read or change a private key",
                fix=shlex.join(["chmod", "0600", str(path)]),
            )
        )
    if info.st_uid != os.geteuid():
        findings.append(
            Finding(
                "warning",
                str(path),
                "key.owner",
                f"owned by uid {info.st_uid}, not by uid {os.geteuid()} that runs this check",
                fix=shlex.join(["chown", str(os.geteuid()), str(path)])
                + "  (the user the Nomad agent runs as)",
            )
        )
    return findings


def _names(facts: parsers.CertFacts) -> list[str]:
    """What Nomad's role checks look at: the CN and the DNS SANs."""
    cn = [facts.common_name] if facts.common_name else []
    return [*cn, *facts.dns_names]


def check_role_names(leaf: Leaf, facts: parsers.CertFacts, fix: str) -> list[Finding]:
    """The names each role must (and must not) carry, as Nomad's TLS and RPC checks see them."""
    path = str(leaf.cert)
    names = _names(facts)
    roles = {p for p in (parse_role_name(n) for n in names) if p is not None}
    findings = []
    if any("*" in n for n in names):
        findings.append(
            Finding(
                "error",
                path,
                "names.wildcard",
                f"wildcard name(s) {sorted(n for n in names if '*' in n)}: Raft accepts only exact "
                "server names, and a wildcard lets any node claim any role",
                nomad_error="raft: invalid certificate (validateRaftTLS needs an exact name)",
                fix=fix,
            )
        )
    if {r for r, _ in roles} >= {"server", "client"}:
        findings.append(
            Finding(
                "error",
                path,
                "names.both-roles",
                "carries both server and client names; one certificate per role, or Nomad's role "
                "check means nothing",
                fix=fix,
            )
        )
    if leaf.role in ("server", "client"):
        wanted = role_name(leaf.role, leaf.region)
        if wanted not in names:
            other_regions = sorted(g for r, g in roles if r == leaf.role and g != leaf.region)
            if other_regions:
                why = f"made for region {', '.join(other_regions)}, not {leaf.region}"
            else:
                why = (
                    f"not valid for {wanted}: it is not a {leaf.role} certificate for {leaf.region}"
                )
            findings.append(
                Finding(
                    "error",
                    path,
                    f"names.{leaf.role}",
                    why,
                    nomad_error=go_hostname_error(facts, wanted)
                    if leaf.role == "server"
                    else "invalid role or region for certificate",
                    fix=fix,
                )
            )
        for host in ("localhost", "127.0.0.1"):
            if host not in (*facts.dns_names, *facts.ip_addresses):
                findings.append(
                    Finding(
                        "warning",
                        path,
                        "names.local",
                        f"no {host}: the nomad CLI on this host dials it and fails",
                        nomad_error=go_hostname_error(facts, host),
                        fix=f"{fix}  (or set NOMAD_TLS_SERVER_NAME={wanted})",
                    )
                )
    if leaf.role == "cli" and roles - {("cli", leaf.region)}:
        findings.append(
            Finding(
                "error",
                path,
                "names.cli",
                f"a CLI certificate with agent names {sorted(role_name(*r) for r in roles)} "
                "can pose as an agent",
                fix=fix,
            )
        )
    return findings


_EKU_NEEDED: dict[str, tuple[str, ...]] = {
    "server": ("serverAuth", "clientAuth"),
    "client": ("serverAuth", "clientAuth"),
    "cli": ("clientAuth",),
}


def check_usages(leaf: Leaf, facts: parsers.CertFacts, fix: str) -> list[Finding]:
    """Extended key usage per role; keyEncipherment on an EC key."""
    findings = []
    eku = set(facts.extended_key_usage)
    if leaf.role is not None and eku and "anyExtendedKeyUsage" not in eku:
        missing = [u for u in _EKU_NEEDED[leaf.role] if u not in eku]
        if missing:
            why = {"serverAuth": "it cannot serve TLS", "clientAuth": "it cannot dial with TLS"}
            findings.append(
                Finding(
                    "error",
                    str(leaf.cert),
                    "usage.extended",
                    f"a {leaf.role} certificate without {', '.join(missing)}: "
                    f"{'; '.join(why[m] for m in missing)}",
                    nomad_error="x509: certificate specifies an incompatible key usage",
                    fix=fix,
                )
            )
    if facts.key.algorithm == "ecdsa" and "key_encipherment" in facts.key_usage:
        findings.append(
            Finding(
                "warning",
                str(leaf.cert),
                "usage.key-encipherment",
                "an EC key with keyEncipherment: an EC key cannot encrypt (RFC 5480); strict TLS "
                "stacks refuse it",
                fix=fix,
            )
        )
    return findings


def check_leaf(
    leaf: Leaf, ca: LoadedCA | None, *, now: datetime, warn_within: timedelta
) -> list[Finding]:
    """Every check for one role certificate file (and its key, when known)."""
    try:
        cert = parsers.load_certificate(files.read_input(leaf.cert))
    except (OSError, parsers.ParseError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e)
        return [
            Finding(
                "error",
                str(leaf.cert),
                "cert.read",
                f"cannot read: {reason}",
                fix=reissue_command(leaf, ca),
            )
        ]
    return check_certificate(leaf, cert, ca, now=now, warn_within=warn_within)


def check_certificate(
    leaf: Leaf,
    cert: x509.Certificate,
    ca: LoadedCA | None,
    *,
    now: datetime,
    warn_within: timedelta,
    label: str | None = None,
) -> list[Finding]:
    """Every check for one loaded role certificate; ``label`` names it when it has no file."""
    path = label or str(leaf.cert)
    fix = reissue_command(leaf, ca)
    facts = parsers.certificate_facts(cert)
    findings: list[Finding] = []
    if facts.is_ca:
        findings.append(
            Finding(
                "error",
                path,
                "cert.is-ca",
                "a CA certificate where a role certificate belongs",
                fix=fix,
            )
        )
    if leaf.role is None:
        findings.append(
            Finding(
                "info",
                path,
                "cert.role",
                f"no Nomad role name in {_names(facts)}; only generic checks were run",
                fix="name the role with --role, or name the file <region>-<role>-nomad.pem",
            )
        )
    if ca is not None:
        if not parsers.is_issued_by(cert, ca.cert):
            findings.append(
                Finding(
                    "error",
                    path,
                    "chain",
                    f"not signed by the CA {ca.path} (issuer: {facts.issuer})",
                    nomad_error="x509: certificate signed by unknown authority",
                    fix=fix,
                )
            )
        elif facts.not_after > ca.facts.not_after:
            findings.append(
                Finding(
                    "warning",
                    path,
                    "dates.outlives-ca",
                    f"valid until {facts.not_after:%Y-%m-%d}, after its CA expires on "
                    f"{ca.facts.not_after:%Y-%m-%d}; from then on it fails verification",
                    fix=fix,
                )
            )
    shown = Leaf(leaf.role, leaf.region, Path(path), leaf.key)
    findings += check_dates(Path(path), facts, now=now, warn_within=warn_within, fix=fix)
    findings += check_role_names(shown, facts, fix)
    findings += check_usages(shown, facts, fix)
    if leaf.key is not None:
        findings += _check_pair(leaf, facts, fix)
    return findings


def _check_pair(leaf: Leaf, facts: parsers.CertFacts, fix: str) -> list[Finding]:
    assert leaf.key is not None  # noqa: S101 (caller checked)
    try:
        key = parsers.read_private_key(files.read_input(leaf.key))
    except (OSError, parsers.ParseError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e)
        return [Finding("error", str(leaf.key), "key.read", f"cannot read: {reason}", fix=fix)]
    findings = check_key_file(leaf.key)
    if key.public_key_sha256 != facts.key.public_key_sha256:
        findings.append(
            Finding(
                "error",
                str(leaf.key),
                "key.pair",
                f"does not belong to {leaf.cert.name}",
                nomad_error="tls: private key does not match public key",
                fix=fix,
            )
        )
    return findings
