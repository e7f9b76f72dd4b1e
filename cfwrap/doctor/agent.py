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

#: The tls block's booleans (nomad/structs/config/tls.go).
_BOOLEANS = ("http", "rpc", "verify_server_hostname", "verify_https_client", "rpc_upgrade_mode")


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
    """Every ``name`` block of ``data``, merged as Nomad's HCL 1 decoder merges them.

    Nomad decodes its agent files with HCL 1 (its fork of hashicorp/hcl): a key matches
    whatever its case (``ObjectList.Filter`` compares with ``strings.EqualFold``), and every
    block of a name is decoded in turn into the same struct, so a later value wins. python-hcl2
    keeps them apart: a list of blocks, keys as written. Keys come back in lower case.
    """
    blocks = [
        block
        for key, value in data.items()
        if key.lower() == name
        for block in (value if isinstance(value, list) else [value])
        if isinstance(block, dict)
    ]
    if not blocks:
        return None
    return {key.lower(): value for block in blocks for key, value in block.items()}


def _attribute(data: dict[str, Any], name: str) -> object:
    """The value Nomad's HCL 1 decoder takes for attribute ``name``: the last, any case."""
    values = [value for key, value in data.items() if key.lower() == name]
    return values[-1] if values else None


def hcl1_bool(value: object) -> bool | None:
    """A boolean as HCL 1 decodes one (``decodeBool``); None when it is none (Nomad refuses it).

    A bool, or a string or number token whose text is ``1``, ``true``, ``0`` or ``false`` in
    any case: ``http = "true"`` and ``rpc = 1`` turn TLS on.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | str):
        return {"1": True, "true": True, "0": False, "false": False}.get(str(value).lower())
    return None


def _hcl1_string(value: object) -> str | None:
    """A string as HCL 1 decodes one: a number or a boolean becomes its text."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, int | float | str) else None


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
    client = _block(data, "client")
    stem = path.stem
    role: Role | None = None
    # Nomad runs a server when server { enabled = true }, a client likewise; a block without
    # it, or a file that says neither, is judged by its name.
    if server is not None and hcl1_bool(server.get("enabled")) is True:
        role = "server"
    elif client is not None and hcl1_bool(client.get("enabled")) is True:
        role = "client"
    elif "server" in stem or (server is not None and "client" not in stem):
        role = "server"
    elif "client" in stem or client is not None:
        role = "client"
    tls = _block(data, "tls")
    named = {}
    relative = []
    for key in ("ca_file", "cert_file", "key_file"):
        value = tls.get(key) if tls else None
        if isinstance(value, str) and value:
            named[key] = Path(value) if Path(value).is_absolute() else path.parent / value
            if not Path(value).is_absolute():
                relative.append(key)
    encrypt = _hcl1_string(server.get("encrypt")) if server else None
    region = _attribute(data, "region")
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
    if relative:
        findings.append(
            Finding(
                "warning",
                str(path),
                "hcl.relative-path",
                f"{', '.join(relative)} {'is' if len(relative) == 1 else 'are'} relative: Nomad "
                "opens them from the agent's working folder (/ under systemd), not from this "
                f"file's; checked here as if from {path.parent}",
                fix="give absolute paths in the tls block",
            )
        )
    config = AgentConfig(path=path, role=role, region=region, tls=tls, encrypt=encrypt, files=named)
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
    findings = _check_flags(config)
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


