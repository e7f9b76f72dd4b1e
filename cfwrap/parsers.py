"""Read PEM certificates, private keys and CSRs into plain facts.

Parsers know nothing about Nomad or cfwrap's kits: ``nomad``, ``manifest`` and ``doctor``
interpret the facts, so they work on certificates cfwrap did not make. Facts about a private key
never include the key: only its type, size and a hash of its public half (to pair it with a
certificate).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

PemKind = Literal["certificate", "private-key", "csr"]


class ParseError(ValueError):
    """The bytes are not a PEM object of the expected kind (the message says what they are)."""


@dataclass(frozen=True)
class KeyFacts:
    """A public or private key's type and size, and the SHA-256 of its SubjectPublicKeyInfo."""

    algorithm: str
    size: int
    public_key_sha256: str


@dataclass(frozen=True)
class CertFacts:
    """What a certificate says, in plain values."""

    subject: str
    common_name: str | None
    issuer: str
    serial: str
    not_before: datetime
    not_after: datetime
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    key: KeyFacts
    key_usage: tuple[str, ...]
    extended_key_usage: tuple[str, ...]
    is_ca: bool
    path_length: int | None
    signature_algorithm: str
    fingerprint_sha256: str


@dataclass(frozen=True)
class CSRFacts:
    """What a certificate signing request asks for."""

    subject: str
    common_name: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    key: KeyFacts
    signature_valid: bool


_LABELS: dict[bytes, PemKind] = {
    b"CERTIFICATE": "certificate",
    b"CERTIFICATE REQUEST": "csr",
    b"NEW CERTIFICATE REQUEST": "csr",
    b"PRIVATE KEY": "private-key",
    b"EC PRIVATE KEY": "private-key",
    b"RSA PRIVATE KEY": "private-key",
    b"ENCRYPTED PRIVATE KEY": "private-key",
}


def pem_kind(data: bytes) -> PemKind | None:
    """Say what the first PEM block in ``data`` holds, without parsing it (None if no PEM)."""
    start = data.find(b"-----BEGIN ")
    if start < 0:
        return None
    end = data.find(b"-----", start + 11)
    return _LABELS.get(data[start + 11 : end]) if end > 0 else None


def _key_facts(public: PublicKeyTypes) -> KeyFacts:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    spki = public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(spki).hexdigest()
    if isinstance(public, ec.EllipticCurvePublicKey):
        return KeyFacts("ecdsa", public.curve.key_size, digest)
    if isinstance(public, rsa.RSAPublicKey):
        return KeyFacts("rsa", public.key_size, digest)
    if isinstance(public, ed25519.Ed25519PublicKey):
        return KeyFacts("ed25519", 256, digest)
    if isinstance(public, ed448.Ed448PublicKey):
        return KeyFacts("ed448", 456, digest)
    return KeyFacts(type(public).__name__, 0, digest)


def _common_name(name: x509.Name) -> str | None:
    from cryptography.x509.oid import NameOID

    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


def _sans(extensions: x509.Extensions) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from cryptography import x509

    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    dns = tuple(san.get_values_for_type(x509.DNSName))
    ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return dns, ips


_KEY_USAGE_FIELDS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


def _key_usage(extensions: x509.Extensions) -> tuple[str, ...]:
    from cryptography import x509

    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return ()
    names = [f for f in _KEY_USAGE_FIELDS if getattr(usage, f)]
    if usage.key_agreement:
        names += [f for f in ("encipher_only", "decipher_only") if getattr(usage, f)]
    return tuple(names)


def _extended_key_usage(extensions: x509.Extensions) -> tuple[str, ...]:
    from cryptography import x509

    try:
        eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return ()
    # cryptography has no name for anyExtendedKeyUsage; Go accepts it for every purpose.
    names = {"2.5.29.37.0": "anyExtendedKeyUsage"}
    return tuple(
        names.get(oid.dotted_string, oid._name if oid._name != "Unknown OID" else oid.dotted_string)
        for oid in eku
    )


