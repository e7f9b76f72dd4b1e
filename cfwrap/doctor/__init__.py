"""``cfwrap doctor``: Nomad's own TLS checks on a kit, on loose files, or on a live peer.

Works on certificates cfwrap did not make: roles come from the agent configuration that uses a
certificate, else from the file name (``<region>-<role>-nomad.pem``), else from the names in it.
"""

from __future__ import annotations

import contextlib
import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfwrap import files, gossip, parsers
from cfwrap.cfssl import key_path
from cfwrap.doctor import agent, certs
from cfwrap.doctor.findings import Finding, sort_findings
from cfwrap.nomad import DEFAULT_REGION, Role, parse_file_stem, role_of

if TYPE_CHECKING:  # the handshakes (and ssl) load only for --probe
    from cfwrap.doctor import probe


@dataclass
class Report:
    """Everything doctor found."""

    findings: list[Finding] = field(default_factory=list)
    probes: list[probe.ProbeResult] = field(default_factory=list)
    presented: dict[str, Any] | None = None

    @property
    def errors(self) -> int:
        """How many findings are errors."""
        return sum(f.severity == "error" for f in self.findings)

    @property
    def warnings(self) -> int:
        """How many findings are warnings."""
        return sum(f.severity == "warning" for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``--json``."""
        return {
            "errors": self.errors,
            "warnings": self.warnings,
            "findings": [f.to_json() for f in sort_findings(self.findings)],
            "probes": [p.to_json() for p in self.probes],
            "presented": self.presented,
        }


@dataclass(frozen=True)
class Options:
    """How strict to be, and as of when."""

    warn_within: timedelta = timedelta(days=30)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


def _role_from_names(cert_path: Path) -> tuple[Role | None, str | None]:
    try:
        facts = parsers.read_certificate(files.read_input(cert_path))
    except (OSError, parsers.ParseError):
        return None, None
    return role_of(facts) or (None, None)


#: What :func:`_pem_files` says of a file it could not read (its error is reported already).
UNREADABLE = "unreadable"


def _pem_files(folder: Path, report: Report) -> dict[Path, str | None]:
    """What each ``*.pem`` in the folder holds; one that cannot be read is an error finding."""
    kinds: dict[Path, str | None] = {}
    for path in sorted(folder.glob("*.pem")):
        try:
            kinds[path] = parsers.pem_kind(files.read_input(path))
        except OSError as e:
            kinds[path] = UNREADABLE
            report.findings.append(
                Finding(
                    "error",
                    str(path),
                    "file.read",
                    f"cannot read: {e.strerror}",
                    fix="replace it with the certificate or key itself, or remove it",
                )
            )
    return kinds


def _find_ca(pems: dict[Path, str | None]) -> Path | None:
    certs_ = [p for p, kind in pems.items() if kind == "certificate"]
    named = [p for p in certs_ if p.name in ("ca.pem", "nomad-agent-ca.pem")]
    for path in named + certs_:
        try:
            if parsers.read_certificate(files.read_input(path)).is_ca:
                return path
        except (OSError, parsers.ParseError):
            continue
    return None


def diagnose_folder(
    folder: Path, options: Options, *, region: str | None = None, run_probes: bool = False
) -> Report:
    """Check a kit folder: its CA, role certificates and keys, agent configs, gossip key.

    ``region``, when given, is the region every certificate must be for; otherwise each
    certificate's region comes from its file name, its agent config, or its own names.
    """
    report = Report()
    pems = _pem_files(folder, report)
    ca_path = _find_ca(pems)
    ca = _check_ca(folder, ca_path, options, report)
    configs = []
    for path in sorted(folder.glob("*.hcl")):
        config, found = agent.read(path)
        report.findings += found
        if config is not None:
            configs.append(config)
            report.findings += agent.check(config)
    leaves = _leaves(pems, ca_path, configs, region)
    checked_keys = {leaf.key.resolve() for leaf in leaves if leaf.key is not None}
    for leaf in leaves:
        report.findings += certs.check_leaf(
            leaf, ca, now=options.now, warn_within=options.warn_within
        )
    for path, kind in pems.items():
        if kind == "private-key" and path.resolve() not in checked_keys:
            report.findings += certs.check_key_file(path)
    report.findings += _check_gossip_file(folder / "gossip.key")
    report.findings += _check_manifest(folder)
    if run_probes and ca_path is not None:
        report.probes = _probe_kit(ca_path, leaves)
        report.findings += probe_findings(report.probes)
    return report


def _check_ca(
    folder: Path, ca_path: Path | None, options: Options, report: Report
) -> certs.LoadedCA | None:
    if ca_path is None:
        report.findings.append(
            Finding(
                "error",
                str(folder),
                "ca.missing",
                "no CA certificate in this folder",
                fix="give it with --ca, or make a kit with cfwrap quickstart",
            )
        )
        return None
    ca_key = key_path(ca_path)
    ca, found = certs.load_ca(ca_path, ca_key if ca_key.is_file() else None)
    report.findings += found
    if ca is not None:
        report.findings += certs.check_dates(
            ca_path,
            ca.facts,
            now=options.now,
            warn_within=options.warn_within,
            fix="cfwrap ca --out NEW-CA-DIR (then reissue every certificate from it)",
        )
    return ca


def _leaves(
    pems: dict[Path, str | None],
    ca_path: Path | None,
    configs: list[agent.AgentConfig],
    expect: str | None,
) -> list[certs.Leaf]:
    """Role certificates with the role and region each is meant for, and its key.

    An agent config that uses a certificate says its role best; then the file name; then the
    names in the certificate.
    """
    leaves: dict[Path, certs.Leaf] = {}
    for path, kind in pems.items():
        named = parse_file_stem(path.name.removesuffix(".pem"))
        # A file named as a role certificate is one, whatever it holds (empty, DER, a CSR):
        # checked as such, it is refused as Nomad would refuse it, never skipped.
        if (kind != "certificate" and named is None) or kind == UNREADABLE or path == ca_path:
            continue
        role, region = named or _role_from_names(path)
        key = key_path(path)
        leaves[path.resolve()] = certs.Leaf(
            role, expect or region or DEFAULT_REGION, path, key if key.is_file() else None
        )
    # Each config that uses a certificate says what it is for; two configs (a server's and a
    # client's) may use one certificate, and it must then pass as both.
    used: dict[tuple[Path, Role | None, str, Path | None], certs.Leaf] = {}
    for config in configs:
        cert_file = config.files.get("cert_file")
        if cert_file is None or not files.is_regular(cert_file):
            continue
        known = leaves.get(cert_file.resolve())
        leaf = certs.Leaf(
            config.role or (known.role if known else None),
            expect or config.region,
            known.cert if known else cert_file,
            config.files.get("key_file") or (known.key if known else None),
        )
        used.setdefault((cert_file.resolve(), leaf.role, leaf.region, leaf.key), leaf)
    by_config = {resolved for resolved, *_ in used}
    return [leaf for path, leaf in leaves.items() if path not in by_config] + list(used.values())


#: ``manifest.FILE_NAME``, named here so that checking a folder without one loads no pydantic.
MANIFEST_FILE = "manifest.json"


def _check_manifest(folder: Path) -> list[Finding]:
    """A kit's manifest, when it has one, still describes the files (else: changed since)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return []
    from cfwrap import manifest  # pydantic: only for a folder that has a manifest
    from cfwrap.errors import VerificationError

    write = shlex.join(["cfwrap", "manifest", "--write", str(folder)])
    fix = f"inspect the change; {write} records the folder as it is"
    try:
        recorded = manifest.load(folder)
        actual = manifest.scan(folder)
    except VerificationError as e:
        return [Finding("warning", str(path), "manifest.invalid", e.why, fix=fix)]
    except OSError as e:
        reason = f"cannot compare it with {e.filename or 'the folder'}: {e.strerror}"
        return [Finding("warning", str(path), "manifest.unreadable", reason)]
    return [
        Finding("warning", str(path), "manifest.drift", line, fix=fix)
        for line in manifest.differences(recorded, actual)
    ]


def _check_gossip_file(path: Path) -> list[Finding]:
    if not path.is_file():
        return []
    findings = certs.check_key_file(path, what="the gossip key")
    try:
        gossip.check(files.read_input_text(path, limit=4096))
    except OSError as e:
        findings.append(Finding("error", str(path), "gossip", f"cannot read: {e.strerror}"))
    except ValueError as e:
        findings.append(Finding("error", str(path), "gossip", str(e), fix="cfwrap keygen"))
    return findings


def _probe_kit(ca: Path, leaves: list[certs.Leaf]) -> list[probe.ProbeResult]:
    from cfwrap.doctor import probe

    def side(role: str) -> tuple[probe.Side, str] | None:
        for leaf in leaves:
            if leaf.role == role and leaf.key is not None:
                return probe.Side(leaf.cert, leaf.key), leaf.region
        return None

    server, client, cli = side("server"), side("client"), side("cli")
    region = next((s[1] for s in (server, client, cli) if s), DEFAULT_REGION)
    probes = probe.nomad_probes(
        region=region,
        server=server[0] if server else None,
        client=client[0] if client else None,
        cli=cli[0] if cli else None,
    )
    return [probe.run(p, ca) for p in probes]


def probe_findings(results: list[probe.ProbeResult]) -> list[Finding]:
    """An error for each handshake that did not go as Nomad needs."""
    findings = []
    for result in results:
        if not result.as_expected:
            what = "failed" if result.expect_ok else "succeeded, but Nomad must refuse it"
            findings.append(
                Finding(
                    "error",
                    "probe",
                    result.name,
                    f"handshake as {result.server_name} {what}",
                    nomad_error=result.error,
                    fix="fix the certificate findings above, then probe again",
                )
            )
    if not results:
        findings.append(
            Finding("info", "probe", "probe.none", "no role certificates with keys to probe")
        )
    return findings


def diagnose_files(
    *,
    cert: Path,
    key: Path | None,
    ca: Path | None,
    role: Role | None,
    region: str | None,
    options: Options,
) -> Report:
    """Check loose files made by anyone: one certificate, its key, its CA.

    Without a role or region, a file named as cfwrap names them (``<region>-<role>-nomad.pem``)
    says them, else the certificate's own names, else: no role, region global.
    """
    report = Report()
    loaded: certs.LoadedCA | None = None
    if ca is not None:
        loaded, found = certs.load_ca(ca, None)
        report.findings += found
    # A name as cfwrap gives them (<region>-<role>-nomad.pem) says what the file is for; any
    # other (nomad-server.pem names no region) gives way to the certificate's own names.
    stem = cert.name.removesuffix(".pem")
    by_name = parse_file_stem(stem) if stem.endswith("-nomad") else None
    named = by_name or _role_from_names(cert)
    role = role or named[0]
    leaf = certs.Leaf(role, region or named[1] or DEFAULT_REGION, cert, key)
    report.findings += certs.check_leaf(
        leaf, loaded, now=options.now, warn_within=options.warn_within
    )
    return report


def diagnose_peer(
    address: str,
    *,
    ca: Path,
    cert: Path | None,
    key: Path | None,
    role: Role,
    region: str,
    options: Options,
) -> Report:
    """Connect to a live peer and check the certificate it presents as a Nomad ``role`` agent."""
    from cfwrap.doctor import connect

    server_name = f"{role}.{region}.nomad"
    presented = connect.connect(address, ca=ca, cert=cert, key=key, server_name=server_name)
    report = Report(presented=presented.summary())
    if presented.certificate_der is None:
        report.findings.append(
            Finding(
                "error",
                address,
                "connect",
                presented.error,
                fix="check that the agent listens there with TLS on",
            )
        )
        return report
    loaded, found = certs.load_ca(ca, None)
    report.findings += found
    leaf = certs.Leaf(role, region, Path(address), None)
    intermediates = []
    for der in presented.chain_der:  # what it sent after its own, as Nomad's peers use it
        with contextlib.suppress(parsers.ParseError):
            intermediates.append(parsers.load_der_certificate(der))
    report.findings += certs.check_certificate(
        leaf,
        parsers.load_der_certificate(presented.certificate_der),
        loaded,
        now=options.now,
        warn_within=options.warn_within,
        label=address,
        intermediates=intermediates,
    )
    if not presented.verified:
        report.findings.append(
            Finding(
                "error",
                address,
                "connect.verify",
                f"a verified handshake as {server_name} failed",
                nomad_error=presented.error,
                fix="give the agent a certificate from this CA with the right role name",
            )
        )
    return report
