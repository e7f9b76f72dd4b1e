"""Path validation as Go's ``crypto/x509`` does it, and the checks Nomad adds on top.

Nomad agents and the CLI are Go programs, so a certificate is good exactly when Go accepts it.
This module follows Go's ``Certificate.Verify`` (``crypto/x509/verify.go``): the leaf's dates and
critical extensions, the host name (SANs only, case-insensitive, a wildcard for the leftmost
label), chains built from the CA file and the certificates after the leaf in its file (in any
order), each parent checked by ``CheckSignatureFrom`` (CA:TRUE, keyCertSign when a key usage is
given, no MD5 or SHA-1 signatures) and ``isValid`` (dates, name constraints, path length,
critical extensions), then extended key usage down the whole chain.

cryptography's ``x509.verification`` is stricter than Go in places (it requires an authority key
identifier matching the issuer's, refuses a CA without a key usage extension): where the two
differ, Go's behaviour wins, which is why this is written out here. On top come Nomad's own
checks (``nomad/server.go`` rpcNameAndRegionValidator, ``nomad/rpc.go`` validateRaftTLS,
``helper/tlsutil`` ParseCiphers), per role, as :func:`role_checks`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from cfwrap import parsers

if TYPE_CHECKING:
    from cryptography import x509

Usage = Literal["serverAuth", "clientAuth"]
Must = Literal["succeed", "fail", "note"]

_GO_TIME = "%Y-%m-%dT%H:%M:%SZ"
#: Go's maxChainSignatureChecks: a bound on path building.
_MAX_SIGNATURE_CHECKS = 100


class VerifyError(ValueError):
    """Go would refuse the certificate; ``rule`` names the check, ``go_error`` is Go's message."""

    def __init__(self, rule: str, message: str, go_error: str) -> None:
        """Keep the rule, a message for people, and the error Go prints."""
        super().__init__(message)
        self.rule = rule
        self.message = message
        self.go_error = go_error


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every PEM certificate in ``data``, in order (a leaf followed by its intermediates).

    Raises:
        ValueError: no certificate, or a damaged one.
    """
    from cryptography import x509

    return x509.load_pem_x509_certificates(data)


def go_ca_pool(data: bytes) -> list[x509.Certificate]:
    """The roots Go's ``CertPool.AppendCertsFromPEM`` takes from a CA file (Nomad's ``ca_file``).

    Each ``CERTIFICATE`` block without headers that Go can parse; any other block, or one it
    cannot parse, is skipped. None at all is Nomad's "Failed to parse any valid certificates".
    """
    pool, seen = [], set()
    for block in parsers.go_pem_blocks(data):
        if block.type != b"CERTIFICATE" or block.has_headers or block.der in seen:
            continue  # (a copy of one already taken: AddCert keeps one)
        seen.add(block.der)
        try:
            cert = parsers.load_der_certificate(block.der)
        except parsers.ParseError:
            continue
        if _unparsed_curve(cert) is None:  # Go's ParseCertificate fails on other curves
            pool.append(cert)
    return pool


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


# --- extensions, as Go's parser reads them --------------------------------------------------

#: Extensions Go's parser understands; any other critical extension is "unhandled".
_HANDLED = {
    "2.5.29.14",  # subject key identifier
    "2.5.29.15",  # key usage
    "2.5.29.17",  # subject alternative name
    "2.5.29.19",  # basic constraints
    "2.5.29.30",  # name constraints
    "2.5.29.31",  # CRL distribution points
    "2.5.29.32",  # certificate policies
    "2.5.29.35",  # authority key identifier
    "2.5.29.37",  # extended key usage
    "1.3.6.1.5.5.7.1.1",  # authority information access
}


def unhandled_critical(cert: x509.Certificate) -> list[str]:
    """Critical extensions Go does not understand: Go then refuses the certificate."""
    return [
        e.oid.dotted_string
        for e in cert.extensions
        if e.critical and e.oid.dotted_string not in _HANDLED
    ]


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def dns_names(cert: x509.Certificate) -> list[str]:
    """The DNS SANs."""
    from cryptography import x509

    san = _ext(cert, x509.SubjectAlternativeName)
    return (
        list(san.get_values_for_type(x509.DNSName))
        if isinstance(san, x509.SubjectAlternativeName)
        else []
    )


def ip_addresses(cert: x509.Certificate) -> list[str]:
    """The IP SANs, as text."""
    from cryptography import x509

    san = _ext(cert, x509.SubjectAlternativeName)
    if not isinstance(san, x509.SubjectAlternativeName):
        return []
    return [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def common_name(cert: x509.Certificate) -> str:
    """The subject's first CN, or empty (Go's ``Subject.CommonName``)."""
    from cryptography.x509.oid import NameOID

    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def _basic(cert: x509.Certificate) -> tuple[bool, bool, int]:
    """(extension present, CA, max path length or -1), as Go's fields say."""
    from cryptography import x509

    basic = _ext(cert, x509.BasicConstraints)
    if not isinstance(basic, x509.BasicConstraints):
        return False, False, -1
    return True, basic.ca, -1 if basic.path_length is None else basic.path_length


