"""Nomad's rules: the names each role must carry, what its certificate must hold, its config.

The specs of what to issue (pydantic models) are in :mod:`cfwrap.specs`.

Sources (hashicorp/nomad): ``helper/tlsutil/config.go`` (outgoing TLS checks
``server.<region>.nomad``), ``nomad/rpc.go`` ``rpcNameAndRegionValidator`` (incoming RPC wants
``client.<region>.nomad`` or ``server.<any>.nomad``), ``validateRaftTLS`` (exact server name, no
wildcards), ``command/tls_cert_create.go`` (CN and SANs per role, ``localhost`` and ``127.0.0.1``).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from cfwrap.parsers import CertFacts
    from cfwrap.specs import CertSpec

Role = Literal["server", "client", "cli"]
ROLES: tuple[Role, ...] = ("server", "client", "cli")
DEFAULT_REGION = "global"

#: X.509's upper bound for a common name (RFC 5280 ub-common-name); the CN is the role name.
MAX_COMMON_NAME = 64
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MIXED_CASE_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Go compares host names without regard to case (crypto/x509 matchHostnames), so a name that
# differs from a role name only in case still claims that role for every TLS check.
_ROLE_NAME = re.compile(r"(server|client|cli)\.([^.]+)\.nomad", re.IGNORECASE)


def check_label(text: str, *, what: str = "label", mixed_case: bool = False) -> str:
    """Check one DNS label (letters, digits, inner hyphens, at most 63 characters).

    ``mixed_case`` admits capitals, as a Nomad region may have them (``region = "EU"``).

    Raises:
        ValueError: with the reason, for pydantic or the CLI to report.
    """
    if not text:
        raise ValueError(f"empty {what}")
    if "*" in text:
        raise ValueError(
            f"wildcard in {what} {text!r}: Nomad's Raft check accepts exact names only"
        )
    if "/" in text or "\\" in text or ".." in text:
        raise ValueError(f"{what} {text!r} contains a path separator or '..'")
    if len(text) > 63:
        raise ValueError(f"{what} {text[:20]!r}... is {len(text)} characters; DNS allows 63")
    if not text.isascii():
        raise ValueError(f"{what} {text!r} is not ASCII; give international names in punycode")
    if not (_MIXED_CASE_LABEL if mixed_case else _LABEL).fullmatch(text):
        letters = "a-z, A-Z" if mixed_case else "lowercase a-z"
        raise ValueError(f"{what} {text!r} is not a DNS label ({letters}, 0-9 and inner '-' only)")
    return text


def check_region(text: str) -> str:
    """Check a Nomad region name: one DNS label, since it becomes part of ``server.<region>.nomad``.

    Capitals are kept as given: Nomad's Raft check compares ``server.<region>.nomad`` exactly,
    case and all (``nomad/rpc.go`` validateRaftTLS), while Go's TLS name check ignores case; a
    certificate that spells the region as the agent does passes both.

    Raises:
        ValueError: with the reason.
    """
    if "." in text and ".." not in text:
        raise ValueError(f"region {text!r} contains '.'; it must be a single DNS label")
    check_label(text, what="region", mixed_case=True)
    if len(role_name("server", text)) > MAX_COMMON_NAME:
        raise ValueError(
            f"region {text[:20]!r}... is {len(text)} characters; server.<region>.nomad must fit "
            f"X.509's {MAX_COMMON_NAME}-character common name, so at most "
            f"{MAX_COMMON_NAME - len(role_name('server', ''))}"
        )
    return text


def check_dns_name(text: str) -> str:
    """Check an extra DNS name for a certificate and return it in lowercase.

    Raises:
        ValueError: with the reason.
    """
    name = text.lower()
    if "*" in name:
        raise ValueError(f"wildcard DNS name {text!r}: Nomad's Raft check accepts exact names only")
    if name.endswith("."):
        raise ValueError(f"DNS name {text!r} ends with '.'; give it without the trailing dot")
    if len(name) > 253:
        raise ValueError(f"DNS name {text[:20]!r}... is longer than 253 characters")
    for label in name.split("."):
        check_label(label, what=f"label in DNS name {text!r}")
    if name.rsplit(".", 1)[-1].isdigit():
        # cfssl files anything that parses as an IP address under the IP SANs, and a host name
        # never ends in an all-digit label (RFC 3696 section 2).
        raise ValueError(f"{text!r} is an IP address or ends in a number; give addresses with --ip")
    return name


def role_name(role: Role, region: str) -> str:
    """Return the name Nomad checks for a role in a region, e.g. ``server.global.nomad``."""
    return f"{role}.{region}.nomad"


def parse_role_name(name: str) -> tuple[Role, str] | None:
    """Split ``<role>.<region>.nomad`` (any case, as Go matches it) into role and region.

    None for any other name.
    """
    match = _ROLE_NAME.fullmatch(name)
    if match is None:
        return None
    role: Role = match.group(1).lower()  # type: ignore[assignment] # the pattern admits only Role values
    return role, match.group(2)


def role_of(facts: CertFacts) -> tuple[Role, str] | None:
    """The role and region a certificate's names claim: its CN first, then its DNS SANs."""
    for name in (facts.common_name or "", *facts.dns_names):
        parsed = parse_role_name(name)
        if parsed is not None:
            return parsed
    return None


_FILE_STEM = re.compile(r"(?P<region>[A-Za-z0-9-]+)-(?P<role>server|client|cli)(?:-nomad)?")


def parse_file_stem(stem: str) -> tuple[Role, str] | None:
    """Role and region from a kit file's stem: ``global-server-nomad`` or ``global-server``."""
    match = _FILE_STEM.fullmatch(stem)
    if match is None:
        return None
    role: Role = match.group("role")  # type: ignore[assignment] # the pattern admits only Role values
    return role, match.group("region")


class HclSyntaxError(ValueError):
    """A text that is not valid HCL; the message gives the place, never the text found there.

    A configuration file may hold the gossip key, and a parser's message quotes the token it
    stumbled on, so that token is never repeated.
    """


def parse_hcl(text: str) -> dict[str, Any]:
    """Parse an agent configuration with a real HCL2 parser (python-hcl2, as Nomad's HCL reads it).

    Blocks come back as dicts (or lists of dicts), strings without their quotes.

    Raises:
        HclSyntaxError: the text is not HCL; the message says where.
    """
    import hcl2
    from hcl2 import SerializationOptions

    options = SerializationOptions(
        with_comments=False, strip_string_quotes=True, explicit_blocks=False
    )
    try:
        data: dict[str, Any] = hcl2.loads(text, serialization_options=options)
    except RecursionError:
        raise HclSyntaxError("nested too deeply") from None
    except Exception as e:  # lark raises many unrelated exception types for bad syntax
        line, column = getattr(e, "line", None), getattr(e, "column", None)
        where = f" at line {line}, column {column}" if isinstance(line, int) and line > 0 else ""
        raise HclSyntaxError(f"not valid HCL{where}") from None
    return data


def check_config_text(value: str, *, what: str) -> str:
    """Refuse control characters in a value written into an agent's HCL or environment file.

    A newline in a path would end the HCL string (or the env line) and start another setting.

    Raises:
        ValueError: with the reason.
    """
    from cfwrap.text import first_unsafe

    found = first_unsafe(value)
    if found:
        raise ValueError(
            f"{what} contains the control character '{found}', which cannot be written "
            "into an agent's configuration"
        )
    if "${" in value or "%{" in value:
        # HCL2 reads these as templates and HCL1 (Nomad's agent files) does not: no escape
        # means the same to both, so such a value is refused rather than guessed at.
        raise ValueError(f"{what} contains '${{' or '%{{', which HCL would read as a template")
    return value