def load_certificate(data: bytes) -> x509.Certificate:
    """Load the first PEM certificate in ``data``.

    Raises:
        ParseError: no PEM certificate, or a damaged one.
    """
    if pem_kind(data) != "certificate":
        raise ParseError(f"not a PEM certificate (found: {pem_kind(data) or 'no PEM block'})")
    return _load_pem(bytes(data))


# Cached by content (certificates are immutable): a plan's apply reads each new certificate in
# the signer, the check and the manifest, and thousands of folders hold the same CA bundle.
@functools.lru_cache(maxsize=64)
def _load_pem(data: bytes) -> x509.Certificate:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise ParseError(f"damaged PEM certificate ({e})") from None
    return _checked(cert)


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Load every PEM certificate in ``data``, in order (a bundle, or a leaf and its chain).

    Raises:
        ParseError: no PEM certificate, or a damaged one.
    """
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ParseError(f"damaged PEM certificate ({e})") from None
    return [_checked(cert) for cert in certs]


def load_der_certificate(data: bytes) -> x509.Certificate:
    """Load a DER certificate (as a TLS peer presents it).

    Raises:
        ParseError: a damaged certificate.
    """
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise ParseError(f"damaged certificate ({e})") from None
    return _checked(cert)


def _checked(cert: x509.Certificate) -> x509.Certificate:
    """Parse the parts cryptography reads lazily, so damage shows here and not in a caller.

    A malformed extension (a SAN that is not valid DER, say) raises only when the extensions
    are first read; an unknown key type only when the public key is.
    """
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        _ = cert.extensions
        cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ParseError(f"damaged certificate ({type(e).__name__}: {e})") from None
    try:
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
    except ValueError as e:
        # A name cryptography cannot hold (an attribute twice in one RDN, a UTF8String that is
        # not UTF-8): Go may accept such a certificate, but nothing here can check its names.
        raise ParseError(f"its subject or issuer name cannot be read ({e})") from None
    return cert


@functools.lru_cache(maxsize=64)  # by the certificate's DER; the facts are frozen
def certificate_facts(cert: x509.Certificate) -> CertFacts:
    """Turn a loaded certificate into facts."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    extensions = cert.extensions
    dns, ips = _sans(extensions)
    try:
        basic = extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca, path_length = basic.ca, basic.path_length
    except x509.ExtensionNotFound:
        is_ca, path_length = False, None
    signature = cert.signature_algorithm_oid._name
    return CertFacts(
        subject=cert.subject.rfc4514_string(),
        common_name=_common_name(cert.subject),
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        dns_names=dns,
        ip_addresses=ips,
        key=_key_facts(cert.public_key()),
        key_usage=_key_usage(extensions),
        extended_key_usage=_extended_key_usage(extensions),
        is_ca=is_ca,
        path_length=path_length,
        signature_algorithm=signature,
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )


def read_certificate(data: bytes) -> CertFacts:
    """Read the first PEM certificate in ``data`` into facts.

    Raises:
        ParseError: no PEM certificate, or a damaged one.
    """
    return certificate_facts(load_certificate(data))


@dataclass(frozen=True)
class PemBlock:
    """A block as Go's ``encoding/pem`` decodes it: its type, headers and DER, and where it ends.

    ``encrypted``: a ``Proc-Type: 4,ENCRYPTED`` header (Go ignores any other header, and so
    parses ``der`` as it is). ``end``: the offset in the data just past its END line.
    """

    type: bytes
    has_headers: bool
    der: bytes
    encrypted: bool = False
    end: int = 0


_PEM_START, _PEM_END, _DASHES = b"-----BEGIN ", b"\n-----END ", b"-----"


def _go_line(data: bytes) -> tuple[bytes, bytes]:
    """Go's pem ``getLine``: the first line without its ending or trailing blanks; the rest."""
    line, newline, rest = data.partition(b"\n")
    if newline and line.endswith(b"\r"):
        line = line[:-1]
    return line.rstrip(b" \t"), rest