def _key_cert_sign(cert: x509.Certificate) -> bool | None:
    """None without a key usage extension (Go then does not check it)."""
    from cryptography import x509

    usage = _ext(cert, x509.KeyUsage)
    return usage.key_cert_sign if isinstance(usage, x509.KeyUsage) else None


def _ekus(cert: x509.Certificate) -> list[str] | None:
    """Dotted EKU OIDs, or None without the extension (any usage)."""
    from cryptography import x509

    eku = _ext(cert, x509.ExtendedKeyUsage)
    return [oid.dotted_string for oid in eku] if isinstance(eku, x509.ExtendedKeyUsage) else None


_EKU_OID = {"serverAuth": "1.3.6.1.5.5.7.3.1", "clientAuth": "1.3.6.1.5.5.7.3.2"}
_ANY_EKU = "2.5.29.37.0"


# --- Go's pieces, one function each -------------------------------------------------------


def check_dates(cert: x509.Certificate, now: datetime) -> None:
    """Go's validity window check.

    Raises:
        VerifyError: expired or not yet valid.
    """
    if now < cert.not_valid_before_utc:
        raise VerifyError(
            "dates",
            f"{_name(cert)} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            "x509: certificate has expired or is not yet valid: current time "
            f"{now:{_GO_TIME}} is before {cert.not_valid_before_utc:{_GO_TIME}}",
        )
    if now > cert.not_valid_after_utc:
        raise VerifyError(
            "dates",
            f"{_name(cert)} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            "x509: certificate has expired or is not yet valid: current time "
            f"{now:{_GO_TIME}} is after {cert.not_valid_after_utc:{_GO_TIME}}",
        )


def _check_critical(cert: x509.Certificate) -> None:
    unhandled = unhandled_critical(cert)
    if unhandled:
        raise VerifyError(
            "critical-extension",
            f"{_name(cert)} has critical extension(s) Go does not understand: "
            + ", ".join(unhandled),
            "x509: unhandled critical extension",
        )


def _lower(text: str) -> str:
    return "".join(c.lower() if "A" <= c <= "Z" else c for c in text)


def _match_domain(domain: str, constraint: str) -> bool:
    """Go's matchDomainConstraint: ``constraint`` and its subdomains (only subdomains if ``.x``)."""
    if not constraint:
        return True
    must_have_sub = constraint.startswith(".")
    labels = list(reversed(domain.split(".")))
    wanted = list(reversed(constraint.removeprefix(".").split(".")))
    if len(labels) < len(wanted) or (must_have_sub and len(labels) == len(wanted)):
        return False
    return all(_lower(w) == _lower(d) for w, d in zip(wanted, labels, strict=False))


def _check_name_constraints(ca: x509.Certificate, below: Sequence[x509.Certificate]) -> None:
    """Go checks the SANs of every certificate below a constrained CA."""
    from cryptography import x509

    constraints = _ext(ca, x509.NameConstraints)
    if not isinstance(constraints, x509.NameConstraints):
        return
    permitted = list(constraints.permitted_subtrees or [])
    excluded = list(constraints.excluded_subtrees or [])
    for cert in below:
        names: list[tuple[str, str]] = [("dns", n) for n in dns_names(cert)]
        names += [("ip", n) for n in ip_addresses(cert)]
        for kind, name in names:
            _check_one_name(ca, kind, name, permitted, excluded)