def _check_flags(config: AgentConfig) -> list[Finding]:
    """The tls block's switches, read as HCL 1 reads booleans."""
    assert config.tls is not None  # noqa: S101 (caller checked)
    path = str(config.path)
    findings = []
    tls = config.tls
    for flag in _BOOLEANS:
        if flag in tls and hcl1_bool(tls[flag]) is None:
            findings.append(
                Finding(
                    "error",
                    path,
                    f"hcl.{flag}",
                    f"{flag} = {str(tls[flag])[:20]!r} is no boolean",
                    nomad_error="Error loading configuration: decodeBool: Unknown value for "
                    "boolean",
                    fix=f"set {flag} = true or false",
                )
            )
    flags: tuple[tuple[str, Severity], ...] = (("rpc", "error"), ("http", "warning"))
    for flag, severity in flags:
        if hcl1_bool(tls.get(flag)) is not True:
            findings.append(
                Finding(
                    severity,
                    path,
                    f"hcl.{flag}",
                    f"tls {{ {flag} = true }} is not set",
                    fix=f"set {flag} = true in the tls block",
                )
            )
    if hcl1_bool(tls.get("verify_server_hostname")) is not True:
        findings.append(
            Finding(
                "error",
                path,
                "hcl.verify_server_hostname",
                "verify_server_hostname is off: any certificate from the CA can pose as a server",
                fix="set verify_server_hostname = true",
            )
        )
    if hcl1_bool(tls.get("rpc_upgrade_mode")) is True:
        findings.append(
            Finding(
                "error",
                path,
                "hcl.rpc_upgrade_mode",
                "rpc_upgrade_mode is on: servers accept plaintext RPC, and Raft's name check is "
                "skipped (it is meant only for the move of a cluster to TLS)",
                fix="remove rpc_upgrade_mode once every agent has TLS, then SIGHUP the agents",
            )
        )
    if hcl1_bool(tls.get("verify_https_client")) is not True:
        findings.append(
            Finding(
                "warning",
                path,
                "hcl.verify_https_client",
                "verify_https_client is off: anyone who reaches the HTTP API needs no certificate",
                fix="set verify_https_client = true (the CLI then needs the cli certificate)",
            )
        )
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
            if encrypt != encrypt.strip():  # gossip.check forgives them, as a key file's newline
                raise ValueError(
                    "the gossip key has blanks around it inside its quotes, which Nomad decodes "
                    "as base64 with the rest"
                )
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


#: helper/tlsutil/config.go supportedCipherSignatures: the suites Nomad takes, and the key
#: type each needs.
_CIPHERS = {
    f"TLS_ECDHE_{kind}_WITH_{cipher}": kind.lower()
    for kind in ("RSA", "ECDSA")
    for cipher in (
        "CHACHA20_POLY1305",
        "AES_128_GCM_SHA256",
        "AES_256_GCM_SHA384",
        "AES_128_CBC_SHA",
        "AES_256_CBC_SHA",
    )
} | {
    f"TLS_RSA_WITH_{cipher}": "rsa"
    for cipher in ("AES_128_GCM_SHA256", "AES_256_GCM_SHA384", "AES_128_CBC_SHA", "AES_256_CBC_SHA")
}


def _check_ciphers(config: AgentConfig) -> list[Finding]:
    """``tls_cipher_suites`` as Nomad's ``ParseCiphers`` reads it, whatever tls_min_version says.

    The text is cut at every comma and each piece looked up as it is (a space is part of the
    name); one unknown name, or no suite for the certificate's key type, stops the agent.
    """
    assert config.tls is not None  # noqa: S101 (caller checked)
    suites = config.tls.get("tls_cipher_suites")
    if suites is None or (isinstance(suites, str) and not suites.strip()):
        return []  # Nomad's defaults
    if not isinstance(suites, str):
        return [_cipher_finding(config, "it is no string", "Error loading configuration")]
    names = suites.split(",")
    unknown = [n for n in names if n not in _CIPHERS]
    if unknown:
        return [
            _cipher_finding(
                config,
                f"{unknown[0][:60]!r} is not a suite Nomad takes",
                f'unsupported TLS cipher "{unknown[0][:60]}"',
            )
        ]
    return _check_cipher_key(config, names)


def _cipher_finding(config: AgentConfig, what: str, nomad_error: str) -> Finding:
    return Finding(
        "error",
        str(config.path),
        "hcl.tls_cipher_suites",
        f"tls_cipher_suites: {what} (Nomad cuts one string at each comma and takes every name "
        "exactly as written)",
        nomad_error=nomad_error,
        fix="list suites Nomad knows, separated by commas alone, e.g. "
        + ",".join(n for n in _CIPHERS if "ECDSA_WITH_AES" in n and "GCM" in n),
    )


def _check_cipher_key(config: AgentConfig, names: list[str]) -> list[Finding]:
    """At least one of ``names`` must fit the certificate's key type (Nomad checks it always)."""
    cert_file = config.files.get("cert_file")
    if cert_file is None:
        return []
    try:
        algorithm = parsers.read_certificate(files.read_input(cert_file)).key.algorithm
    except (OSError, parsers.ParseError):
        return []
    if algorithm not in ("rsa", "ecdsa") or any(_CIPHERS[n] == algorithm for n in names):
        return []
    kind = algorithm.upper()
    return [
        Finding(
            "error",
            str(config.path),
            "hcl.tls_cipher_suites",
            f"none of tls_cipher_suites fits the {algorithm} key of {cert_file.name}",
            nomad_error="Specified cipher suites don't support the certificate signature "
            f"algorithm {kind}",
            fix=f"add suites with {kind} in their name, e.g. "
            f"TLS_ECDHE_{kind}_WITH_AES_128_GCM_SHA256",
        )
    ]