def go_pem_blocks(data: bytes) -> Iterator[PemBlock]:
    """Every block Go's ``pem.Decode`` finds in ``data``, in order, as Go finds them.

    A BEGIN line at the start or after a newline, blanks allowed after it; ``Key: value``
    header lines; an END line of the same type; base64 with blanks and line ends anywhere. A
    likely block that breaks a rule is skipped, and the search goes on after its BEGIN line.
    """
    rest = data
    while True:
        if rest.startswith(_PEM_START):
            rest = rest[len(_PEM_START) :]
        else:
            _, found, rest = rest.partition(b"\n" + _PEM_START)
            if not found:
                return
        block, rest = _go_block(rest)
        if block is not None:
            yield dataclasses.replace(block, end=len(data) - len(rest))


def _go_block(rest: bytes) -> tuple[PemBlock | None, bytes]:
    """The block after a BEGIN, and what follows it; or None, and where to search on."""
    import base64
    import binascii

    type_line, rest = _go_line(rest)
    if not type_line.endswith(_DASHES):
        return None, rest
    kind = type_line[: -len(_DASHES)]
    has_headers = encrypted = False
    while rest:
        line, after = _go_line(rest)
        if b":" not in line:
            break
        key, _, value = line.partition(b":")
        if key.strip() == b"Proc-Type" and b"ENCRYPTED" in value:
            encrypted = True
        has_headers, rest = True, after
    if not has_headers and rest.startswith(_PEM_END[1:]):
        end, trailer = 0, len(_PEM_END) - 1
    else:
        end = rest.find(_PEM_END)
        trailer = end + len(_PEM_END)
    closing = rest[trailer : trailer + len(kind) + len(_DASHES)]
    after_end, next_rest = _go_line(rest[trailer + len(closing) :])
    if end < 0 or closing != kind + _DASHES or after_end:
        return None, rest
    try:
        der = base64.b64decode(rest[:end].translate(None, b" \t\r\n"), validate=True)
    except (binascii.Error, ValueError):
        return None, rest
    return PemBlock(kind, has_headers, der, encrypted), next_rest


def read_key_as_go(data: bytes) -> KeyFacts:
    """Read the key Go's ``tls.X509KeyPair`` takes from ``data``.

    The first block labelled ``PRIVATE KEY`` or ``* PRIVATE KEY``, others before it skipped
    (``openssl ecparam -genkey`` writes an ``EC PARAMETERS`` block first, and a combined file
    may hold the certificate first), parsed as Go parses any key block: as PKCS #1, PKCS #8 or
    SEC 1 DER, whatever its label says.

    Raises:
        ParseError: no key Go would take.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    blocks = list(go_pem_blocks(data))
    block = next((b for b in blocks if is_key_label(b.type)), None)
    if block is None:
        found = pem_kind(data) or (f"a {blocks[0].type!r} block" if blocks else "no PEM block")
        raise ParseError(f"not a PEM private key (found: {found})")
    if block.encrypted or b"ENCRYPTED" in block.type:
        raise ParseError("encrypted private key; cfssl needs it unencrypted")
    try:
        key = load_der_private_key(block.der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ParseError(
            "damaged PEM private key (no PKCS #1, PKCS #8 or SEC 1 key in it)"
        ) from None
    return _key_facts(key.public_key())


def is_key_label(label: bytes) -> bool:
    """A PEM label Go's ``tls.X509KeyPair`` takes for a private key: ``[* ]PRIVATE KEY``."""
    return label == b"PRIVATE KEY" or label.endswith(b" PRIVATE KEY")