def _subtree_matches(kind: str, name: str, tree: x509.GeneralName) -> bool | None:
    """Whether ``tree`` covers ``name``; None when it constrains another kind of name."""
    from cryptography import x509

    if kind == "dns" and isinstance(tree, x509.DNSName):
        return _match_domain(name, tree.value)
    if kind == "ip" and isinstance(tree, x509.IPAddress):
        network = tree.value
        return isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network) and (
            ipaddress.ip_address(name) in network
        )
    return None


def _check_one_name(
    ca: x509.Certificate,
    kind: str,
    name: str,
    permitted: list[x509.GeneralName],
    excluded: list[x509.GeneralName],
) -> None:
    for tree in excluded:
        if _subtree_matches(kind, name, tree):
            raise VerifyError(
                "name-constraints",
                f"the CA {_name(ca)} excludes {name} by its name constraints",
                f'x509: a root or intermediate certificate forbids "{name}" by constraint',
            )
    relevant = [m for m in (_subtree_matches(kind, name, t) for t in permitted) if m is not None]
    if relevant and not any(relevant):
        raise VerifyError(
            "name-constraints",
            f"the CA {_name(ca)} does not permit {name} by its name constraints",
            "x509: a root or intermediate certificate is not authorized to sign for this "
            f'name: "{name}"',
        )


_INSECURE = {
    "1.2.840.113549.1.1.4": "MD5-RSA",
    "1.2.840.113549.1.1.2": "MD2-RSA",
    "1.2.840.113549.1.1.5": "SHA1-RSA",
    "1.2.840.10045.4.1": "ECDSA-SHA1",
    "1.2.840.10040.4.3": "DSA-SHA1",
}


#: The signature algorithms Go's crypto/x509 verifies (signatureAlgorithmDetails, less MD2,
#: MD5 and SHA-1, refused above as insecure, and DSA, whose keys it no longer checks).
_GO_SIGNATURES = frozenset({
    "1.2.840.113549.1.1.11", "1.2.840.113549.1.1.12", "1.2.840.113549.1.1.13",  # RSA SHA-2
    "1.2.840.113549.1.1.10",  # RSASSA-PSS
    "1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3", "1.2.840.10045.4.3.4",  # ECDSA SHA-2
    "1.3.101.112",  # Ed25519
})  # fmt: skip


_PSS = "1.2.840.113549.1.1.10"


def _go_takes_pss(cert: x509.Certificate) -> bool:
    """Go's ``getSignatureAlgorithmFromAI`` for RSASSA-PSS.

    SHA-2, MGF1 of the same hash, and a salt as long as the hash (cryptography keeps the last
    two in private attributes).
    """
    from cryptography.hazmat.primitives.asymmetric import padding

    params = cert.signature_algorithm_parameters
    digest = cert.signature_hash_algorithm
    if not isinstance(params, padding.PSS) or digest is None:
        return False
    if digest.name not in ("sha256", "sha384", "sha512"):
        return False
    mgf_hash = getattr(params.mgf, "_algorithm", None)
    salt = getattr(params, "_salt_length", None)
    return getattr(mgf_hash, "name", None) == digest.name and salt == digest.digest_size


