"""Private keys and certificate requests made in this process, so only CSRs ever reach cfssl.

At fleet scale (issue 11) cfwrap makes each key itself with ``cryptography`` and hands cfssl a
PKCS#10 request, instead of having ``cfssl gencert`` make the key and print it on a pipe. The PEM
forms are the ones ``cfssljson -bare`` writes, so a key made here and one made by cfssl look
the same on disk.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from cfwrap import parsers
from cfwrap.errors import InputError
from cfwrap.models import CSR, KeySpec
from cfwrap.runner import remember_private_keys

#: The private keys cfwrap makes: those Nomad's TLS configuration and OpenSSL 3 both read.
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# The public exponent every RSA key uses (cfssl's and OpenSSL's default, and the only one Go's
# and most TLS stacks expect).
_RSA_EXPONENT = 65537


def new_private_key(spec: KeySpec) -> PrivateKey:
    """Make a new private key of the algorithm and size ``spec`` names.

    Raises:
        InputError: an algorithm or size cfwrap does not make (Ed25519 among them).
    """
    curves: dict[int, ec.EllipticCurve] = {
        256: ec.SECP256R1(),
        384: ec.SECP384R1(),
        521: ec.SECP521R1(),
    }
    algo = str(spec.algo)
    if algo == "ed25519":
        raise InputError(
            "key algorithm 'ed25519'",
            "cfssl writes Ed25519 keys under a PEM label OpenSSL 3 cannot load, and Nomad's TLS "
            "configuration expects ECDSA or RSA keys",
            fix="use ecdsa (256, 384 or 521) or rsa (2048 to 8192)",
        )
    if algo == "ecdsa" and spec.size in curves:
        return ec.generate_private_key(curves[spec.size])
    if algo == "rsa" and 2048 <= spec.size <= 8192 and spec.size % 8 == 0:
        return rsa.generate_private_key(public_exponent=_RSA_EXPONENT, key_size=spec.size)
    raise InputError(
        f"key {algo} {spec.size}",
        "not a key cfwrap makes",
        fix="use ecdsa (256, 384 or 521) or rsa (2048 to 8192, a multiple of 8)",
    )


def private_key_pem(key: PrivateKey, *, remember: bool = True) -> bytes:
    """Encode ``key`` as cfssljson writes it (SEC1 ``EC PRIVATE KEY`` or PKCS#1 ``RSA ...``).

    The PEM is remembered by the runner as a secret, so it is removed from anything logged
    (unless ``remember`` is false: a caller that only ever writes it to its file).
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # SEC1 for EC, PKCS#1 for RSA
        serialization.NoEncryption(),
    )
    if remember:
        remember_private_keys(pem)
    parsers.note_made_key(pem, key.public_key())
    return pem


def _subject(csr: CSR) -> list[x509.NameAttribute[str]]:
    """The subject's attributes in the order Go's pkix.Name writes them: C, ST, L, O, OU, CN."""
    fields = (
        ("C", NameOID.COUNTRY_NAME),
        ("ST", NameOID.STATE_OR_PROVINCE_NAME),
        ("L", NameOID.LOCALITY_NAME),
        ("O", NameOID.ORGANIZATION_NAME),
        ("OU", NameOID.ORGANIZATIONAL_UNIT_NAME),
    )
    attributes = [
        x509.NameAttribute(oid, value)
        for field, oid in fields
        for name in csr.names
        if (value := getattr(name, field))
    ]
    return [*attributes, x509.NameAttribute(NameOID.COMMON_NAME, csr.CN)]


def _san(host: str) -> x509.GeneralName:
    """One host as a SAN: an IP address when it reads as one (as cfssl decides), else DNS."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and not getattr(ip, "scope_id", None):  # Go's ParseIP has no zones
        return x509.IPAddress(ip)
    if "%" in host or not host or not host.isascii():
        raise InputError(
            f"host {host!r}",
            "not an IP address (without a zone) or an ASCII DNS name",
            fix="give IP addresses or DNS names (IDNA A-labels, xn--...)",
        )
    return x509.DNSName(host)


def csr_pem(key: PrivateKey, csr: CSR) -> bytes:
    """A PKCS#10 request signed by ``key`` (SHA-256) for ``csr``'s subject names and hosts.

    Holds the public key only; ``csr.key`` is not read (the key is already made).

    Raises:
        InputError: a host that is neither an IP address nor an ASCII DNS name.
    """
    request = _unsigned(csr).sign(key, hashes.SHA256())
    pem = request.public_bytes(serialization.Encoding.PEM)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    parsers.note_made_csr(pem, spki)
    return pem


@functools.lru_cache(maxsize=64)
def _unsigned(csr: CSR) -> x509.CertificateSigningRequestBuilder:
    """The request for ``csr`` before a key signs it.

    Cached (a frozen CSR is hashable): a fleet's thousands of clients ask for the same names,
    and a builder is immutable.
    """
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(_subject(csr)))
    if csr.hosts:
        sans = [_san(host) for host in csr.hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder
