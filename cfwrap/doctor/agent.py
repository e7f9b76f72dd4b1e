"""Nomad agent configuration checks: the ``tls {}`` block, the gossip key, cipher suites.

The HCL is read with a real HCL2 parser (python-hcl2), so a file Nomad would refuse to parse is
reported as such instead of being half-read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfwrap import files, gossip, parsers
from cfwrap.doctor.findings import Finding, Severity
from cfwrap.nomad import DEFAULT_REGION, HclSyntaxError, Role, check_region, parse_hcl

#: An agent configuration is a few KiB; a larger file is not one cfwrap should parse.
_MAX_HCL = 1024 * 1024


@dataclass(frozen=True)
class AgentConfig:
    """What an agent configuration file says about TLS (paths resolved against its folder)."""

    path: Path
    role: Role | None
    region: str
    tls: dict[str, Any] | None
    encrypt: str | None
    files: dict[str, Path] = field(default_factory=dict)


def _block(data: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = data.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, dict) else None


def read(path: Path) -> tuple[AgentConfig | None, list[Finding]]:
    """Parse one agent configuration file.

    The role comes from the file name (``server``/``client`` in it), else from its blocks.
    """
    try:
        data = parse_hcl(files.read_input_text(path, limit=_MAX_HCL))
    except OSError as e:
        return None, [Finding("error", str(path), "hcl.read", f"cannot read: {e.strerror}")]
    except HclSyntaxError as e:
        # The parser's own message quotes the text it stumbled on: maybe the gossip key.
        return None, [
            Finding(
                "error",
                str(path),
                "hcl.parse",
                str(e),
                nomad_error="Error loading configuration",
                fix="fix the syntax at that place",
            )
        ]
    server = _block(data, "server")
    stem = path.stem
    role: Role | None = None
    if "server" in stem or (server is not None and "client" not in stem):
        role = "server"
    elif "client" in stem or _block(data, "client") is not None:
        role = "client"
    tls = _block(data, "tls")
    named = {}
    for key in ("ca_file", "cert_file", "key_file"):
        value = tls.get(key) if tls else None
        if isinstance(value, str) and value:
            named[key] = Path(value) if Path(value).is_absolute() else path.parent / value
    encrypt = server.get("encrypt") if server else None
    region = data.get("region")
    region = region if isinstance(region, str) else DEFAULT_REGION
    findings = []
    try:
        check_region(region)
    except ValueError as e:
        findings.append(
            Finding(
                "error",
                str(path),
                "hcl.region",
                f"{e}; no certificate can carry server.<region>.nomad for it",
                fix='give the agent a region that is a DNS label, e.g. region = "global"',
            )
        )
    config = AgentConfig(
        path=path,
        role=role,
        region=region,
        tls=tls,
        encrypt=encrypt if isinstance(encrypt, str) else None,
        files=named,
    )
    return config, findings


def check(config: AgentConfig) -> list[Finding]:
    """Findings for one agent configuration (the certificates it names are checked elsewhere)."""
    path = str(config.path)
    if config.tls is None:
        return [
            Finding(
                "error",
                path,
                "hcl.tls",
                "no tls {} block: HTTP and RPC are plaintext",
                fix="add the tls block cfwrap quickstart writes",
            )
        ]
    findings = []
    tls = config.tls
    flags: tuple[tuple[str, Severity], ...] = (("rpc", "error"), ("http", "warning"))
    for flag, severity in flags:
        if tls.get(flag) is not True:
            findings.append(
                Finding(
                    severity,
                    path,
                    f"hcl.{flag}",
                    f"tls {{ {flag} = true }} is not set",
                    fix=f"set {flag} = true in the tls block",
                )
            )
    if tls.get("verify_server_hostname") is not True:
        findings.append(
            Finding(
                "error",
                path,
                "hcl.verify_server_hostname",
                "verify_server_hostname is off: any certificate from the CA can pose as a server",
                fix="set verify_server_hostname = true",
            )
        )
    if tls.get("verify_https_client") is not True:
        findings.append(
            Finding(
                "warning",
                path,
                "hcl.verify_https_client",
                "verify_https_client is off: anyone who reaches the HTTP API needs no certificate",
                fix="set verify_https_client = true (the CLI then needs the cli certificate)",
            )
        )
    for key in ("ca_file", "cert_file", "key_file"):
        target = config.files.get(key)
        if target is None:
            findings.append(
                Finding(
                    "error",
                    path,
                    f"hcl.{key}",
                    f"{key} is not set",
                    fix=f"set {key} in the tls block",
                )
            )
        elif not files.is_regular(target):
            why = files.why_not_regular(target)
            findings.append(
                Finding(
                    "error",
                    path,
                    f"hcl.{key}",
                    f"{key} names {target}, which {why}",
                    nomad_error=f"open {target}: {why}",
                    fix=f"correct {key}, or put the file there (cfwrap quickstart makes a kit)",
                )
            )
    if config.role == "server" and config.encrypt is None:
        findings.append(
            Finding(
                "warning",
                path,
                "hcl.gossip",
                "a server without server { encrypt = ... }: gossip between servers is in clear "
                "text (unless its keyring file was seeded another way)",
                fix='cfwrap keygen, then put the key in server { encrypt = "..." } (the file '
                "then holds a secret: chmod 0600)",
            )
        )
    findings += _check_min_version(config)
    findings += _check_mode(config)
    if config.encrypt is not None:
        findings += _check_encrypt(path, config.encrypt)
    findings += _check_ciphers(config)
    return findings


def _check_encrypt(path: str, encrypt: str) -> list[Finding]:
    """A gossip key Nomad cannot use; the findings never quote it.

    An expression or a template is named as such: python-hcl2 gives both (``file("k")``,
    ``"${var.k}"``) as text with ``${...}`` in it, and Nomad reads its agent files with HCL 1
    (command/agent/config_parse.go, ``hcl.Decode``), which evaluates neither. A bare one does
    not parse; a quoted one is taken as its literal text, which is no base64 key.
    """
    if "${" in encrypt or "%{" in encrypt:  # never in base64
        message = (
            "encrypt is an expression or template (${...}), not the key: Nomad reads agent "
            "files as HCL 1, which evaluates neither"
        )
        fix = 'write the base64 key itself in quotes: encrypt = "..." (cfwrap keygen makes one)'
    else:
        try:
            gossip.check(encrypt)
            return []
        except ValueError as e:
            message = str(e)
        fix = "cfwrap keygen, then rotate with nomad operator gossip keyring install/use/remove"
    return [Finding("error", path, "hcl.encrypt", message, fix=fix)]


#: helper/tlsutil config.go supportedTLSVersions; "" means tls12.
_TLS_VERSIONS = ("tls10", "tls11", "tls12", "tls13")


def _check_min_version(config: AgentConfig) -> list[Finding]:
    """``tls_min_version`` below TLS 1.2 (Nomad's default), or one Nomad does not know."""
    assert config.tls is not None  # noqa: S101 (caller checked)
    version = config.tls.get("tls_min_version")
    if version is None or version in ("", "tls12", "tls13"):
        return []
    known = isinstance(version, str) and version in _TLS_VERSIONS
    return [
        Finding(
            "error",
            str(config.path),
            "hcl.tls_min_version",
            f"tls_min_version = {version!r} allows TLS 1.0 and 1.1, which are broken"
            if known
            else f"tls_min_version = {str(version)[:20]!r} is not a version Nomad knows",
            nomad_error="" if known else f'unsupported TLS version "{version}"',
            fix='set tls_min_version = "tls12" (the default), or remove it',
        )
    ]


def _check_mode(config: AgentConfig) -> list[Finding]:
    """An agent configuration that holds the gossip key is a secret file: 0600."""
    if config.encrypt is None:
        return []
    from cfwrap.doctor.certs import check_key_file

    return [
        Finding(f.severity, f.path, f"hcl.{f.check.removeprefix('key.')}", f.message, fix=f.fix)
        for f in check_key_file(config.path, what="the gossip key it holds")
    ]


def _check_ciphers(config: AgentConfig) -> list[Finding]:
    """``tls_cipher_suites`` must offer at least one suite for the certificate's key type."""
    assert config.tls is not None  # noqa: S101 (caller checked)
    suites = config.tls.get("tls_cipher_suites")
    cert_file = config.files.get("cert_file")
    if not isinstance(suites, str) or not suites.strip() or cert_file is None:
        return []
    if config.tls.get("tls_min_version") == "tls13":
        return []  # Go's TLS 1.3 suites are fixed and fit every key type
    try:
        algorithm = parsers.read_certificate(files.read_input(cert_file)).key.algorithm
    except (OSError, parsers.ParseError):
        return []
    marker = {"ecdsa": "_ECDSA_", "rsa": "_RSA_"}.get(algorithm)
    names = [s.strip() for s in suites.split(",") if s.strip()]
    if marker is None or any(marker in name for name in names):
        return []
    return [
        Finding(
            "error",
            str(config.path),
            "hcl.tls_cipher_suites",
            f"none of tls_cipher_suites fits the {algorithm} key of {cert_file.name}",
            nomad_error="tls: no cipher suite supported by both client and server",
            fix=f"add suites with {marker.strip('_')} in their name, e.g. "
            f"TLS_ECDHE_{marker.strip('_')}_WITH_AES_128_GCM_SHA256",
        )
    ]
