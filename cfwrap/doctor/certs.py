"""Certificate and key checks, as a Nomad agent or CLI would meet them.

Each check returns findings that quote the error Nomad (Go's crypto/x509 and crypto/tls) prints,
and the cfwrap command that fixes it. Works on any PEM files, not only cfwrap's.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cfwrap import files, parsers, verify
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
    #: Every certificate in the CA file: Go trusts them all (AppendCertsFromPEM).
    roots: tuple[x509.Certificate, ...] = ()


def reissue_command(leaf: Leaf, ca: LoadedCA | None) -> str:
    """The cfwrap command that makes a correct certificate in this leaf's place.

    Every value is shell-quoted: paths and the region may come from a file an attacker wrote
    (an agent's HCL), and the line is meant to be pasted into a shell.
    """
    ca_path = ca.path if ca else Path("ca.pem")
    # cfssljson's naming: nomad-agent-ca.pem's key is nomad-agent-ca-key.pem.
    ca_key = (ca.key_path if ca and ca.key_path else None) or key_path(ca_path)
    if not ca_key.is_file():
        ca_key = Path("CA-KEY")  # a cert folder holds the CA's certificate, never its key
    role = leaf.role or "server"
    out = str(leaf.cert.parent)
    here = Path.cwd()
    if not leaf.cert.is_file() or leaf.cert.parent.resolve() in (here, *here.parents):
        out = "NEW-DIR"  # a dialled address, or a folder cert --out refuses (., or above it)
    return shlex.join(
        ["cfwrap", "cert", "--ca", str(ca_path), "--ca-key", str(ca_key), "--role", role,
         "--region", leaf.region, "--out", out, *(["--force"] if out != "NEW-DIR" else [])]
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
    """Load the CA file as Nomad does (its roots, :func:`verify.go_ca_pool`); findings on it."""
    try:
        data = files.read_input(path)
    except OSError as e:
        return None, [_unreadable_ca(path, e.strerror or str(e))]
    roots = tuple(verify.go_ca_pool(data))
    if not roots:
        try:  # what is there instead, in cryptography's words
            parsers.load_certificate(data)
            reason = "no certificate Go takes (a CERTIFICATE block, without headers, it parses)"
        except parsers.ParseError as e:
            reason = str(e)
        nomad = f"Failed to parse any valid certificates in CA file: {path}"
        return None, [_unreadable_ca(path, reason, nomad_error=nomad)]
    cert = roots[0]
    facts = parsers.certificate_facts(cert)
    findings = []
    # Go's CheckSignatureFrom: CA:TRUE, and keyCertSign only when a key usage is given at all.
    if not facts.is_ca or (facts.key_usage and "key_cert_sign" not in facts.key_usage):
        findings.append(
            Finding(
                "error",
                str(path),
                "ca.constraints",
                f"{facts.subject} is not a CA (needs CA:TRUE, and keyCertSign if it has a key "
                "usage)",
                nomad_error="x509: certificate signed by unknown authority",
                fix="cfwrap ca --out NEW-CA-DIR, then reissue the certificates from it",
            )
        )
    if any(parsers.is_key_label(b.type) for b in parsers.go_pem_blocks(data)):
        findings.append(
            Finding(
                "error",
                str(path),
                "ca.private-key",
                "the CA file holds a private key: every agent and CLI user given it would hold "
                "that key too",
                fix=f"keep only the CA certificate(s) in {path}, and the CA's key offline",
            )
        )
    return LoadedCA(path, key_path, cert, facts, roots), findings


def _unreadable_ca(path: Path, reason: str, *, nomad_error: str = "") -> Finding:
    return Finding(
        "error",
        str(path),
        "ca.read",
        f"cannot read the CA: {reason}",
        nomad_error=nomad_error,
        fix="give the CA certificate (ca.pem) with --ca",
    )


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


def check_key_file(path: Path, *, what: str = "a private key") -> list[Finding]:
    """A file that holds a secret: not readable by others, owned by whoever runs this."""
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
                f"mode {mode:04o} lets other users read or change {what}",
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


def _exactly(facts: parsers.CertFacts, host: str) -> bool:
    """``host`` among the DNS SANs without a wildcard's help (any case, as Go compares)."""
    return host.lower() in (n.lower() for n in facts.dns_names if "*" not in n)


def _poses(leaf: Leaf, cert: x509.Certificate, facts: parsers.CertFacts) -> list[tuple[str, bool]]:
    """What another role's checks accept this certificate for, and whether a wildcard did it.

    The connections Nomad must refuse to a certificate of ``leaf.role`` (tests/gopeer's
    must-fail checks): another role's TLS name (Go's matching, wildcards included), the RPC
    role check (``rpcNameAndRegionValidator``) for a CLI, the Raft check for a client agent.
    """
    server, client = role_name("server", leaf.region), role_name("client", leaf.region)
    hosts = {"server": [client], "client": [server], "cli": [server, client]}.get(
        leaf.role or "", []
    )
    found = [
        (f"Go accepts it as {host}", not _exactly(facts, host))
        for host in hosts
        if verify.matches_host(cert, host)
    ]
    if leaf.role == "client" and verify.raft_ok(cert, leaf.region):
        found.append((f"servers accept it into Raft as {server}", False))
    if leaf.role == "cli" and verify.rpc_peer_ok(cert, leaf.region):
        found.append(("servers accept it for RPC (rpcNameAndRegionValidator)", False))
    return found


def _role_name_problem(
    leaf: Leaf, cert: x509.Certificate, facts: parsers.CertFacts
) -> tuple[str, str] | None:
    """Why a server or client agent's certificate fails Nomad's name checks: (why, Go's error)."""
    assert leaf.role in ("server", "client")  # noqa: S101 (caller checked)
    wanted = role_name(leaf.role, leaf.region)
    host_ok = verify.matches_host(cert, wanted)
    rpc_ok = verify.rpc_peer_ok(cert, leaf.region)
    raft_ok = leaf.role != "server" or verify.raft_ok(cert, leaf.region)
    if host_ok and rpc_ok and raft_ok:
        return None
    names = _names(facts)
    roles = {p for p in (parse_role_name(n) for n in names) if p is not None}
    invalid_role = "invalid role or region for certificate"
    go_error = verify.host_error(cert, wanted) if not host_ok else invalid_role
    if leaf.role == "client" and not rpc_ok:
        go_error = invalid_role
    if wanted.lower() not in (n.lower() for n in names):
        other_regions = sorted(g for r, g in roles if r == leaf.role and g != leaf.region)
        if other_regions:
            return f"made for region {', '.join(other_regions)}, not {leaf.region}", go_error
        return (
            f"not valid for {wanted}: it is not a {leaf.role} certificate for {leaf.region}",
            go_error,
        )
    if not host_ok:
        return f"{wanted} is not among its DNS SANs, and Go checks the SANs only", go_error
    if not raft_ok:
        return (
            f"{wanted} is not spelled exactly (Nomad's Raft check compares it case and all)",
            f"invalid certificate, {wanted} not in {','.join(names)}",
        )
    return (
        f"Nomad's RPC role check finds no {wanted} (or server name) spelled exactly",
        invalid_role,
    )


def check_role_names(
    leaf: Leaf, cert: x509.Certificate, facts: parsers.CertFacts, fix: str
) -> list[Finding]:
    """The names each role must (and must not) carry, as Go's TLS and Nomad's RPC checks see them.

    An error exactly where a Nomad cluster refuses the certificate in its role, or would accept
    it in another role's place; a warning for what works but should not be there.
    """
    path = str(leaf.cert)
    names = _names(facts)
    roles = {p for p in (parse_role_name(n) for n in names) if p is not None}
    findings = []
    problem = _role_name_problem(leaf, cert, facts) if leaf.role in ("server", "client") else None
    poses = _poses(leaf, cert, facts)
    wildcards = sorted(n for n in names if "*" in n)
    if wildcards:
        through = [what for what, by_wildcard in poses if by_wildcard]
        findings.append(
            Finding(
                "error" if through else "warning",
                path,
                "names.wildcard",
                f"wildcard name(s) {wildcards}: "
                + (f"{'; '.join(through)}" if through else "Raft accepts only exact names"),
                nomad_error="raft: invalid certificate (validateRaftTLS needs an exact name)",
                fix=fix,
            )
        )
    exact_poses = [what for what, by_wildcard in poses if not by_wildcard]
    if {r for r, _ in roles} >= {"server", "client"}:
        both = exact_poses if leaf.role != "cli" else []
        findings.append(
            Finding(
                "error" if both or problem else "warning",
                path,
                "names.both-roles",
                "carries both server and client names; one certificate per role, or Nomad's role "
                "check means nothing" + (f" ({'; '.join(both)})" if both else ""),
                fix=fix,
            )
        )
    elif exact_poses and leaf.role != "cli" and problem is None:
        # (With a name problem it is another role's certificate: names.<role> says so.)
        findings.append(
            Finding(
                "error",
                path,
                "names.both-roles",
                f"a {leaf.role} certificate that another role's checks accept: "
                + "; ".join(exact_poses),
                fix=fix,
            )
        )
    if problem is not None:
        assert leaf.role is not None  # noqa: S101 (problem implies a role)
        why, go_error = problem
        findings.append(
            Finding("error", path, f"names.{leaf.role}", why, nomad_error=go_error, fix=fix)
        )
    if leaf.role in ("server", "client"):
        wanted = role_name(leaf.role, leaf.region)
        for host in ("localhost", "127.0.0.1"):
            if not verify.matches_host(cert, host):
                findings.append(
                    Finding(
                        "warning",
                        path,
                        "names.local",
                        f"no {host}: the nomad CLI on this host dials it and fails",
                        nomad_error=verify.host_error(cert, host),
                        fix=f"{fix}  (or set NOMAD_TLS_SERVER_NAME={wanted})",
                    )
                )
    if leaf.role == "cli" and (exact_poses or roles - {("cli", leaf.region)}):
        agent_names = sorted(role_name(*r) for r in roles - {("cli", leaf.region)})
        findings.append(
            Finding(
                "error" if exact_poses else "warning",
                path,
                "names.cli",
                f"a CLI certificate with agent names {agent_names}"
                + (f" can pose as an agent: {'; '.join(exact_poses)}" if exact_poses else ""),
                fix=fix,
            )
        )
    return findings


_EKU_NEEDED: dict[str, tuple[verify.Usage, ...]] = {
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
    """Every check for one role certificate file (and its key, when known).

    Certificates after the first in the file are its intermediates, as Nomad sends them.
    """
    try:
        data = files.read_input(leaf.cert)
        # Go's X509KeyPair: the CERTIFICATE blocks pem.Decode finds, the first the leaf.
        blocks = [b.der for b in parsers.go_pem_blocks(data) if b.type == b"CERTIFICATE"]
        if not blocks:  # cryptography's words for what is there instead
            parsers.load_certificate(data)
            raise parsers.ParseError("no certificate Go takes (a CERTIFICATE block it decodes)")
        cert = parsers.load_der_certificate(blocks[0])
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
    # Go's X509KeyPair sends every CERTIFICATE block; each peer parses them all.
    intermediates, damaged = [], []
    for der in blocks[1:]:
        try:
            intermediates.append(parsers.load_der_certificate(der))
        except parsers.ParseError as e:
            damaged.append(
                Finding(
                    "error",
                    str(leaf.cert),
                    "cert.chain-read",
                    f"a certificate after the first cannot be read ({e}); peers refuse the "
                    "whole chain",
                    nomad_error="tls: failed to parse certificate from server: x509: malformed "
                    "certificate",
                    fix=reissue_command(leaf, ca),
                )
            )
    return damaged + check_certificate(
        leaf, cert, ca, now=now, warn_within=warn_within, intermediates=intermediates
    )


def _check_chain(
    leaf: Leaf,
    cert: x509.Certificate,
    facts: parsers.CertFacts,
    ca: LoadedCA,
    *,
    intermediates: Sequence[x509.Certificate],
    now: datetime,
    label: str,
    fix: str,
) -> tuple[list[list[x509.Certificate]], list[Finding]]:
    """Go's path building to the CA, then extended key usage down each chain (verify.py)."""
    try:
        chains = verify.build_chains(cert, intermediates=intermediates, roots=ca.roots, now=now)
    except verify.VerifyError as e:
        if e.rule == "unknown-authority":
            return [], [
                Finding(
                    "error",
                    label,
                    "chain",
                    f"not signed by the CA {ca.path} (issuer: {facts.issuer}); {e.message}",
                    nomad_error="x509: certificate signed by unknown authority",
                    fix=fix,
                )
            ]
        return [], [
            Finding("error", label, f"chain.{e.rule}", e.message, nomad_error=e.go_error, fix=fix)
        ]
    findings = []
    for usage in _EKU_NEEDED.get(leaf.role or "", ()):
        if verify.chain_allows([cert], usage) and not any(
            verify.chain_allows(chain, usage) for chain in chains
        ):
            findings.append(
                Finding(
                    "error",
                    label,
                    "chain.usage",
                    f"a CA above it restricts extended key usage and leaves out {usage}; Go "
                    "checks extended key usage down to the CA",
                    nomad_error="x509: certificate specifies an incompatible key usage",
                    fix="issue from a CA without an extended key usage (cfwrap ca), then " + fix,
                )
            )
    if facts.not_after > ca.facts.not_after:
        findings.append(
            Finding(
                "warning",
                label,
                "dates.outlives-ca",
                f"valid until {facts.not_after:%Y-%m-%d}, after its CA expires on "
                f"{ca.facts.not_after:%Y-%m-%d}; from then on it fails verification",
                fix=fix,
            )
        )
    return chains, findings


def _check_key_type(leaf: Leaf, cert: x509.Certificate, label: str, fix: str) -> list[Finding]:
    """Key types Nomad cannot use (an error), and RSA keys under 2048 bits (a warning)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    problem = verify.key_problem(cert, agent=leaf.role != "cli")
    if problem is not None:
        return [
            Finding(
                "error",
                label,
                "key.type",
                f"a {leaf.role or 'role'} certificate whose key Nomad cannot use",
                nomad_error=problem,
                fix=fix,
            )
        ]
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        return [
            Finding(
                "warning",
                label,
                "key.size",
                f"an RSA key of {key.key_size} bits: Go accepts it, but 2048 is the least to use",
                fix=fix,
            )
        ]
    return []


def check_certificate(
    leaf: Leaf,
    cert: x509.Certificate,
    ca: LoadedCA | None,
    *,
    now: datetime,
    warn_within: timedelta,
    label: str | None = None,
    intermediates: Sequence[x509.Certificate] = (),
) -> list[Finding]:
    """Every check for one loaded role certificate; ``label`` names it when it has no file."""
    path = label or str(leaf.cert)
    fix = reissue_command(leaf, ca)
    facts = parsers.certificate_facts(cert)
    findings: list[Finding] = []
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
    unhandled = verify.unhandled_critical(cert)
    if unhandled:
        findings.append(
            Finding(
                "error",
                path,
                "cert.critical-extension",
                f"critical extension(s) Go does not understand: {', '.join(unhandled)}",
                nomad_error="x509: unhandled critical extension",
                fix=fix,
            )
        )
    chains: list[list[x509.Certificate]] = []
    if ca is not None:
        chains, found = _check_chain(
            leaf, cert, facts, ca, intermediates=intermediates, now=now, label=path, fix=fix
        )
        findings += found
    if facts.is_ca:
        # It matters when its key can mint certificates that chain to the CA (Go's path length).
        mints = ca is None or any(verify.can_issue(cert, chain) for chain in chains)
        findings.append(
            Finding(
                "error" if mints else "warning",
                path,
                "cert.is-ca",
                "a CA certificate where a role certificate belongs"
                + ("" if mints else " (its CA's path length keeps it from signing)"),
                fix=fix,
            )
        )
    shown = Leaf(leaf.role, leaf.region, Path(path), leaf.key)
    findings += check_dates(Path(path), facts, now=now, warn_within=warn_within, fix=fix)
    findings += _check_key_type(leaf, cert, path, fix)
    findings += check_role_names(shown, cert, facts, fix)
    findings += check_usages(shown, facts, fix)
    if leaf.key is not None:
        findings += _check_pair(leaf, facts, fix)
    return findings


def _check_pair(leaf: Leaf, facts: parsers.CertFacts, fix: str) -> list[Finding]:
    assert leaf.key is not None  # noqa: S101 (caller checked)
    try:
        key = parsers.read_key_as_go(files.read_input(leaf.key))
    except (OSError, parsers.ParseError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e)
        return [Finding("error", str(leaf.key), "key.read", f"cannot read: {reason}", fix=fix)]
    findings = check_key_file(leaf.key)
    if key.public_key_sha256 != facts.key.public_key_sha256:
        own = _own_key_beside(leaf, facts)
        findings.append(
            Finding(
                "error",
                str(leaf.key),
                "key.pair",
                f"does not belong to {leaf.cert.name}",
                nomad_error="tls: private key does not match public key",
                fix=f"use {own}, which does (key_file)" if own else fix,
            )
        )
    return findings


def _own_key_beside(leaf: Leaf, facts: parsers.CertFacts) -> Path | None:
    """A key file beside the certificate that does belong to it (the right key exists)."""
    for candidate in sorted(leaf.cert.parent.glob("*key*.pem")):
        if candidate == leaf.key or not files.is_regular(candidate):
            continue
        try:
            found = parsers.read_key_as_go(files.read_input(candidate))
        except (OSError, parsers.ParseError):
            continue
        if found.public_key_sha256 == facts.key.public_key_sha256:
            return candidate
    return None