def _unparsed_curve(cert: x509.Certificate) -> str | None:
    """The curve of an ECDSA key that Go's crypto/x509 cannot parse; None for any other key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in _GO_CURVES:
        return key.curve.name
    return None


def check_signature_from(cert: x509.Certificate, parent: x509.Certificate) -> None:
    """Go's ``CheckSignatureFrom``: the parent may sign, by a secure algorithm, and did.

    Raises:
        VerifyError: the first reason it may not, or the signature does not verify.
    """
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

    present, is_ca, _ = _basic(parent)
    if (parent.version.value == 2 and not present) or (present and not is_ca):
        raise VerifyError(
            "not-a-ca",
            f"{_name(parent)} is not a CA (no CA:TRUE basic constraint)",
            "x509: invalid signature: parent certificate cannot sign this kind of certificate",
        )
    if _key_cert_sign(parent) is False:
        raise VerifyError(
            "not-a-ca",
            f"{_name(parent)} has a key usage without keyCertSign",
            "x509: invalid signature: parent certificate cannot sign this kind of certificate",
        )
    oid = cert.signature_algorithm_oid.dotted_string
    algorithm = _INSECURE.get(oid)
    if algorithm is not None:
        raise VerifyError(
            "insecure-signature",
            f"{_name(cert)} is signed with {algorithm}, which Go refuses",
            f"x509: cannot verify signature: insecure algorithm {algorithm}",
        )
    if oid not in _GO_SIGNATURES:
        name = cert.signature_algorithm_oid._name
        raise VerifyError(
            "unsupported-signature",
            f"{_name(cert)} is signed with {name if name != 'Unknown OID' else oid}, which Go "
            "does not implement",
            "x509: cannot verify signature: algorithm unimplemented",
        )
    if oid == _PSS and not _go_takes_pss(cert):
        raise VerifyError(
            "unsupported-signature",
            f"{_name(cert)} is signed with RSASSA-PSS parameters Go does not take (it wants a "
            "salt as long as the hash, and MGF1 of the same hash)",
            "x509: cannot verify signature: algorithm unimplemented",
        )
    curve = _unparsed_curve(parent)
    if curve is not None:
        raise VerifyError(
            "unsupported-curve",
            f"{_name(parent)} has a key on {curve}, a curve Go's crypto/x509 cannot parse",
            "x509: unsupported elliptic curve",
        )
    try:
        cert.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
        raise VerifyError(
            "signature",
            f"{_name(cert)} is not signed by the key of {_name(parent)}",
            f"x509: signature check failed ({type(e).__name__})",
        ) from None


def _is_valid(
    cert: x509.Certificate, *, intermediate: bool, chain: Sequence[x509.Certificate], now: datetime
) -> None:
    """Go's ``isValid`` for a root or intermediate above ``chain``."""
    _check_critical(cert)
    check_dates(cert, now)
    _check_name_constraints(cert, chain)
    present, is_ca, max_path = _basic(cert)
    if intermediate and not (present and is_ca):
        raise VerifyError(
            "not-a-ca",
            f"{_name(cert)} is used as an intermediate but is not a CA",
            "x509: certificate is not authorized to sign other certificates",
        )
    if present and max_path >= 0 and len(chain) - 1 > max_path:
        raise VerifyError(
            "path-length",
            f"{_name(cert)} allows {max_path} intermediate(s) below it; the chain has "
            f"{len(chain) - 1}",
            "x509: too many intermediates for path length constraint",
        )