def _hcl_string(value: str) -> str:
    """Quote a string for HCL: escape backslashes and quotes (templates are refused earlier)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def agent_hcl(
    role: Literal["server", "client"],
    *,
    region: str,
    ca_file: str,
    cert_file: str,
    key_file: str,
    gossip_key: str | None = None,
) -> str:
    """Render a Nomad agent configuration with the ``tls {}`` block (and gossip key for servers).

    The text is parsed back before it is returned, and must say exactly what it was given.

    Raises:
        ValueError: a value holds a control character, or the text does not read back as meant.
    """
    for what, value in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        check_config_text(value, what=what)
    lines = [
        f"# Nomad {role} agent TLS settings for region {region}, written by cfwrap.",
        f"region = {_hcl_string(region)}",
        "",
    ]
    if role == "server" and gossip_key is not None:
        lines += [
            "server {",
            "  # Seeds <data_dir>/server/serf.keyring on first start only; rotate with",
            "  # `nomad operator gossip keyring install/use/remove`.",
            f"  encrypt = {_hcl_string(gossip_key)}",
            "}",
            "",
        ]
    lines += [
        "tls {",
        "  http = true",
        "  rpc  = true",
        "",
        f"  ca_file   = {_hcl_string(ca_file)}",
        f"  cert_file = {_hcl_string(cert_file)}",
        f"  key_file  = {_hcl_string(key_file)}",
        "",
        "  verify_server_hostname = true",
        "  verify_https_client    = true",
        "}",
    ]
    text = "\n".join(lines) + "\n"
    _read_back(
        text,
        region=region,
        files={"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file},
        gossip_key=gossip_key if role == "server" else None,
    )
    return text


def _first_block(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, dict) else {}


#: One line of the HCL that :func:`agent_hcl` writes: blank, a comment, ``name {``, ``}``, or
#: ``name = true``, ``false`` or a string whose only escapes are a backslash before ``\`` or ``"``.
_OWN_HCL_LINE = re.compile(
    r" *(?:(?P<comment>#.*)"
    r"|(?P<close>\})"
    r"|(?P<block>[a-z][a-z_]*) +\{"
    r"|(?P<name>[a-z][a-z_]*) *= *"
    r'(?:(?P<bool>true|false)|"(?P<string>(?:[^"\\]|\\["\\])*)")'
    r")? *"
)
_OWN_HCL_ESCAPE = re.compile(r'\\(["\\])')


def read_own_hcl(text: str) -> dict[str, Any]:
    """Read back the HCL that :func:`agent_hcl` writes, shaped as :func:`parse_hcl` returns it.

    python-hcl2 builds its lark parser anew in every process (about 0.2 s, most of a quickstart's
    run), so cfwrap's own output is read by this reader of exactly the subset it writes (see
    ``_OWN_HCL_LINE``), one level of blocks deep. Anything else is refused: another escape, a
    template (``${``, ``%{``), a control character, a repeated attribute, a nested or unclosed
    block. So whatever it accepts, HCL reads the same way; tests hold it to python-hcl2 on
    generated texts. Files cfwrap did not write are read by :func:`parse_hcl`.

    Raises:
        HclSyntaxError: the text is not in that subset; the message gives the line, never text.
    """
    from cfwrap.text import first_unsafe

    data: dict[str, Any] = {}
    block: dict[str, Any] | None = None
    for number, line in enumerate(text.split("\n"), start=1):
        match = _OWN_HCL_LINE.fullmatch(line)
        refused = HclSyntaxError(f"not the HCL cfwrap writes, at line {number}")
        if match is None or first_unsafe(line):
            raise refused
        name, string = match["name"], match["string"]
        if match["close"]:
            if block is None:
                raise refused
            block = None
        elif match["block"]:
            if block is not None or not isinstance(data.get(match["block"], []), list):
                raise refused
            block = {}
            data.setdefault(match["block"], []).append(block)
        elif name:
            into = data if block is None else block
            if name in into or (string is not None and ("${" in string or "%{" in string)):
                raise refused
            if string is not None:
                into[name] = _OWN_HCL_ESCAPE.sub(r"\1", string)
            else:
                into[name] = match["bool"] == "true"
    if block is not None:
        raise HclSyntaxError("not the HCL cfwrap writes: a block is not closed")
    return data


def _read_back(text: str, *, region: str, files: dict[str, str], gossip_key: str | None) -> None:
    """Read rendered HCL back and refuse it unless it says what it was rendered from."""
    data = read_own_hcl(text)
    tls = _first_block(data, "tls")
    said = {
        "region": data.get("region"),
        **{name: tls.get(name) for name in files},
        "encrypt": _first_block(data, "server").get("encrypt"),
    }
    meant = {"region": region, **files, "encrypt": gossip_key}
    wrong = sorted(k for k in meant if said[k] != meant[k])
    if wrong or tls.get("verify_server_hostname") is not True:
        raise ValueError(f"the agent configuration does not read back as written: {wrong}")


def _env_value(value: str) -> str:
    """Single-quote a value so both ``sh`` and systemd's EnvironmentFile read it back unchanged."""
    return "'" + value.replace("'", "'\\''") + "'"


def cli_env(*, address: str, ca_file: str, cert_file: str, key_file: str) -> str:
    """Render the environment for the ``nomad`` CLI: ``set -a; . ./global-cli.env; set +a``."""
    pairs = {
        "NOMAD_ADDR": address,
        "NOMAD_CACERT": ca_file,
        "NOMAD_CLIENT_CERT": cert_file,
        "NOMAD_CLIENT_KEY": key_file,
    }
    for name, value in pairs.items():
        check_config_text(value, what=name)
    return "".join(f"{k}={_env_value(v)}\n" for k, v in pairs.items())


@functools.lru_cache(maxsize=1024)  # every node's hosts hold localhost and 127.0.0.1
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_EKU_FOR_USAGE = {"server auth": "serverAuth", "client auth": "clientAuth"}


def certificate_problems(spec: CertSpec, facts: CertFacts) -> list[str]:
    """Compare an issued certificate with the spec it was made from; one line per mismatch.

    Catches what cfssl does silently: a profile that fell back to the default, hosts that were
    replaced, usages that were dropped.
    """
    problems = []
    if facts.common_name != spec.common_name:
        problems.append(f"CN is {facts.common_name!r}, not {spec.common_name!r}")
    hosts = spec.hosts()
    wanted_ips = {h for h in hosts if _is_ip(h)}
    wanted_dns = set(hosts) - wanted_ips
    if set(facts.dns_names) != wanted_dns:
        problems.append(f"DNS names are {sorted(facts.dns_names)}, not {sorted(wanted_dns)}")
    if set(facts.ip_addresses) != wanted_ips:
        problems.append(f"IP addresses are {sorted(facts.ip_addresses)}, not {sorted(wanted_ips)}")
    eku_wanted = {_EKU_FOR_USAGE[u] for u in spec.profile().usages if u in _EKU_FOR_USAGE}
    if set(facts.extended_key_usage) != eku_wanted:
        problems.append(
            f"extended key usage is {sorted(facts.extended_key_usage)}, not {sorted(eku_wanted)}"
        )
    if facts.key.algorithm == "ecdsa" and "key_encipherment" in facts.key_usage:
        problems.append("an EC key with keyEncipherment (RFC 5480 forbids it)")
    if facts.is_ca:
        problems.append("it is a CA certificate")
    if (facts.key.algorithm, facts.key.size) != (spec.key.algo, spec.key.size):
        problems.append(
            f"key is {facts.key.algorithm} {facts.key.size}, not {spec.key.algo} {spec.key.size}"
        )
    return problems