def load_private_key(data: bytes, *, validate: bool = True) -> PrivateKeyTypes:
    """Load an unencrypted PEM private key.

    ``validate=False`` skips OpenSSL's consistency check of an RSA key's private parts (a third
    of a second for RSA 4096), for a caller that only compares its public half.

    Raises:
        ParseError: not a private key, encrypted, or damaged (the message never quotes the key).
    """
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if pem_kind(data) != "private-key":
        raise ParseError(f"not a PEM private key (found: {pem_kind(data) or 'no PEM block'})")
    if b"ENCRYPTED" in data.split(b"\n", 3)[0] or b"Proc-Type: 4,ENCRYPTED" in data:
        raise ParseError("encrypted private key; cfssl needs it unencrypted")
    try:
        return load_pem_private_key(
            data, password=None, unsafe_skip_rsa_key_validation=not validate
        )
    except (ValueError, TypeError) as e:
        # cryptography's messages describe the structure, never the key bytes.
        raise ParseError(f"damaged PEM private key ({type(e).__name__})") from None


def read_private_key(data: bytes, *, validate: bool = True) -> KeyFacts:
    """Read a PEM private key into facts about its public half.

    ``validate``: see :func:`load_private_key`.

    Raises:
        ParseError: see :func:`load_private_key`.
    """
    made = _MADE_KEYS.get(data)
    if made is not None:
        return made
    key = load_private_key(data, validate=validate)
    return _key_facts(key.public_key())


_T = TypeVar("_T")


class _Made(Generic[_T]):
    """What this process knows of the last PEM blocks it made, by the SHA-256 of their bytes.

    A plan's apply makes thousands of keys and requests and reads each back at once: the key to
    pair it with its certificate, the request to check the certificate is for its key. Reading
    them back (OpenSSL checks a key on load) cost 6% of a fleet apply's CPU. Only a hash of each
    PEM is kept, never the PEM; bytes that are not one of the last few made are read as ever.
    """

    KEPT = 64

    def __init__(self) -> None:
        self._known: dict[bytes, _T] = {}
        self._lock = threading.Lock()

    def note(self, pem: bytes, value: _T) -> None:
        with self._lock:
            while len(self._known) >= self.KEPT:
                del self._known[next(iter(self._known))]  # the oldest: a dict keeps the order
            self._known[hashlib.sha256(pem).digest()] = value

    def get(self, pem: bytes) -> _T | None:
        return self._known.get(hashlib.sha256(pem).digest())


_MADE_KEYS: _Made[KeyFacts] = _Made()
_MADE_CSRS: _Made[bytes] = _Made()


def note_made_key(pem: bytes, public: PublicKeyTypes) -> None:
    """Remember that ``pem`` is the private key this process made, whose public half is ``public``.

    Only for a PEM just serialised from the key object whose ``public_key()`` is ``public``.
    """
    _MADE_KEYS.note(pem, _key_facts(public))


def note_made_csr(pem: bytes, spki: bytes) -> None:
    """Remember that ``pem`` is a request this process made for the key whose DER SPKI is ``spki``.

    Only for a PEM just serialised from a request signed by that key.
    """
    _MADE_CSRS.note(pem, spki)


def made_csr_public_key(pem: bytes) -> bytes | None:
    """The DER SubjectPublicKeyInfo of a request this process made (:func:`note_made_csr`)."""
    return _MADE_CSRS.get(pem)


def read_csr(data: bytes) -> CSRFacts:
    """Read a PEM certificate signing request into facts.

    Raises:
        ParseError: not a CSR, or a damaged one.
    """
    from cryptography import x509

    if pem_kind(data) != "csr":
        raise ParseError(f"not a PEM CSR (found: {pem_kind(data) or 'no PEM block'})")
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        csr = x509.load_pem_x509_csr(data)
        dns, ips = _sans(csr.extensions)
        public = csr.public_key()
        subject = csr.subject.rfc4514_string()
        common_name = _common_name(csr.subject)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ParseError(f"damaged PEM CSR ({e})") from None
    return CSRFacts(
        subject=subject,
        common_name=common_name,
        dns_names=dns,
        ip_addresses=ips,
        key=_key_facts(public),
        signature_valid=csr.is_signature_valid,
    )


@functools.lru_cache(maxsize=64)  # by both certificates' DER: a bundle checks itself per folder
def is_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer``'s key signed ``cert`` and the issuer names match."""
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