def _key_ids(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """Its subject key identifier and authority key identifier (empty when absent)."""
    from cryptography import x509

    ski = _ext(cert, x509.SubjectKeyIdentifier)
    aki = _ext(cert, x509.AuthorityKeyIdentifier)
    return (
        ski.digest if isinstance(ski, x509.SubjectKeyIdentifier) else b"",
        (aki.key_identifier or b"") if isinstance(aki, x509.AuthorityKeyIdentifier) else b"",
    )


def _potential_parents(
    cert: x509.Certificate, pool: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """Go's ``findPotentialParents``: same subject as the issuer, the likeliest first.

    Those whose subject key identifier is the certificate's authority key identifier, then
    those where one of the two is missing, then the rest: a bundle of many CAs of one name
    (a rotation's, or a crafted one) is searched in the order Go searches it, within the same
    bound of signature checks.
    """
    issuer = cert.issuer.public_bytes()
    aki = _key_ids(cert)[1]
    ranked: tuple[list[x509.Certificate], ...] = ([], [], [])
    for candidate in pool:
        if candidate.subject.public_bytes() != issuer:
            continue
        ski = _key_ids(candidate)[0]
        ranked[0 if ski == aki else 1 if bool(ski) != bool(aki) else 2].append(candidate)
    return [*ranked[0], *ranked[1], *ranked[2]]


@dataclass
class _Search:
    roots: Sequence[x509.Certificate]
    intermediates: Sequence[x509.Certificate]
    now: datetime
    checks: int = 0
    hint: VerifyError | None = None
    error: VerifyError | None = None


def _build(chain: list[x509.Certificate], search: _Search) -> list[list[x509.Certificate]]:
    """Go's ``buildChains``: every chain from ``chain[-1]`` up to a root."""
    cert = chain[-1]
    found: list[list[x509.Certificate]] = []
    candidates = [(True, r) for r in _potential_parents(cert, search.roots)]
    candidates += [(False, i) for i in _potential_parents(cert, search.intermediates)]
    for is_root, candidate in candidates:
        if any(candidate == c for c in chain):
            continue
        search.checks += 1
        if search.checks > _MAX_SIGNATURE_CHECKS:
            break
        try:
            check_signature_from(cert, candidate)
        except VerifyError as e:
            search.hint = search.hint or e
            continue
        try:
            _is_valid(candidate, intermediate=not is_root, chain=chain, now=search.now)
        except VerifyError as e:
            search.error = e
            continue
        if is_root:
            found.append([*chain, candidate])
        else:
            found += _build([*chain, candidate], search)
    return found


def build_chains(
    leaf: x509.Certificate,
    *,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime,
) -> list[list[x509.Certificate]]:
    """Every chain from ``leaf`` to one of ``roots``, as Go builds them (leaf checks excluded).

    Raises:
        VerifyError: no chain; the rule says why (a CA that may not sign, a constraint, dates).
    """
    if any(leaf == r for r in roots):
        return [[leaf]]
    search = _Search(roots, intermediates, now)
    chains = _build([leaf], search)
    if chains:
        return chains
    if search.error is not None:
        raise search.error
    detail = f" ({search.hint.message})" if search.hint else ""
    raise VerifyError(
        search.hint.rule
        if search.hint
        and search.hint.rule in ("insecure-signature", "unsupported-signature", "unsupported-curve")
        else "unknown-authority",
        f"no chain to the CA{detail}",
        "x509: certificate signed by unknown authority",
    )


def chain_allows(chain: Sequence[x509.Certificate], usage: Usage) -> bool:
    """Go's ``checkChainForKeyUsage`` for one usage: every certificate with EKUs must allow it."""
    for cert in reversed(chain):
        ekus = _ekus(cert)
        if not ekus or _ANY_EKU in ekus:
            continue
        if _EKU_OID[usage] not in ekus:
            return False
    return True


def matches_host(cert: x509.Certificate, host: str) -> bool:
    """Go's ``VerifyHostname``: IP SANs for an address, else DNS SANs (never the CN)."""
    try:
        address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        address = None
    if address is not None:
        return any(ipaddress.ip_address(ip) == address for ip in ip_addresses(cert))
    wanted = _lower(host.removesuffix(".")).split(".")
    for pattern in dns_names(cert):
        parts = _lower(pattern.removesuffix(".")).split(".")
        if len(parts) != len(wanted):
            continue
        if all(
            p == w or (i == 0 and p == "*")
            for i, (p, w) in enumerate(zip(parts, wanted, strict=True))
        ):
            return True
    return False


def host_error(cert: x509.Certificate, host: str) -> str:
    """The message Go's ``VerifyHostname`` gives when ``host`` is not in the certificate."""
    names, ips = dns_names(cert), ip_addresses(cert)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not names and not ips:
            return "x509: certificate relies on legacy Common Name field, use SANs instead"
        valid = names or ips
    else:
        if not ips:
            return (
                f"x509: cannot validate certificate for {host} because it doesn't contain any "
                "IP SANs"
            )
        valid = ips
    return f"x509: certificate is valid for {', '.join(valid)}, not {host}"


def verify(
    leaf: x509.Certificate,
    *,
    intermediates: Sequence[x509.Certificate] = (),
    roots: Sequence[x509.Certificate],
    now: datetime,
    usage: Usage,
    host: str | None = None,
) -> list[x509.Certificate]:
    """Go's ``Certificate.Verify``, in Go's order; the first chain that passes.

    Raises:
        VerifyError: the first rule that fails.
    """
    _check_critical(leaf)
    check_dates(leaf, now)
    if host is not None and not matches_host(leaf, host):
        raise VerifyError("hostname", f"not valid for {host}", host_error(leaf, host))
    chains = build_chains(leaf, intermediates=intermediates, roots=roots, now=now)
    for chain in chains:
        if chain_allows(chain, usage):
            return chain
    raise VerifyError(
        "extended-key-usage",
        f"the chain does not allow {usage} (extended key usage is checked down to the CA)",
        "x509: certificate specifies an incompatible key usage",
    )


# --- Nomad's checks on top -----------------------------------------------------------------


def rpc_peer_ok(cert: x509.Certificate, region: str) -> bool:
    """Nomad's rpcNameAndRegionValidator: ``client.<region>.nomad`` or ``server.<any>.nomad``."""

    def one(name: str) -> bool:
        parts = name.split(".")
        if len(parts) < 3 or parts[-1] != "nomad":
            return False
        if parts[0] == "client":
            return name == f"client.{region}.nomad"
        return parts[0] == "server"

    return any(one(n) for n in dns_names(cert)) or one(common_name(cert))


def raft_ok(cert: x509.Certificate, region: str) -> bool:
    """Nomad's validateRaftTLS: exactly ``server.<region>.nomad`` as the CN or a DNS SAN."""
    return f"server.{region}.nomad" in (common_name(cert), *dns_names(cert))


#: The curves Go's crypto/x509 parses, and those TLS 1.2/1.3 signature schemes sign with.
_GO_CURVES = {"secp224r1": "P-224", "secp256r1": "P-256", "secp384r1": "P-384",
              "secp521r1": "P-521"}  # fmt: skip
_TLS_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def key_problem(cert: x509.Certificate, *, agent: bool) -> str | None:
    """Why Nomad cannot use this certificate's key type, if it cannot.

    Agents accept RSA and ECDSA only (helper/tlsutil ParseCiphers); Go >= 1.24 refuses RSA
    keys under 1024 bits everywhere; ECDSA on a curve crypto/x509 does not know fails to load,
    and one on P-224 loads but no TLS handshake can sign with it.
    """
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 1024:
        return f"crypto/rsa: {key.key_size}-bit keys are insecure"
    if _unparsed_curve(cert) is not None:
        return "Failed to load cert/key pair: x509: unsupported elliptic curve"
    # No TLS signature scheme signs with a curve but these.
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in _TLS_CURVES:
        return (
            f"tls: handshake failure (a {_GO_CURVES[key.curve.name]} key: TLS signs with "
            "P-256, P-384 and P-521 only)"
        )
    if agent and not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return (
            f"Unsupported signature algorithm {type(key).__name__}; RSA and ECDSA only are "
            "supported."
        )
    return None


@dataclass(frozen=True)
class RoleCheck:
    """One connection (or check) Nomad makes with a certificate, and how it went."""

    name: str
    must: Must
    ok: bool
    error: str = ""

    @property
    def failed(self) -> bool:
        """True when the outcome is not what Nomad needs (a note never fails)."""
        return (self.must == "succeed" and not self.ok) or (self.must == "fail" and self.ok)


def role_checks(
    leaf: x509.Certificate,
    *,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    role: str,
    region: str,
    now: datetime,
) -> list[RoleCheck]:
    """What a Nomad cluster does with ``leaf`` in ``role``, connection by connection.

    Connections that must succeed, ones that must fail (another role's powers), and notes (the
    CLI dialling localhost). The same checks, by the same names, as the Go peer in the tests
    (tests/gopeer).
    """

    def go(usage: Usage, host: str | None = None) -> str:
        try:
            verify(leaf, intermediates=intermediates, roots=roots, now=now, usage=usage, host=host)
        except VerifyError as e:
            return e.go_error
        return ""

    def rpc_dial() -> str:
        return go("clientAuth") or (
            "" if rpc_peer_ok(leaf, region) else "invalid role or region for certificate"
        )

    def raft() -> str:
        dial = rpc_dial()
        if dial:
            return f"no verified RPC connection: {dial}"
        if raft_ok(leaf, region):
            return ""
        return f"invalid certificate, server.{region}.nomad not in {common_name(leaf)}"

    server, client = f"server.{region}.nomad", f"client.{region}.nomad"
    checks: list[tuple[str, Must, str]]
    if role == "server":
        checks = [
            ("rpc-serve", "succeed", go("serverAuth", server)),
            ("rpc-dial", "succeed", rpc_dial()),
            ("raft", "succeed", raft()),
            ("pose-as-client-agent", "fail", go("serverAuth", client)),
            ("https-localhost", "note", go("serverAuth", "localhost")),
            ("https-127.0.0.1", "note", go("serverAuth", "127.0.0.1")),
        ]
    elif role == "client":
        checks = [
            ("rpc-dial", "succeed", rpc_dial()),
            ("api-serve", "succeed", go("serverAuth", client)),
            ("raft", "fail", raft()),
            ("pose-as-server", "fail", go("serverAuth", server)),
            ("https-localhost", "note", go("serverAuth", "localhost")),
            ("https-127.0.0.1", "note", go("serverAuth", "127.0.0.1")),
        ]
    else:
        checks = [
            ("https-dial", "succeed", go("clientAuth")),
            ("rpc-dial", "fail", rpc_dial()),
            ("pose-as-server", "fail", go("serverAuth", server)),
            ("pose-as-client-agent", "fail", go("serverAuth", client)),
        ]
    checks.append(("issue-under", "fail", _issue_under(leaf, intermediates, roots, now)))
    return [RoleCheck(name, must, not error, error) for name, must, error in checks]


def _issue_under(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime,
) -> str:
    """Empty when a certificate signed by ``leaf``'s key would verify (it must not)."""
    try:
        _check_critical(leaf)
        check_dates(leaf, now)
        chains = build_chains(leaf, intermediates=intermediates, roots=roots, now=now)
    except VerifyError as e:
        return e.go_error
    if any(can_issue(leaf, chain) for chain in chains):
        return ""
    return "x509: the certificate cannot sign others that chain to the CA"


def can_issue(leaf: x509.Certificate, chain: Sequence[x509.Certificate]) -> bool:
    """Whether a certificate signed by ``leaf``'s key would chain to the CA as Go sees it.

    A role certificate that is also a CA, under a CA without a path length limit, lets every
    node that holds its key mint certificates for any role.
    """
    present, is_ca, _ = _basic(leaf)
    if not (present and is_ca) or _key_cert_sign(leaf) is False:
        return False
    # In the chain child -> leaf -> ... each CA at index k of ``chain`` has k intermediates below.
    for k, cert in enumerate(chain[1:], start=1):
        present, _, max_path = _basic(cert)
        if present and max_path >= 0 and k > max_path:
            return False
    return True


_ROLE_USAGES: dict[str, tuple[tuple[Usage, str | None], ...]] = {
    "server": (("serverAuth", "server.{region}.nomad"), ("clientAuth", None)),
    "client": (("serverAuth", "client.{region}.nomad"), ("clientAuth", None)),
    "cli": (("clientAuth", None),),
}


def check_issued(
    leaf: x509.Certificate,
    *,
    roots: Sequence[x509.Certificate],
    role: str,
    region: str,
    now: datetime,
) -> None:
    """Refuse a freshly issued role certificate unless Go and Nomad accept it in its role.

    Raises:
        VerifyError: the first rule that fails: Go's path validation (name constraints,
            extended key usage down the chain, validity windows, critical extensions), the key
            type, or one of Nomad's role checks.
    """
    for usage, host in _ROLE_USAGES[role]:
        verify(
            leaf,
            roots=roots,
            now=now,
            usage=usage,
            host=host.format(region=region) if host else None,
        )
    problem = key_problem(leaf, agent=role != "cli")
    if problem is not None:
        raise VerifyError("key-type", "Nomad cannot use its key", problem)
    for check in role_checks(
        leaf, intermediates=(), roots=roots, role=role, region=region, now=now
    ):
        if check.failed:
            what = "refused" if check.must == "succeed" else "accepted, and must not be"
            raise VerifyError(
                f"nomad-{check.name}",
                f"Nomad's {check.name} check: {what}",
                check.error or f"a Nomad agent accepts it for {check.name}",
            )
